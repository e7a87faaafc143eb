"""The CPU benchmarks run at a tiny size and write their figures as JSON, so that they do
not rot between the runs that measure with them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
TINY = ["--size-gib", "0.002", "--experts", "4", "--hidden", "64", "--inter", "32"]


@pytest.mark.parametrize("script,args,rows", [
    ("convert.py", [*TINY, "--repeat", "1", "--to", "nemo", "transformers"],
     {"cp -r", "cp -r && sync", "moekit convert --to nemo", "moekit convert --to transformers"}),
    ("upcycle.py", ["--size-gib", "0.002", "--hidden", "64", "--inter", "128", "--experts", "2",
                    "--top-k", "1"],
     {"cp -r of the output", "moekit upcycle"}),
    ("ep_load.py", [*TINY, "--ep", "2"], {"EP 2 rank 0", "EP 2 rank 1"}),
    ("sharded_load.py", [*TINY, "--worlds", "2"],
     {"load_sharded world 2 rank 0", "load_sharded world 2 rank 1",
      "load_experts world 2 rank 0", "load_experts world 2 rank 1"}),
    ("startup.py", [*TINY, "--repeat", "1"],
     {"python -c pass", "moekit convert --help", "moekit convert --to nemo",
      "moekit convert --to transformers"}),
    ("merge.py", ["--size-gib", "0.002", "--hidden", "64", "--inter", "128", "--experts", "2"],
     {"mergekit-moe", "moekit merge"}),
    ("torchtitan_convert.py", ["--size-gib", "0.0002", "--experts", "4", "--hidden", "64",
                               "--inter", "32", "--shard", "20KB"],
     {"torchtitan from_hf + dcp.save", "moekit convert --to torchtitan",
      "moekit convert --to torchtitan --max-shard-size 20KB"}),
    ("megatron_convert.py", ["--size-gib", "0.0002", "--experts", "4", "--hidden", "64",
                             "--inter", "32", "--shard", "20KB"],
     {"megatron-core GPTModel + dist_checkpointing.save", "moekit convert --to megatron",
      "moekit convert --to megatron --max-shard-size 20KB"}),
])
def test_a_benchmark_runs_and_writes_its_figures(tmp_path, script, args, rows):
    figures_file = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, script, *args, "--json", str(figures_file)],
                          cwd=BENCHMARKS, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    figures = json.loads(figures_file.read_text())
    assert {"machine", "commit", "date", "baseline"} <= figures.keys()
    assert set(figures["rows"]) == rows
    values = [v for row in figures["rows"].values() for v in row.values()]
    assert values and all(math.isfinite(v) and v >= 0 for v in values)


def test_the_multi_gpu_benchmark_runs_on_cpu_ranks(tmp_path):
    """sharded_gpu.py under torchrun with two gloo ranks: every load equals moekit's CPU
    path and reads each byte once, every save reads back as what was saved, and the FSDP2 + EP
    forward gives the whole model's logits (an FP8 DeepSeek-V3 shape skips the forward)."""
    for family, shape in (("qwen3", ["--experts", "5", "--hidden", "64", "--inter", "32"]),
                          ("deepseek_v3_fp8", ["--experts", "5", "--hidden", "256", "--inter",
                                               "128", "--vocab", "301", "--skip", "forward"])):
        figures_file = tmp_path / f"{family}.json"
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc-per-node", "2", "sharded_gpu.py", "--device", "cpu", "--family", family,
             "--size-gib", "0.002", *shape, "--workdir", str(tmp_path),
             "--json", str(figures_file)],
            cwd=BENCHMARKS, capture_output=True, text=True, timeout=300,
            env={**os.environ, "TMPDIR": str(tmp_path)})  # torchrun leaves its log folder
        assert done.returncode == 0, done.stderr[-3000:]
        rows = json.loads(figures_file.read_text())["rows"]
        assert {"dp 2 x ep 1 all ranks", "dp 1 x ep 2 all ranks", "save_experts dcp on ep 2",
                "save_experts safetensors on ep 2", "save_sharded dcp on dp 2 x ep 1",
                "save_sharded safetensors on dp 1 x ep 2"} <= rows.keys()
        assert all(row.get("equal_to_cpu_path", True) and row.get("read_once", True)
                   and row.get("equal_to_source", True) for row in rows.values())
        forward = [row for key, row in rows.items() if key.startswith("forward")]
        assert len(forward) == (2 if family == "qwen3" else 0)
        assert all(row["relative_difference"] == 0 for row in forward)
