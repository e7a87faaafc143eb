"""Benchmark start-up: ``moekit convert --help`` and a small conversion, against starting
the Python interpreter alone.

Builds a small synthetic Qwen3-MoE-shaped bf16 checkpoint (default 8 MiB), then times,
best of --repeat runs each: ``python -c pass`` (the baseline), ``moekit convert --help``
and ``moekit convert SRC DST --to nemo`` (transposed: the path that builds tensors) and
``--to transformers`` (copied by the kernel). Neither conversion imports torch.

    .venv/bin/python benchmarks/startup.py [--size-gib 0.0078] [--repeat 5] [--json F]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

from common import add_shape_arguments, build_checkpoint, drop_written, run_measured, write_figures


def best_of(cmd: list[str], repeat: int, dst: Path | None = None) -> tuple[float, int]:
    """(best wall seconds, largest peak RSS) of ``repeat`` runs of ``cmd``."""
    runs = []
    for _ in range(repeat):
        runs.append(run_measured(cmd))
        if dst is not None:
            drop_written(dst)
    return min(s for s, _ in runs), max(rss for _, rss in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser, size_gib=8 / 1024, experts=8, hidden=256, inter=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    moekit = [sys.executable, "-m", "moekit.cli"]
    with tempfile.TemporaryDirectory(prefix="moekit-startup-") as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        size, layers = build_checkpoint(src, args)
        print(f"checkpoint: {size / 2**20:.1f} MiB, {layers} layers x {args.experts} experts")
        rows = {"python -c pass": best_of([sys.executable, "-c", "pass"], args.repeat),
                "moekit convert --help": best_of([*moekit, "convert", "--help"], args.repeat)}
        for layout in ("nemo", "transformers"):
            rows[f"moekit convert --to {layout}"] = best_of(
                [*moekit, "convert", str(src), str(dst), "--to", layout], args.repeat, dst)
    base = rows["python -c pass"][0]
    print(f"{'':34}{'seconds':>10}{'peak RSS MiB':>14}")
    for name, (seconds, peak) in rows.items():
        print(f"{name:34}{seconds:10.3f}{peak / 2**20:14.0f}")
    write_figures(args.json, f"{platform.machine()} {os.cpu_count()} cores",
                  {name: {"seconds": s, "x_baseline": s / base, "peak_rss_bytes": rss}
                   for name, (s, rss) in rows.items()},
                  checkpoint_bytes=size, baseline="python -c pass", repeat=args.repeat)


if __name__ == "__main__":
    main()
