"""Time moekit's header-only commands on a full-scale DeepSeek-V3 checkpoint.

The checkpoint is a header-exact replica (91,991 tensors in 163 shards, FP8 with block
scales, the MTP layer; 688.6 GB logical as sparse files, a few MB on disk): the folder
given, or one written into a temporary folder from DeepSeek-V3's config.json with
``moekit.config_headers`` (the tensors its Hub checkpoint holds). Timed, best of
--repeat runs, each a fresh process: reading every shard's header with safetensors (the
baseline: the least any tool that looks at every tensor does), ``inspect``,
``convert --dry-run``, ``plan --ep 64`` from the headers and ``plan --ep 64 --dp 4``
from the config.json alone. ``--json FILE`` writes the figures as JSON too.

    .venv/bin/python benchmarks/plan_scale.py [REPLICA] [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path

from common import run_measured, write_figures

from moekit.checkpoint import INDEX_NAME
from moekit.config_headers import config_headers
from moekit.plan import nbytes
from moekit.safetensors_writer import header_bytes

CONFIG = Path(__file__).parent.parent / "tests" / "data" / "deepseek_v3_671b_config.json"
SHARDS = 163
BASELINE_ROW = "safetensors: every header (baseline)"
BASELINE = """
import sys
from pathlib import Path
from safetensors import safe_open
for file in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(str(file), framework="numpy") as handle:
        handle.offset_keys()
"""


def write_replica(folder: Path, config_file: Path = CONFIG, shards: int = SHARDS) -> int:
    """A checkpoint of ``config_file``'s tensors in ``shards`` sparse files (valid
    safetensors whose data sections are holes); return its logical bytes."""
    config = json.loads(config_file.read_text())
    tensors = list(config_headers(config, str(config_file)).items())
    folder.mkdir(parents=True)
    per_shard = math.ceil(len(tensors) / shards)
    weight_map, total = {}, 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        entries = [(key, meta.dtype, meta.shape)
                   for key, meta in tensors[s * per_shard:(s + 1) * per_shard]]
        header = header_bytes(entries, {"format": "pt"})
        size = sum(nbytes(shape, dtype) for _, dtype, shape in entries)
        with open(folder / name, "wb") as handle:
            handle.write(header)
            handle.truncate(len(header) + size)
        weight_map.update(dict.fromkeys((key for key, _, _ in entries), name))
        total += size
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                 "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    return total


def commands(replica: Path, out: Path) -> dict[str, list[str]]:
    """Row name -> the command timed."""
    moekit = [sys.executable, "-m", "moekit.cli"]
    return {
        BASELINE_ROW: [sys.executable, "-c", BASELINE, str(replica)],
        "moekit inspect": [*moekit, "inspect", str(replica)],
        "moekit convert --to transformers --dry-run": [
            *moekit, "convert", str(replica), str(out), "--to", "transformers", "--dry-run"],
        "moekit plan --ep 64": [*moekit, "plan", str(replica), "--ep", "64"],
        "moekit plan config.json --ep 64 --dp 4": [
            *moekit, "plan", str(replica / "config.json"), "--ep", "64", "--dp", "4"],
    }


def measure(replica: Path, repeat: int) -> dict[str, dict[str, float]]:
    """Best wall seconds and largest peak RSS of each command, and the ratio of its
    seconds to the baseline's."""
    rows: dict[str, dict[str, float]] = {}
    for name, cmd in commands(replica, replica.parent / "converted").items():
        runs = [run_measured(cmd) for _ in range(repeat)]
        rows[name] = {"seconds": min(s for s, _ in runs),
                      "peak_rss_bytes": max(r for _, r in runs)}
    base = rows[BASELINE_ROW]["seconds"]
    for row in rows.values():
        row["ratio"] = row["seconds"] / base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("replica", nargs="?", type=Path,
                        help="a header-exact DeepSeek-V3 checkpoint folder (default: write "
                        "one into a temporary folder)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        replica = args.replica or Path(tmp) / "deepseek-v3"
        if args.replica is None:
            write_replica(replica)
        index = json.loads((replica / INDEX_NAME).read_text())
        rows = measure(replica, args.repeat)
    print(f"{len(index['weight_map']):,} tensors, "
          f"{index['metadata']['total_size'] / 1e9:.1f} GB logical, best of {args.repeat}")
    print(f"{'':44} {'seconds':>8} {'ratio':>6} {'peak RSS MiB':>13}")
    for name, row in rows.items():
        print(f"{name:44} {row['seconds']:8.2f} {row['ratio']:6.2f} "
              f"{row['peak_rss_bytes'] / 2**20:13.0f}")
    write_figures(args.json, f"{platform.machine()} {os.cpu_count()} cores", rows,
                  tensors=len(index["weight_map"]),
                  logical_bytes=index["metadata"]["total_size"], baseline=BASELINE_ROW,
                  repeat=args.repeat)


if __name__ == "__main__":
    main()
