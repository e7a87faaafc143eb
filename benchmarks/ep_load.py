"""Benchmark expert-parallel loading: per-rank bytes read and peak RSS for EP = 1, 2, 4.

Builds a synthetic Qwen3-MoE-shaped bf16 checkpoint, then for each EP size spawns that many
processes (gloo, CPU); each calls ``moekit.load_experts`` and reports the bytes its reader
was asked for (experts and the rest) and its peak RSS. Target: expert bytes per rank about
1/EP of the total, peak RSS falling with EP.

    .venv/bin/python benchmarks/ep_load.py [--size-gib 1] [--experts 64] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import tempfile
import time
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp
from common import add_shape_arguments, build_checkpoint, leave_process_group, write_figures
from torch.distributed.device_mesh import init_device_mesh


def worker(rank: int, world: int, store: str, src: str, results: str) -> None:
    from moekit import load_experts
    from moekit.sources import FileSource

    counts = {"experts": 0, "other": 0}
    original = FileSource.read

    def read(self, region):
        tensor = original(self, region)
        kind = "experts" if re.search(r"\.experts\.", region.key) else "other"
        counts[kind] += tensor.numel() * tensor.element_size()
        return tensor

    FileSource.read = read
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    start = time.perf_counter()
    state = load_experts(src, mesh, layout="nemo")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(results, f"{world}-{rank}.json").write_text(json.dumps(
        {**counts, "seconds": seconds, "peak": peak, "tensors": len(state)}))
    leave_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser, size_gib=1.0, experts=64)
    parser.add_argument("--ep", default="1,2,4")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="moekit-ep-bench-") as tmp:
        src = Path(tmp) / "src"
        size, layers = build_checkpoint(src, args)
        print(f"checkpoint: {size / 2**30:.2f} GiB, {layers} layers x {args.experts} experts, bf16")
        print(f"{'EP':>3} {'rank':>5} {'expert MiB':>11} {'1/EP share':>11} {'other MiB':>10} "
              f"{'peak RSS MiB':>13} {'load s':>7}")
        for world in (int(n) for n in args.ep.split(",")):
            store = Path(tmp) / f"store-{world}"
            mp.spawn(worker, args=(world, str(store), str(src), tmp), nprocs=world, join=True)
            rows = [json.loads(Path(tmp, f"{world}-{r}.json").read_text()) for r in range(world)]
            total_experts = sum(r["experts"] for r in rows)
            for rank, r in enumerate(rows):
                print(f"{world:>3} {rank:>5} {r['experts'] / 2**20:11.1f} "
                      f"{r['experts'] / total_experts:11.3f} {r['other'] / 2**20:10.1f} "
                      f"{r['peak'] / 2**20:13.0f} {r['seconds']:7.2f}")
                figures[f"EP {world} rank {rank}"] = {
                    "expert_bytes": r["experts"], "share": r["experts"] / total_experts,
                    "other_bytes": r["other"], "peak_rss_bytes": r["peak"],
                    "seconds": r["seconds"]}
    write_figures(args.json, f"{platform.machine()} {os.cpu_count()} cores", figures,
                  checkpoint_bytes=size, baseline="1/EP of the expert bytes")


if __name__ == "__main__":
    main()
