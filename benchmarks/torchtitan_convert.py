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
import warnings
from pathlib import Path

from common import add_convert_arguments, compare_convert, read_dcp

BASELINE = "torchtitan from_hf + dcp.save"


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


def check_same(titan: Path, moekit: Path) -> tuple[int, str]:
    """Raise unless every tensor torchtitan wrote is in moekit's folder with the same
    shape, dtype and bytes; return how many were compared, and a sentence saying so."""
    import torch
    import torch.distributed.checkpoint as dcp

    theirs = dcp.FileSystemReader(titan).read_metadata().state_dict_metadata
    ours = dcp.FileSystemReader(moekit).read_metadata().state_dict_metadata
    missing = sorted(set(theirs) - set(ours))
    if missing:
        raise RuntimeError(f"moekit's folder lacks {missing[:3]}")
    torchtitan = read_dcp(titan, theirs)
    mine = read_dcp(moekit, {key: ours[key] for key in theirs})
    for key, a in torchtitan.items():
        b = mine[key]
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(
                a.view(torch.uint8), b.view(torch.uint8)):
            raise RuntimeError(f"{key} differs between torchtitan's and moekit's folders")
    return len(theirs), f"same bytes under all {len(theirs)} names torchtitan wrote"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_convert_arguments(parser, "torchtitan", "torchtitan's conversion")
    args = parser.parse_args()
    if args.torchtitan:
        torchtitan_convert(*map(Path, args.torchtitan))
        return
    compare_convert(args, __file__, BASELINE, "torchtitan", check_same)


if __name__ == "__main__":
    main()
