"""Benchmark ``moekit convert --to torchtitan`` against torchtitan's own HF -> DCP
conversion of Qwen3-MoE.

Builds a synthetic Qwen3-MoE-shaped bf16 checkpoint (default 0.5 GiB: hidden 1024, expert
intermediate 256, 64 experts) and writes it as torchtitan 0.3's Qwen3 MoE state dict in a
``torch.distributed.checkpoint`` folder: with ``moekit convert --to torchtitan``
(streaming), once with ``--max-shard-size`` ``--shard`` and once with its default, and as
torchtitan's conversion script (``scripts/checkpoint_conversion/convert_from_hf.py``)
does, with torchtitan's own ``Qwen3StateDictAdapter.from_hf`` on the loaded HF state dict
followed by ``dcp.save``. Each is timed and its peak RSS measured in a process of its
own, page cache warm; the figures are ratios to torchtitan's, measured in the same run
because the machines are shared and noisy. The folders are then checked to hold the same
bytes under every name torchtitan wrote. ``--json FILE`` writes the
figures as JSON too.

    .venv/bin/python benchmarks/torchtitan_convert.py [--size-gib 0.5] [--shard 256MB] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

from common import (add_shape_arguments, build_checkpoint, drop_written, run_measured,
                    warm_page_cache, write_figures)

BASELINE = "torchtitan from_hf + dcp.save"
MOEKIT = "moekit convert --to torchtitan"


def torchtitan_convert(src: Path, dst: Path) -> None:
    """torchtitan 0.3's HF -> DCP conversion of a Qwen3-MoE checkpoint, as its conversion
    script does it: the whole HF state dict in memory, ``from_hf`` of its state-dict
    adapter (which stacks each layer's experts), ``dcp.save``. The model config is built
    with the helpers torchtitan's model registry uses (``_30b_a3b`` in
    ``torchtitan/models/qwen3/__init__.py``)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torchtitan.models import qwen3 as tt
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear

    config = json.loads((src / "config.json").read_text())
    dim, vocab = config["hidden_size"], config["vocab_size"]
    titan = tt.Qwen3Model.Config(
        vocab_size=vocab, dim=dim, norm=tt._qwen3_norm(dim),
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim,
                                        param_init=tt._EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=tt._LINEAR_INIT),
        layers=tt._build_qwen3_moe_layers(
            n_layers=config["num_hidden_layers"], dim=dim, n_heads=config["num_attention_heads"],
            n_kv_heads=config["num_key_value_heads"], head_dim=config["head_dim"],
            moe_hidden_dim=config["moe_intermediate_size"], num_experts=config["num_experts"],
            top_k=config["num_experts_per_tok"], attn_backend="flex",
            moe_comm_backend="standard",
            rope=CosSinRoPE.Config(dim=config["head_dim"],
                                   max_seq_len=config["max_position_embeddings"])))
    hf: dict[str, torch.Tensor] = {}
    for file in sorted(src.glob("*.safetensors")):
        hf.update(load_file(file))
    state = tt.Qwen3StateDictAdapter(titan, None).from_hf(hf)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.save(state, checkpoint_id=dst, no_dist=True)


def check_same(titan: Path, moekit: Path) -> int:
    """Raise unless every tensor torchtitan wrote is in moekit's folder with the same
    shape, dtype and bytes; return how many were compared."""
    import torch
    import torch.distributed.checkpoint as dcp

    theirs = dcp.FileSystemReader(titan).read_metadata().state_dict_metadata
    ours = dcp.FileSystemReader(moekit).read_metadata().state_dict_metadata
    missing = sorted(set(theirs) - set(ours))
    if missing:
        raise RuntimeError(f"moekit's folder lacks {missing[:3]}")
    loaded = []
    for folder, metadata in ((titan, theirs), (moekit, ours)):
        state = {k: torch.empty(tuple(metadata[k].size), dtype=metadata[k].properties.dtype)
                 for k in theirs}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(state, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
        loaded.append(state)
    for key, a in loaded[0].items():
        b = loaded[1][key]
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(
                a.view(torch.uint8), b.view(torch.uint8)):
            raise RuntimeError(f"{key} differs between torchtitan's and moekit's folders")
    return len(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser, size_gib=0.5, experts=64)
    parser.add_argument("--shard", default="256MB",
                        help="the --max-shard-size of moekit's second run: DCP keeps a "
                             ".distcp file's tensors until the file is written, so this "
                             "bounds moekit's memory (the default, 5GB, holds a smaller "
                             "model whole)")
    parser.add_argument("--workdir", help="where to build the checkpoint (default: a temp dir)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--torchtitan", nargs=2, metavar=("SRC", "DST"),
                        help="only run torchtitan's conversion of SRC into DST (the baseline "
                             "this script measures in a process of its own)")
    args = parser.parse_args()
    if args.torchtitan:
        torchtitan_convert(*map(Path, args.torchtitan))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="moekit-bench-") as tmp:
        src, titan, ours = Path(tmp) / "src", Path(tmp) / "titan", Path(tmp) / "moekit"
        size, layers = build_checkpoint(src, args, full_config=True)
        print(f"checkpoint: {size / 2**30:.2f} GiB, {layers} layers x {args.experts} experts "
              f"(H={args.hidden}, I={args.inter}), bf16")
        warm_page_cache(src)
        moekit = [sys.executable, "-m", "moekit.cli", "convert", str(src), str(ours),
                  "--to", "torchtitan"]
        rows = {BASELINE: run_measured([sys.executable, __file__, "--torchtitan", str(src),
                                        str(titan)])}
        rows[f"{MOEKIT} --max-shard-size {args.shard}"] = run_measured(
            [*moekit, "--max-shard-size", args.shard])
        drop_written(ours)
        rows[MOEKIT] = run_measured(moekit)
        compared = check_same(titan, ours)
    base_seconds, base_rss = rows[BASELINE]
    print(f"{'':54}{'seconds':>10}{'ratio':>8}{'peak RSS MiB':>14}{'ratio':>8}")
    for name, (seconds, peak) in rows.items():
        print(f"{name:54}{seconds:10.2f}{seconds / base_seconds:8.2f}{peak / 2**20:14.0f}"
              f"{peak / base_rss:8.2f}")
    print(f"same bytes under all {compared} names torchtitan wrote")
    write_figures(args.json, f"{platform.machine()} {os.cpu_count()} cores",
                  {name: {"seconds": s, "ratio": s / base_seconds, "peak_rss_bytes": rss,
                          "peak_rss_ratio": rss / base_rss,
                          "peak_rss_of_checkpoint": rss / size}
                   for name, (s, rss) in rows.items()},
                  checkpoint_bytes=size, baseline=BASELINE, tensors_compared=compared)


if __name__ == "__main__":
    main()
