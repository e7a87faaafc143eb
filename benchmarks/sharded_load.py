"""Benchmark whole-model sharded loading against load_experts: per-rank bytes read,
seconds and peak RSS for world sizes 1, 2, 4, 8; and saving back with save_sharded.

Builds a synthetic Qwen3-MoE-shaped bf16 checkpoint, then for each world size spawns that
many processes (gloo, CPU) twice: once calling ``moekit.load_sharded`` on a (dp, ep) mesh
(ep = min(--ep, world)) and then ``moekit.save_sharded`` of what it loaded (an HF
safetensors checkpoint), once calling ``moekit.load_experts`` on a 1-D "ep" mesh of the
whole world, which reads every non-expert tensor whole on every rank. Each rank reports
the bytes its reader was asked for, its load time and its peak RSS, and for the sharded
run the tensor bytes it wrote and its save time. Targets: the bytes load_sharded reads,
and the bytes save_sharded writes, summed over the ranks, equal the checkpoint's tensor
bytes.

    .venv/bin/python benchmarks/sharded_load.py [--size-gib 1] [--worlds 1,2,4,8] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp
from common import add_shape_arguments, build_checkpoint, leave_process_group, write_figures
from torch.distributed.device_mesh import init_device_mesh

LOADERS = ("load_sharded", "load_experts")


def worker(rank: int, world: int, store: str, src: str, results: str, loader: str,
           ep: int) -> None:
    import moekit
    from moekit.sources import FileSource

    read_bytes = [0]
    original = FileSource.read

    def read(self, region):
        read_bytes[0] += self.block_bytes(region)
        return original(self, region)

    FileSource.read = read
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    if loader == "load_sharded":
        mesh = init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=("dp", "ep"))
        start = time.perf_counter()
        state = moekit.load_sharded(src, mesh, layout="nemo")
    else:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
        start = time.perf_counter()
        state = moekit.load_experts(src, mesh, layout="nemo")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {"bytes": read_bytes[0], "seconds": seconds, "peak": peak, "tensors": len(state)}
    if loader == "load_sharded":
        row.update(_save(state, mesh, src, Path(results, f"saved-{world}")))
    Path(results, f"{loader}-{world}-{rank}.json").write_text(json.dumps(row))
    leave_process_group()


def _save(state: dict, mesh, src: str, out: Path) -> dict[str, float]:
    """save_sharded of ``state`` into ``out`` as safetensors: the tensor bytes this rank
    wrote and its seconds."""
    import moekit
    import moekit.expert_parallel.sharded_save as sharded_save

    written = [0]
    pwrite = sharded_save._pwrite_all

    def counting(fd: int, tensor, offset: int) -> None:
        written[0] += tensor.nbytes
        pwrite(fd, tensor, offset)

    sharded_save._pwrite_all = counting
    start = time.perf_counter()
    moekit.save_sharded(state, out, mesh, layout="nemo", config_from=src)
    return {"written": written[0], "save_seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser, size_gib=1.0, experts=64)
    parser.add_argument("--worlds", default="1,2,4,8")
    parser.add_argument("--ep", type=int, default=2, help="EP size of load_sharded's mesh")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="moekit-sharded-bench-") as tmp:
        src = Path(tmp) / "src"
        size, layers = build_checkpoint(src, args)
        tensor_bytes = sum(_tensor_bytes(f) for f in src.glob("*.safetensors"))
        print(f"checkpoint: {size / 2**30:.2f} GiB, {layers} layers x {args.experts} experts, "
              f"{tensor_bytes / 2**20:.1f} MiB of tensors, bf16")
        print(f"{'loader':>13} {'world':>5} {'rank':>5} {'read MiB':>9} {'peak RSS MiB':>13} "
              f"{'load s':>7} {'written MiB':>12} {'save s':>7}")
        for world in (int(n) for n in args.worlds.split(",")):
            ep = min(args.ep, world)
            if world % ep:
                raise SystemExit(f"world size {world} is not a multiple of --ep {ep}")
            for loader in LOADERS:
                store = Path(tmp) / f"store-{loader}-{world}"
                mp.spawn(worker, args=(world, str(store), str(src), tmp, loader, ep),
                         nprocs=world, join=True)
                rows = [json.loads(Path(tmp, f"{loader}-{world}-{r}.json").read_text())
                        for r in range(world)]
                _check(loader, world, rows, tensor_bytes, Path(tmp, f"saved-{world}"))
                for rank, r in enumerate(rows):
                    saved = (f"{r['written'] / 2**20:12.1f} {r['save_seconds']:7.2f}"
                             if "written" in r else "")
                    print(f"{loader:>13} {world:>5} {rank:>5} {r['bytes'] / 2**20:9.1f} "
                          f"{r['peak'] / 2**20:13.0f} {r['seconds']:7.2f} {saved}")
                    figures[f"{loader} world {world} rank {rank}"] = {
                        "bytes_read": r["bytes"], "share": r["bytes"] / tensor_bytes,
                        "peak_rss_bytes": r["peak"], "seconds": r["seconds"],
                        **({"bytes_written": r["written"], "save_seconds": r["save_seconds"]}
                           if "written" in r else {})}
    write_figures(args.json, f"{platform.machine()} {os.cpu_count()} cores", figures,
                  checkpoint_bytes=size, tensor_bytes=tensor_bytes,
                  baseline="load_experts on a 1-D ep mesh of the whole world")


def _tensor_bytes(file: Path) -> int:
    """Bytes of a safetensors file's tensor data: the file less its 8-byte length and header."""
    with file.open("rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return file.stat().st_size - 8 - header


def _check(loader: str, world: int, rows: list[dict], tensor_bytes: int, saved: Path
           ) -> None:
    """load_sharded's ranks read every tensor byte once between them, and save_sharded's
    wrote each once, into a checkpoint of the same tensor bytes (then removed)."""
    if loader != "load_sharded":
        return
    read, written = sum(r["bytes"] for r in rows), sum(r["written"] for r in rows)
    if read != tensor_bytes:
        raise SystemExit(f"load_sharded on {world} ranks read {read:,} bytes; the "
                         f"checkpoint holds {tensor_bytes:,}")
    on_disk = sum(_tensor_bytes(f) for f in saved.glob("*.safetensors"))
    if written != tensor_bytes or on_disk != tensor_bytes:
        raise SystemExit(f"save_sharded on {world} ranks wrote {written:,} bytes into "
                         f"{on_disk:,} bytes of tensors; the checkpoint holds {tensor_bytes:,}")
    shutil.rmtree(saved)


if __name__ == "__main__":
    main()
