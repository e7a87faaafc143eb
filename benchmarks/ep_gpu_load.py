"""Expert-parallel load onto GPUs over NCCL: per-rank GB/s and bytes read, checked and saved.

Run with torchrun, one process per GPU:

    torchrun --nproc-per-node 8 benchmarks/ep_gpu_load.py --size-gib 16 --experts 100 \\
        --workdir /tmp

Rank 0 builds a synthetic Qwen3-MoE-shaped bf16 checkpoint (100 experts, so that 8 ranks
split them unevenly: 13, 13, ..., 9), and every rank then loads its experts onto its GPU
with ``load_experts(..., device="cuda")`` from the page cache (timed after one warm-up
load, as a training job's first load also pays CUDA and thread start-up). Rank 0 checks the sha256 of
every grouped tensor's ``full_tensor()`` against moekit's CPU path, all ranks save back
with ``save_experts``, and rank 0 verifies the saved checkpoint equals the source. Each
rank's GB/s is also given as a share of its GPU's pinned host-to-device copy, measured in
the same run (the limit of a load through host memory), with what read its files: kvikio
(where installed; it is loaded once a process's first load is done) or moekit's readers.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1): using it can take a shared host's GPUs out of service.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

for name, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                    ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[name] = value

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import (add_shape_arguments, build_checkpoint, copy_limit_gbps,  # noqa: E402
                    digest, leave_process_group, print_table, warm_page_cache,
                    write_figures)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from moekit import load_experts, save_experts, verify  # noqa: E402
from moekit.planner import analyse_checkpoint  # noqa: E402
from moekit.executors.evaluate import materialize  # noqa: E402
from moekit.executors.native import native_reads  # noqa: E402
from moekit.expert_parallel.ranges import rank_plan  # noqa: E402
from moekit.layouts import layout_named  # noqa: E402
from moekit.plan import nbytes, reads  # noqa: E402
from moekit.planner import build_plan  # noqa: E402
from moekit.sources import FileSource  # noqa: E402


def cpu_digests(path: Path) -> dict[str, str]:
    """sha256 of every grouped nemo tensor built on the CPU, one tensor at a time."""
    checkpoint, analysis = analyse_checkpoint(path)
    plan = build_plan(analysis, layout_named("nemo"))
    with FileSource(checkpoint) as source:
        return {t.name: digest(materialize(t.recipe, source)) for t in plan.tensors
                if t.name in plan.expert_tensors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser, size_gib=16.0, experts=100)
    parser.add_argument("--workdir", default="/tmp")
    parser.add_argument("--json", help="also write the figures to this JSON file (rank 0)")
    args = parser.parse_args()

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    src, out = Path(args.workdir) / "moekit-ep-gpu-src", Path(args.workdir) / "moekit-ep-gpu-out"
    if rank == 0 and not src.exists():
        size, layers = build_checkpoint(src, args)
        warm_page_cache(src)
        print(f"checkpoint: {size / 2**30:.2f} GiB, {layers} layers x {args.experts} experts, "
              f"{world} ranks, GPU {torch.cuda.get_device_name()}", flush=True)
    dist.barrier()

    mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("ep",))
    checkpoint, analysis = analyse_checkpoint(src)
    plan = rank_plan(analysis, world, rank, "nemo")
    read = sum(nbytes(r.shape, r.dtype) for t in plan.tensors for r in reads(t.recipe))
    load_experts(src, mesh, layout="nemo", device="cuda")  # warm-up: threads, pinned pool
    limit = copy_limit_gbps(device)
    torch.cuda.synchronize()
    native = native_reads(device)  # kvikio is loaded once a first load is done
    dist.barrier()
    start = time.perf_counter()
    state = load_experts(src, mesh, layout="nemo", device="cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    mine = next(v for v in state.values() if isinstance(v, DTensor)).to_local().shape[0]
    rows = [None] * world
    dist.all_gather_object(rows, (rank, mine, read, seconds, limit, native))

    full = {k: digest(v.full_tensor()) for k, v in state.items() if isinstance(v, DTensor)}
    if rank == 0:
        print_table([("rank", 4, ""), ("experts", 9, ""), ("GiB read", 10, ".2f"),
                     ("seconds", 9, ".2f"), ("GB/s", 8, ".1f"), ("copy GB/s", 11, ".1f"),
                     ("of copy", 9, ".0%"), ("read by", 9, "")],
                    [(r, experts, nbytes_read / 2**30, s, nbytes_read / s / 1e9, copy,
                      nbytes_read / s / 1e9 / copy, "kvikio" if kvikio else "moekit")
                     for r, experts, nbytes_read, s, copy, kvikio in rows])
        total = sum(row[2] for row in rows) / max(row[3] for row in rows)
        print(f"all ranks together: {total / 1e9:.1f} GB/s")
        same = full == cpu_digests(src)
        print(f"{len(full)} grouped tensors: full_tensor() sha256 "
              f"{'identical to' if same else 'DIFFERENT from'} moekit's CPU path", flush=True)
        write_figures(args.json, f"{world} x {torch.cuda.get_device_name()}",
                      {f"rank {r}": {"experts": experts, "bytes_read": nbytes_read,
                                     "seconds": s, "gbps": nbytes_read / s / 1e9,
                                     "copy_limit_gbps": copy,
                                     "ratio": nbytes_read / s / 1e9 / copy,
                                     "kvikio_reads": kvikio}
                       for r, experts, nbytes_read, s, copy, kvikio in rows},
                      baseline="each rank's pinned host-to-device copy", torch=torch.__version__,
                      all_ranks_gbps=total / 1e9, identical_to_cpu=same)
    dist.barrier()
    start = time.perf_counter()
    save_experts(state, out, mesh, layout="nemo", config_from=src, overwrite=True)
    if rank == 0:
        print(f"save_experts: {time.perf_counter() - start:.2f} s; saved checkpoint equals the "
              f"source: {verify(src, out).equal}", flush=True)
    leave_process_group()


if __name__ == "__main__":
    main()
