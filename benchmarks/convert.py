"""Benchmark ``moekit convert`` against copying the same bytes with ``cp -r`` and ``sync``.

Builds a synthetic Qwen3-MoE-shaped bf16 checkpoint (default 2.3 GiB: hidden 1024, expert
intermediate 512, 128 experts, 6 layers), then times, best of --repeat runs each, page
cache warm for all: ``cp -r`` alone,
``cp -r && sync`` (the baseline: moekit fsyncs every file it writes before it calls the
output written, so the fair copy is one whose bytes are on the disk too) and
``moekit convert`` into each ``--to`` layout, and reports moekit's peak RSS. Figures are
ratios to the baseline measured in the same run, because the machines are shared and
noisy; ``--json FILE`` writes them as JSON too.

    .venv/bin/python benchmarks/convert.py [--size-gib 2.3] [--to nemo transformers] [--json F]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

from common import add_shape_arguments, build_checkpoint, drop_written, run_measured, write_figures


def best_of(cmd: list[str], dst: Path, repeat: int) -> tuple[float, int]:
    """(best wall seconds, largest peak RSS) of ``repeat`` runs of ``cmd`` writing ``dst``."""
    runs = []
    for _ in range(repeat):
        runs.append(run_measured(cmd))
        drop_written(dst)
    return min(s for s, _ in runs), max(rss for _, rss in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser, size_gib=2.3, experts=128, inter=512)
    parser.add_argument("--to", nargs="+", default=["nemo", "transformers"])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", help="where to build the checkpoint (default: a temp dir)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="moekit-bench-") as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        size, layers = build_checkpoint(src, args)
        print(f"checkpoint: {size / 2**30:.2f} GiB, {layers} layers x {args.experts} experts "
              f"(H={args.hidden}, I={args.inter}), bf16, "
              f"{len(list(src.glob('*.safetensors')))} shards")
        baseline = ["sh", "-c", 'cp -r "$0" "$1" && sync', str(src), str(dst)]
        rows = {"cp -r": best_of(["cp", "-r", str(src), str(dst)], dst, args.repeat),
                "cp -r && sync": best_of(baseline, dst, args.repeat)}
        for layout in args.to:
            rows[f"moekit convert --to {layout}"] = best_of(
                [sys.executable, "-m", "moekit.cli", "convert", str(src), str(dst), "--to", layout],
                dst, args.repeat)
    base = rows["cp -r && sync"][0]
    print(f"{'':34}{'seconds':>10}{'GB/s':>8}{'ratio':>8}{'peak RSS MiB':>14}")
    for name, (seconds, peak) in rows.items():
        print(f"{name:34}{seconds:10.2f}{size / seconds / 1e9:8.2f}{seconds / base:8.2f}"
              f"{peak / 2**20:14.0f}")
    write_figures(args.json, f"{platform.machine()} {os.cpu_count()} cores",
                  {name: {"seconds": s, "gb_per_s": size / s / 1e9, "ratio": s / base,
                          "peak_rss_bytes": rss, "peak_rss_of_checkpoint": rss / size}
                   for name, (s, rss) in rows.items()},
                  checkpoint_bytes=size, baseline="cp -r && sync", repeat=args.repeat)


if __name__ == "__main__":
    main()
