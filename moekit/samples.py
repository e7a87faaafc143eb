"""Tiny seeded sample models, built with transformers from configs (no downloads).

Used by ``moekit demo``, the tests and the benchmarks. transformers is imported only here,
only when a sample is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

_COMMON: dict[str, Any] = dict(vocab_size=96, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=64, tie_word_embeddings=False)

MOE_FAMILIES: dict[str, dict[str, Any]] = {
    "qwen2_moe": dict(moe_intermediate_size=16, shared_expert_intermediate_size=48, num_experts=6,
                      num_experts_per_tok=2, mlp_only_layers=[1]),
    "qwen3_moe": dict(moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2, head_dim=8),
    "mixtral": dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2, eos_token_id=1,
                  pad_token_id=0),
    "deepseek_v3": dict(moe_intermediate_size=16, n_routed_experts=6, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                        v_head_dim=8),
    "phimoe": dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2),
    "nemotron_h": dict(layers_block_type=["moe", "attention", "moe"], head_dim=8,
                       n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
                       moe_shared_expert_intermediate_size=24, n_shared_experts=1),
    "gpt_oss": dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2,
                    head_dim=8, sliding_window=8),
    "llama4_text": dict(intermediate_size=24, intermediate_size_mlp=64, num_local_experts=6,
                        num_experts_per_tok=2, interleave_moe_layer_step=2, head_dim=8),
}
"""Config overrides of one tiny model per supported MoE family."""

DENSE_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {}, "mistral": dict(head_dim=8), "qwen2": {}, "qwen3": dict(head_dim=8),
}


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def build_model(model_type: str, seed: int = 0, **overrides: Any):
    """A tiny randomly initialised transformers model of ``model_type`` (float32, eval).

    Every parameter is drawn from N(0, 0.2) so that routers, norms and biases are all
    non-trivial and a misplaced tensor changes the logits.
    """
    settings = {**_COMMON, **MOE_FAMILIES.get(model_type, DENSE_FAMILIES.get(model_type, {})),
                **overrides}
    return from_config(config_class(model_type)(**settings), seed)


def config_class(model_type: str) -> type:
    """transformers' own config class of ``model_type``, whatever another library has
    registered with AutoConfig in its place (NeMo AutoModel 0.7's model registry, once
    imported, replaces Step-3.7's, Kimi-K2.5's, Kimi-Linear's and others')."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        raise ValueError(f"transformers has no model type {model_type!r}")
    return getattr(transformers, CONFIG_MAPPING_NAMES[model_type])


def from_config(config, seed: int = 0, make: Callable[..., Any] | None = None):
    """The model ``make`` builds from ``config`` (transformers' causal LM by default),
    float32, eval, every parameter drawn from N(0, 0.2) with ``seed``."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    torch.manual_seed(seed)
    model = (make or AutoModelForCausalLM.from_config)(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def save_model(model, path: str | Path, max_shard_size: str = "40KB") -> Path:
    """``save_pretrained`` into several small shards; return the folder."""
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return Path(path)


def sample_input(vocab_size: int, seed: int = 0, length: int = 12) -> torch.Tensor:
    """A fixed batch of token ids."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, length), generator=generator)


def logits(path: str | Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the model ``from_pretrained`` loads from ``path``, read with
    transformers' own config class of its model type (``config_class``)."""
    from transformers import AutoModelForCausalLM, PretrainedConfig

    _quiet_transformers()
    settings, _ = PretrainedConfig.get_config_dict(path)
    config = config_class(settings.get("model_type")).from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids).logits
