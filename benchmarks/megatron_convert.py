"""Benchmark ``moekit convert --to megatron`` against megatron-core's own ``torch_dist``
save of a Qwen3-MoE loaded in memory.

Builds a synthetic Qwen3-MoE-shaped bf16 checkpoint (default 0.5 GiB: hidden 1024, expert
intermediate 256, 64 experts) and writes it as a Megatron-Core 0.16.1 ``torch_dist``
checkpoint: with ``moekit convert --to megatron`` (streaming), once with
``--max-shard-size`` ``--shard`` and once with its default; and as a user of megatron-core
alone does (Megatron-Bridge does not install here): the whole HF state dict in memory,
megatron-core's GPTModel built (local layer spec, bf16, no initialisation), its parameters
filled from the HF tensors (QKV interleaved by query group, fc1 = cat(gate, up)), and
``dist_checkpointing.save(model.sharded_state_dict())``. Each is timed and its peak RSS
measured in a process of its own, page cache warm; the figures are ratios to
megatron-core's, measured in the same run because the machines are shared and noisy. The
folders are then checked to hold the same tensors (names, chunks and bytes) and objects.
``--json FILE`` writes the figures as JSON too.

    .venv/bin/python benchmarks/megatron_convert.py [--size-gib 0.5] [--shard 256MB] [--json F]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from common import add_convert_arguments, compare_convert, read_dcp

BASELINE = "megatron-core GPTModel + dist_checkpointing.save"
ITERATION = "iter_0000000"


def _megatron_model(config: dict):
    """megatron-core's GPTModel of the synthetic Qwen3-MoE, bf16, uninitialised."""
    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    experts = config["num_experts"]
    transformer = TransformerConfig(
        num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
        num_attention_heads=config["num_attention_heads"],
        num_query_groups=config["num_key_value_heads"], kv_channels=config["head_dim"],
        ffn_hidden_size=config["intermediate_size"], gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, normalization="RMSNorm",
        qk_layernorm=True, num_moe_experts=experts, moe_router_topk=config["num_experts_per_tok"],
        moe_ffn_hidden_size=config["moe_intermediate_size"], use_cpu_initialization=True,
        perform_initialization=False, params_dtype=torch.bfloat16, bf16=True)
    spec = get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False, qk_layernorm=True)
    return GPTModel(config=transformer, transformer_layer_spec=spec,
                    vocab_size=config["vocab_size"],
                    max_sequence_length=config["max_position_embeddings"],
                    position_embedding_type="rope", share_embeddings_and_output_weights=False)


def _megatron_tensors(hf: dict, config: dict) -> dict:
    """The HF tensors under the megatron-core model's ``state_dict`` names, as a converter
    that holds the whole state dict makes them."""
    import torch

    groups = config["num_key_value_heads"]
    head_dim = config["head_dim"]
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"],
           "output_layer.weight": hf["lm_head.weight"]}
    for layer in range(config["num_hidden_layers"]):
        at, to = f"model.layers.{layer}", f"decoder.layers.{layer}"
        q, k, v = (hf[f"{at}.self_attn.{p}_proj.weight"] for p in "qkv")
        out[f"{to}.self_attention.linear_qkv.weight"] = torch.cat(
            [q.view(groups, -1, q.shape[1]), k.view(groups, head_dim, -1),
             v.view(groups, head_dim, -1)], dim=1).flatten(0, 1)
        for mine, theirs in (("self_attention.linear_proj", "self_attn.o_proj"),
                             ("self_attention.q_layernorm", "self_attn.q_norm"),
                             ("self_attention.k_layernorm", "self_attn.k_norm"),
                             ("input_layernorm", "input_layernorm"),
                             ("pre_mlp_layernorm", "post_attention_layernorm"),
                             ("mlp.router", "mlp.gate")):
            out[f"{to}.{mine}.weight"] = hf[f"{at}.{theirs}.weight"]
        for e in range(config["num_experts"]):
            expert, local = f"{at}.mlp.experts.{e}", f"{to}.mlp.experts.local_experts.{e}"
            out[f"{local}.linear_fc1.weight"] = torch.cat(
                [hf[f"{expert}.gate_proj.weight"], hf[f"{expert}.up_proj.weight"]])
            out[f"{local}.linear_fc2.weight"] = hf[f"{expert}.down_proj.weight"]
    return out


def megatron_convert(src: Path, dst: Path) -> None:
    """The HF checkpoint ``src`` loaded into megatron-core's model in memory and saved by
    megatron-core's ``dist_checkpointing.save`` into ``dst`` (one gloo process)."""
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from safetensors.torch import load_file

    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{dst}.store", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    # megatron-core's checkpoint writer waits for CUDA before writing and gathers its
    # ranks' failures on the current CUDA device (no GPU here: the CPU).
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    config = json.loads((src / "config.json").read_text())
    hf: dict[str, torch.Tensor] = {}
    for file in sorted(src.glob("*.safetensors")):
        hf.update(load_file(file))
    model = _megatron_model(config)
    model.load_state_dict(_megatron_tensors(hf, config), strict=False)
    del hf
    dst.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(dst))
    dist.destroy_process_group()


def check_same(theirs: Path, ours: Path) -> tuple[int, str]:
    """Raise unless both folders hold the same keys, each tensor with the same chunks and
    bytes (read by DCP itself); return how many entries were compared, and a sentence
    saying so."""
    import torch
    import torch.distributed.checkpoint as dcp

    metadata = [dcp.FileSystemReader(f).read_metadata().state_dict_metadata
                for f in (theirs, ours)]
    if metadata[0].keys() != metadata[1].keys():
        raise RuntimeError(f"the folders' keys differ: "
                           f"{sorted(metadata[0].keys() ^ metadata[1].keys())[:3]}")
    for key, entry in metadata[0].items():
        mine = metadata[1][key]
        if hasattr(entry, "chunks") and sorted(
                (tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks) != sorted(
                (tuple(c.offsets), tuple(c.sizes)) for c in mine.chunks):
            raise RuntimeError(f"{key} is saved in other chunks")
    megatron, moekit = (read_dcp(folder, metadata[0]) for folder in (theirs, ours))
    for key, a in megatron.items():
        if not torch.equal(a.view(torch.uint8), moekit[key].view(torch.uint8)):
            raise RuntimeError(f"{key} differs between megatron-core's and moekit's folders")
    compared = len(metadata[0])
    return compared, (f"same tensors, chunks and objects under all {compared} keys "
                      "megatron-core wrote")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_convert_arguments(parser, "megatron", "megatron-core's save")
    args = parser.parse_args()
    if args.megatron:
        megatron_convert(*map(Path, args.megatron))
        return
    compare_convert(args, __file__, BASELINE, "megatron", check_same, ITERATION)


if __name__ == "__main__":
    main()
