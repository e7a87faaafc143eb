"""The CPU benchmarks run at a tiny size and write their figures as JSON, so that they do
not rot between the runs that measure with them."""

from __future__ import annotations

import json
import math
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
