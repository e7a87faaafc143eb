"""Benchmark ``moekit convert --to nemo`` against ``cp -r`` of the same bytes.

Builds a synthetic Qwen3-MoE-shaped bf16 checkpoint (default about 2 GiB, 128 experts),
then times ``cp -r`` and ``moekit convert`` (best of --repeat runs each, page cache warm
for both) and reports moekit's peak RSS. Figures are ratios to the baseline measured in
the same run, because the machines are shared and noisy.

    .venv/bin/python benchmarks/convert.py [--size-gib 2] [--experts 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import (add_shape_arguments, build_checkpoint, drop_written,
                    expert_bytes_per_layer, run_measured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser, size_gib=2.0, experts=128)
    parser.add_argument("--to", default="nemo")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", help="where to build the checkpoint (default: a temp dir)")
    args = parser.parse_args()

    layer_bytes = expert_bytes_per_layer(args)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="moekit-bench-") as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        size, layers = build_checkpoint(src, args)
        print(f"checkpoint: {size / 2**30:.2f} GiB, {layers} layers x {args.experts} experts "
              f"(H={args.hidden}, I={args.inter}), bf16, "
              f"{len(list(src.glob('*.safetensors')))} shards")
        cp_times, moekit_times, rss = [], [], []
        moekit = [sys.executable, "-m", "moekit.cli", "convert", str(src), str(dst),
                  "--to", args.to]
        for _ in range(args.repeat):
            cp_times.append(run_measured(["cp", "-r", str(src), str(dst)])[0])
            drop_written(dst)
            seconds, peak = run_measured(moekit)
            moekit_times.append(seconds)
            rss.append(peak)
            drop_written(dst)
        cp_s, mk_s, peak = min(cp_times), min(moekit_times), max(rss)
        print(f"{'':24}{'seconds':>10}{'GB/s':>8}{'ratio':>8}")
        print(f"{'cp -r':24}{cp_s:10.2f}{size / cp_s / 1e9:8.2f}{1.0:8.2f}")
        print(f"{'moekit convert --to ' + args.to:24}{mk_s:10.2f}{size / mk_s / 1e9:8.2f}"
              f"{mk_s / cp_s:8.2f}")
        print(f"moekit peak RSS: {peak / 2**20:.0f} MiB = {100 * peak / size:.1f} % of the "
              f"checkpoint (largest built tensor {layer_bytes * 2 / 3 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
