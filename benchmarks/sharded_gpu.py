"""Whole-model sharded loads and saves on several GPUs of one host, over NCCL.

Run with torchrun, one process per GPU:

    torchrun --nproc-per-node 2 benchmarks/sharded_gpu.py --family qwen3 --size-gib 16 \\
        --workdir /tmp --json sharded-gpu-qwen3.json
    torchrun --nproc-per-node 2 benchmarks/sharded_gpu.py --family deepseek_v3_fp8 \\
        --size-gib 16 --workdir /tmp --json sharded-gpu-ds3.json

Rank 0 writes a synthetic checkpoint: ``qwen3`` is Qwen3-MoE-shaped bf16 (127 experts and a
vocabulary of 4097 rows, so that expert and FSDP splits are uneven); ``deepseek_v3_fp8``
has DeepSeek-V3's shapes (hidden 7168, expert intermediate 2048, vocabulary 129,280), FP8
e4m3 weights with 128 x 128 block scales, one dense leading layer, the MTP layer and 255
routed experts. Then, for every (dp, ep) mesh of the ranks, each rank:

- measures its pinned host-to-device copy (the limit of a load through host memory; on
  the CPU, a host-to-host copy);
- loads its share with ``moekit.load_sharded`` (timed after one warm-up load), counting
  the bytes its reader reads and the bytes it holds on its GPU;
- takes part in ``full_tensor()`` of every tensor, which rank 0 compares byte for byte
  with the tensor moekit's CPU path builds;
- saves that state with ``save_sharded`` (safetensors, then DCP; the meshes ``--save-on``
  names), reads it back with ``load_sharded`` and compares it with the state it saved.

Then every rank saves load_experts' state with ``save_experts`` (DCP, then safetensors),
read back and compared likewise; and a tiny Qwen3-MoE runs FSDP2 (``fully_shard`` over
dp) with its experts split over ep (each rank computes its own experts' tokens, an
all-reduce sums them) on the state ``load_sharded`` gives, against the whole model on one
device. NVLink multicast stays off (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1): using it can take a shared
host's GPUs out of service. ``--device cpu`` runs the same over gloo, as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from contextlib import nullcontext
from pathlib import Path

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                      ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_name] = _value

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import (copy_limit_gbps, expert_bytes_per_layer,  # noqa: E402
                    leave_process_group, print_table, qwen3_moe_tensors, sync,
                    warm_page_cache, write_figures, write_synthetic)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import moekit  # noqa: E402
from moekit.config_headers import config_headers  # noqa: E402
from moekit.dtypes import to_torch  # noqa: E402
from moekit.executors import device as device_reader  # noqa: E402
from moekit.executors.evaluate import materialize  # noqa: E402
from moekit.layouts import layout_named  # noqa: E402
from moekit.plan import nbytes  # noqa: E402
from moekit.planner import analyse_checkpoint, build_plan  # noqa: E402
from moekit.safetensors_writer import ShardWriter  # noqa: E402
from moekit.sources import FileSource  # noqa: E402

DS3_CONFIG = Path(__file__).parent.parent / "tests" / "data" / "deepseek_v3_671b_config.json"
LAYOUT = "transformers"
"""The expert layout loaded: transformers' fused experts hold FP8 scales as well."""


def qwen3_checkpoint(path: Path, args: argparse.Namespace) -> None:
    """A Qwen3-MoE-shaped bf16 checkpoint of about ``args.size_gib``."""
    layers = max(1, round(args.size_gib * 2**30 / expert_bytes_per_layer(args)))
    config = {"model_type": "qwen3_moe", "num_experts": args.experts,
              "hidden_size": args.hidden, "moe_intermediate_size": args.inter,
              "num_hidden_layers": layers}
    write_synthetic(path, qwen3_moe_tensors(layers, args.experts, args.hidden, args.inter,
                                            vocab=args.vocab), config)


def deepseek_v3_checkpoint(path: Path, args: argparse.Namespace) -> None:
    """A DeepSeek-V3-shaped FP8 checkpoint: one dense layer, MoE layers to about
    ``args.size_gib`` (the MTP layer counted), the tensors the Hub's files hold."""
    config = json.loads(DS3_CONFIG.read_text())
    per_layer = 3 * args.experts * args.hidden * args.inter
    moe_layers = max(1, round(args.size_gib * 2**30 / per_layer))
    config.update(hidden_size=args.hidden, moe_intermediate_size=args.inter,
                  n_routed_experts=args.experts, vocab_size=args.vocab,
                  num_hidden_layers=moe_layers, first_k_dense_replace=1,
                  num_nextn_predict_layers=1)
    if args.hidden != 7168:  # a smaller smoke-test shape keeps the head sizes consistent
        config.update(intermediate_size=4 * args.inter, q_lora_rank=args.hidden // 2,
                      kv_lora_rank=args.hidden // 4)
    headers = config_headers(config, str(DS3_CONFIG))
    _write_random(path, [(name, h.shape, h.dtype) for name, h in headers.items()], config)


def _write_random(path: Path, tensors: list[tuple[str, tuple[int, ...], str]],
                  config: dict, shard_bytes: int = 4 * 2**30) -> None:
    """Random bytes for every tensor (any dtype), in shards of about ``shard_bytes``."""
    path.mkdir(parents=True)
    shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    used = 0
    for name, shape, dtype in tensors:
        size = nbytes(shape, dtype)
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape, dtype))
        used += size
    pool = torch.randint(0, 255, (2**26 + 4099,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with ShardWriter(path / file, shard and [(n, d, s) for n, s, d in shard],
                         {"format": "pt"}) as writer:
            for j, (name, shape, dtype) in enumerate(shard):
                writer.write(name, _bytes_as(pool, shape, dtype, 7919 * i + 104729 * j))
                weight_map[name] = file
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))


def _bytes_as(pool: torch.Tensor, shape: tuple[int, ...], dtype: str, seed: int
              ) -> torch.Tensor:
    """Pseudo-random bytes viewed as a tensor of ``shape`` and ``dtype``; no NaN bit
    patterns for floating dtypes (the top bit of each element's high byte is cleared
    in half the elements, which leaves the values finite and varied enough to compare)."""
    size = nbytes(shape, dtype)
    start = seed % 4096
    reps = -(-(size + start) // pool.numel())
    data = (pool.repeat(reps) if reps > 1 else pool)[start:start + size].clone()
    if dtype.startswith("F"):
        data &= 0x3F  # below every exponent of all ones: finite in e4m3, bf16 and f32
    return data.view(to_torch(dtype)).view(shape)


def counting_reads() -> list[int]:
    """Counts the bytes this process reads from checkpoint files (a running total): on the
    CPU through ``FileSource``, onto a GPU through the device reader's threads."""
    counted = [0]
    lock = threading.Lock()
    original_read, original_into = FileSource.read, device_reader._read_into

    def read(self, region):
        with lock:
            counted[0] += self.block_bytes(region)
        return original_read(self, region)

    def read_into(fd, start, view, file):
        with lock:
            counted[0] += len(view)
        return original_into(fd, start, view, file)

    FileSource.read = read
    device_reader._read_into = read_into
    return counted


def held_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes this rank holds on its device."""
    local = (v.to_local() if isinstance(v, DTensor) else v for v in state.values())
    return sum(t.numel() * t.element_size() for t in local)


def timed_load(src: Path, mesh: DeviceMesh, counted: list[int], device: torch.device
               ) -> tuple[dict[str, torch.Tensor], float, int]:
    """load_sharded after a warm-up load: the state, its seconds and the bytes read."""
    moekit.load_sharded(src, mesh, layout=LAYOUT)
    sync(device)
    dist.barrier()
    before = counted[0]
    start = time.perf_counter()
    state = moekit.load_sharded(src, mesh, layout=LAYOUT)
    sync(device)
    return state, time.perf_counter() - start, counted[0] - before


def same_as_cpu_path(state: dict[str, torch.Tensor], src: Path) -> tuple[int, list[str]]:
    """Every tensor's full value against the one moekit's CPU path builds (rank 0
    compares; every rank joins each ``full_tensor()``): (tensors compared, differing)."""
    rank = dist.get_rank()
    plan = None
    if rank == 0:
        checkpoint, analysis = analyse_checkpoint(src)
        plan = {t.name: t for t in build_plan(analysis, layout_named(LAYOUT)).tensors}
    differing = []
    with FileSource(checkpoint) if rank == 0 else nullcontext() as source:
        for key in sorted(state):
            value = state[key]
            full = _full_bytes(value)
            if rank == 0:
                expected = materialize(plan[key].recipe, source)
                expected = expected.contiguous().view(torch.uint8)
                if not torch.equal(full.cpu().reshape(expected.shape), expected):
                    differing.append(key)
            del full
    return len(state), differing


def _full_bytes(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor as bytes (one more dimension, of the element's bytes): a DTensor's
    pieces are gathered as bytes, since gloo has no float8 types."""
    if not isinstance(value, DTensor):
        return value.contiguous().view(torch.uint8)
    size = value.element_size()
    local = value.to_local().contiguous()
    local = local.view(torch.uint8).view(*local.shape, size)
    shape = torch.Size((*value.shape, size))
    return DTensor.from_local(local, value.device_mesh, value.placements, run_check=False,
                              shape=shape, stride=torch.empty(shape, device="meta").stride()
                              ).full_tensor().flatten(-2)


def meshes(world: int) -> list[tuple[int, int]]:
    """Every (dp, ep) of ``world`` ranks."""
    return [(world // ep, ep) for ep in range(1, world + 1) if world % ep == 0]


def run_loads(src: Path, args: argparse.Namespace, device: torch.device,
              figures: dict) -> None:
    """Every mesh: time, bytes and the CPU-path comparison of load_sharded."""
    rank, world = dist.get_rank(), dist.get_world_size()
    counted = counting_reads()
    limit = copy_limit_gbps(device)
    tensor_bytes = _tensor_bytes(src)
    for dp, ep in meshes(world):
        mesh = init_device_mesh(device.type, (dp, ep), mesh_dim_names=("dp", "ep"))
        state, seconds, read = timed_load(src, mesh, counted, device)
        held = held_bytes(state)
        rows = [None] * world
        dist.all_gather_object(rows, (rank, read, held, seconds, limit))
        compared, differing = same_as_cpu_path(state, src)
        label = f"dp {dp} x ep {ep}"
        if rank == 0:
            _report(label, rows, compared, differing, tensor_bytes, figures)
        if f"{dp}x{ep}" in args.save_on.split(","):
            for fmt in ("safetensors", "dcp"):
                save_and_check(
                    f"save_sharded {fmt} on {label}", src, Path(args.workdir), state,
                    lambda out: moekit.save_sharded(state, out, mesh, layout=LAYOUT,
                                                    format=fmt, config_from=src),
                    lambda out: moekit.load_sharded(out, mesh, layout=LAYOUT), figures)
        state.clear()


def _tensor_bytes(src: Path) -> int:
    """Bytes of the checkpoint's tensors (its files less their headers)."""
    checkpoint, _ = analyse_checkpoint(src)
    return sum(nbytes(tuple(t.shape), t.dtype) for t in checkpoint.tensors.values())


def _report(label: str, rows: list, compared: int, differing: list[str], tensor_bytes: int,
            figures: dict) -> None:
    print(f"load_sharded on {label}: {compared} tensors, full_tensor() "
          f"{'equal to' if not differing else 'DIFFERENT from'} moekit's CPU path"
          f"{': ' + ', '.join(differing[:5]) if differing else ''}")
    table = []
    for rank, read, held, seconds, limit in rows:
        rate = held / seconds / 1e9
        table.append((rank, read / 2**30, held / 2**30, seconds, rate, limit, rate / limit))
        figures[f"{label} rank {rank}"] = {
            "bytes_read": read, "bytes_held": held, "seconds": seconds,
            "held_gbps": rate, "copy_limit_gbps": limit, "ratio": rate / limit,
            "equal_to_cpu_path": not differing}
    print_table([("rank", 4, ""), ("GiB read", 10, ".2f"), ("GiB held", 10, ".2f"),
                 ("seconds", 9, ".2f"), ("held GB/s", 11, ".1f"), ("copy GB/s", 11, ".1f"),
                 ("of copy", 9, ".0%")], table)
    total_read = sum(r[1] for r in rows)
    slowest = max(r[3] for r in rows)
    print(f"all ranks: {total_read / 2**30:.2f} GiB read in {slowest:.2f} s = "
          f"{total_read / slowest / 1e9:.1f} GB/s; the checkpoint's tensors "
          f"{'read once' if total_read == tensor_bytes else 'NOT read once'} "
          f"({tensor_bytes / 2**30:.2f} GiB)", flush=True)
    figures[f"{label} all ranks"] = {"bytes_read": total_read, "seconds": slowest,
                                     "read_gbps": total_read / slowest / 1e9,
                                     "read_once": total_read == tensor_bytes}


def run_saves(src: Path, workdir: Path, device: torch.device, figures: dict) -> None:
    """save_experts of load_experts' state on a 1-D ep mesh, as DCP and as safetensors."""
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("ep",))
    on = device.type if device.type == "cuda" else None
    state = moekit.load_experts(src, mesh, layout=LAYOUT, device=on)
    for fmt in ("dcp", "safetensors"):
        save_and_check(
            f"save_experts {fmt} on ep {world}", src, workdir, state,
            lambda out: moekit.save_experts(state, out, mesh, layout=LAYOUT, config_from=src,
                                            overwrite=True, format=fmt),
            lambda out: moekit.load_experts(out, mesh, layout=LAYOUT, device=on), figures)
    state.clear()


def save_and_check(label: str, src: Path, workdir: Path, state: dict[str, torch.Tensor],
                   save, reload, figures: dict) -> None:
    """Time ``save(out)`` on every rank; read the output back with ``reload(out)`` and
    compare it with ``state`` rank by rank (``state`` equals moekit's CPU path of the
    source, checked beforehand), and have rank 0 compare the output with the source with
    ``moekit verify``, whose differences are printed, if any. The output is removed
    afterwards."""
    rank = dist.get_rank()
    out = workdir / "moekit-sharded-gpu-out"
    dist.barrier()
    start = time.perf_counter()
    save(out)
    dist.barrier()
    seconds = time.perf_counter() - start
    back = reload(out)
    differing = sorted(k for k in state.keys() | back.keys()
                       if k not in state or k not in back or not _same(state[k], back[k]))
    del back
    verdicts: list = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, differing)
    differing = sorted({k for v in verdicts for k in v})
    if rank == 0:
        report = moekit.verify(src, out, show_progress=False)
        print(f"{label}: {seconds:.2f} s; read back "
              f"{'equal to' if not differing else 'DIFFERENT from'} the loaded state; "
              f"verify: {'equal to' if report.equal else 'DIFFERENT from'} the source",
              flush=True)
        if differing:
            print(f"differing: {', '.join(differing[:8])}", flush=True)
        if not report.equal:
            print(report.render()[:3000], flush=True)
        figures[label] = {"seconds": seconds, "equal_to_source": not differing and report.equal}
        shutil.rmtree(out)
    dist.barrier()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same placement, shape and bytes on this rank."""
    if isinstance(a, DTensor) != isinstance(b, DTensor):
        return False
    if isinstance(a, DTensor):
        if (a.placements, a.shape) != (b.placements, b.shape):
            return False
        a, b = a.to_local(), b.to_local()
    return (a.shape == b.shape and a.dtype == b.dtype
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def run_forward(workdir: Path, device: torch.device, figures: dict) -> None:
    """FSDP2 + expert-parallel forward of a tiny Qwen3-MoE on every mesh, against the
    whole model on one device."""
    from forward_ep import ep_forward_logits, reference_logits, save_tiny_model

    rank, world = dist.get_rank(), dist.get_world_size()
    tiny = workdir / "moekit-sharded-gpu-tiny"
    if rank == 0:
        save_tiny_model(tiny, experts=2 * world + 1)
    dist.barrier()
    expected = reference_logits(tiny, device)
    for dp, ep in meshes(world):
        mesh = init_device_mesh(device.type, (dp, ep), mesh_dim_names=("dp", "ep"))
        got = ep_forward_logits(tiny, mesh, device)
        worst = (got - expected).abs().max().item() / expected.abs().max().item()
        worst_all = torch.tensor([worst], device=device)
        dist.all_reduce(worst_all, op=dist.ReduceOp.MAX)
        if rank == 0:
            worst = worst_all.item()
            print(f"FSDP2 + EP forward on dp {dp} x ep {ep}: logits "
                  f"{'identical to' if worst == 0 else f'{worst:.2e} of the largest from'} "
                  f"the whole model's on one device", flush=True)
            figures[f"forward dp {dp} x ep {ep}"] = {"relative_difference": worst_all.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("qwen3", "deepseek_v3_fp8"), default="qwen3")
    parser.add_argument("--size-gib", type=float, default=16.0)
    parser.add_argument("--experts", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--inter", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--workdir", default="/tmp")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--skip", default="", help="comma-separated: loads, saves, forward")
    parser.add_argument("--save-on", default="all", help="the meshes to save_sharded from "
                        "('2x1,1x2': dp x ep), or all")
    parser.add_argument("--json", help="also write the figures to this JSON file (rank 0)")
    args = parser.parse_args()
    defaults = {"qwen3": (127, 1024, 512, 4097), "deepseek_v3_fp8": (255, 7168, 2048, 129280)}
    for name, value in zip(("experts", "hidden", "inter", "vocab"), defaults[args.family]):
        if getattr(args, name) is None:
            setattr(args, name, value)
    skip = set(filter(None, args.skip.split(",")))

    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.save_on == "all":
        args.save_on = ",".join(f"{dp}x{ep}" for dp, ep in meshes(world))
    workdir = Path(args.workdir)
    src = workdir / f"moekit-sharded-gpu-{args.family}"
    if rank == 0 and not src.exists():
        start = time.perf_counter()
        (qwen3_checkpoint if args.family == "qwen3" else deepseek_v3_checkpoint)(src, args)
        warm_page_cache(src)
        size = sum(f.stat().st_size for f in src.iterdir())
        print(f"checkpoint {args.family}: {size / 2**30:.2f} GiB, written in "
              f"{time.perf_counter() - start:.0f} s; {world} ranks"
              f"{', GPU ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}",
              flush=True)
    dist.barrier()
    figures: dict[str, dict] = {}
    if "loads" not in skip:
        run_loads(src, args, device, figures)
    if "saves" not in skip:
        run_saves(src, workdir, device, figures)
    if "forward" not in skip:
        run_forward(workdir, device, figures)
    if rank == 0:
        write_figures(args.json, f"{world} x {torch.cuda.get_device_name()}"
                      if device.type == "cuda" else f"{world} CPU ranks", figures,
                      baseline="a copy into the device's memory (pinned host to GPU; host "
                      "to host on the CPU)", family=args.family, torch=torch.__version__,
                      checkpoint_bytes=sum(f.stat().st_size for f in src.iterdir()))
    leave_process_group()


if __name__ == "__main__":
    main()
