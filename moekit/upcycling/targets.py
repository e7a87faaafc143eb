"""Dense families moekit upcycles, the MoE families it writes, and their config.json.

Targets are data: key naming comes from the MoE family (``moekit.layouts.families``),
config entries from the fields below. Adding a target is adding an entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import MoekitError
from ..layouts.families import Family, family_named
from .spec import UpcycleSpec
from .windows import WINDOW_KEYS, Windows, target_settings

DENSE_PROJECTIONS = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
"""Module names of a dense MLP's projections (``model.layers.N.mlp.*`` in Llama, Mistral,
Qwen2 and Qwen3), also used by the Qwen-MoE shared expert."""


@dataclass(frozen=True)
class SharedExpert:
    """A target's shared expert: module names inside the MoE block and its size entry."""

    module: str
    size_key: str
    gate: str | None = None
    """A sigmoid gate on the shared expert's output ([1, H] weight), if the family has one."""
    required: bool = False
    """True when every MoE block of the family has one (Qwen2-MoE)."""


@dataclass(frozen=True)
class Target:
    """An MoE family moekit can write from a dense model."""

    family: str
    architecture: str
    dense_types: tuple[str, ...]
    """Dense model_types whose attention, norms and embeddings this family holds as they are."""
    intermediate_key: str
    """config.json entry of the routed experts' intermediate size."""
    attention_bias_key: str | None
    """config.json switch for attention biases; None when the family has none."""
    attention_biases: tuple[str, ...] = ()
    """The attention projections that may carry a bias."""
    shared: SharedExpert | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Fixed config.json entries: every layer an MoE layer, renormalised top-k."""

    @property
    def moe_family(self) -> Family:
        found = family_named(self.family)
        assert found is not None, self.family
        return found


_QWEN_MOE_EXTRA = {"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True}
_QKV = ("q_proj", "k_proj", "v_proj")

TARGETS: dict[str, Target] = {
    "mixtral": Target("mixtral", "MixtralForCausalLM", ("llama", "mistral"), "intermediate_size",
                      None),
    "qwen2_moe": Target("qwen2_moe", "Qwen2MoeForCausalLM", ("qwen2", "llama", "mistral"),
                        "moe_intermediate_size", "qkv_bias", _QKV,
                        SharedExpert("shared_expert", "shared_expert_intermediate_size",
                                     gate="shared_expert_gate.weight", required=True),
                        _QWEN_MOE_EXTRA),
    "qwen3_moe": Target("qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",), "moe_intermediate_size",
                        "attention_bias", (*_QKV, "o_proj"), extra=_QWEN_MOE_EXTRA),
}

DENSE_SIBLINGS: dict[str, str] = {
    "llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe",
}
"""Dense model_type -> the MoE family ``--target auto`` writes."""

_DENSE_ONLY_KEYS = ("mlp_bias", "pretraining_tp")
"""Dense config entries that mean nothing to the MoE families (their MLPs have no bias)."""


def resolve_target(spec: UpcycleSpec, model_type: str | None) -> tuple[UpcycleSpec, Target]:
    """The target family of ``spec`` for a dense model of ``model_type``, and the spec
    made concrete for it (its name; a shared expert where the family always has one)."""
    name = spec.target
    if name == "auto":
        if model_type not in DENSE_SIBLINGS:
            raise MoekitError(
                f"cannot pick a target for dense model_type {model_type!r}; known dense "
                f"families: {', '.join(DENSE_SIBLINGS)}; name one with --target "
                f"({', '.join(TARGETS)})")
        name = DENSE_SIBLINGS[model_type]
    if name not in TARGETS:
        raise MoekitError(f"unknown upcycling target {name!r}; choose from "
                          f"{', '.join(TARGETS)}")
    target = TARGETS[name]
    if model_type not in target.dense_types:
        raise MoekitError(f"{name} cannot hold a dense {model_type!r} model unchanged (its "
                          f"attention and norms differ); {name} is made from "
                          f"{', '.join(target.dense_types)}")
    if spec.shared_expert and target.shared is None:
        with_shared = [n for n, t in TARGETS.items() if t.shared is not None]
        raise MoekitError(f"{name} has no shared expert; --shared-expert needs a target that "
                          f"has one ({', '.join(with_shared)})")
    shared = spec.shared_expert or (target.shared is not None and target.shared.required)
    if shared and spec.scaling == "megatron":
        raise MoekitError(f"{name} always has a shared expert, which Megatron-Core's scaling "
                          "does not cover; use --scaling exact")
    return replace(spec, target=name, shared_expert=shared), target


def moe_config(dense: dict[str, Any], spec: UpcycleSpec, target: Target, intermediate: int,
               attention_bias: bool, windows: Windows) -> dict[str, Any]:
    """The target's config.json: every dense setting carried over, MoE entries added. The
    target's expert-count names are all dropped before its own is set, so that a dense
    config carrying one (``num_experts`` beside Mixtral's ``num_local_experts``) cannot
    contradict it; the sliding-window entries are the target's own for the dense layers'
    ``windows`` (``target_settings``), since families read the same entries differently."""
    family = target.moe_family
    dropped = {*_DENSE_ONLY_KEYS, *family.expert_count_keys, *WINDOW_KEYS}
    config = {k: v for k, v in dense.items() if k not in dropped}
    config.update(target_settings(target.family, windows))
    config.update(target.extra)
    config.update({
        "model_type": target.family,
        "architectures": [target.architecture],
        family.expert_count_key: spec.experts,
        "num_experts_per_tok": spec.top_k,
        target.intermediate_key: intermediate // spec.granularity,
    })
    if target.attention_bias_key is not None:
        config[target.attention_bias_key] = attention_bias
    if target.shared is not None:
        config[target.shared.size_key] = intermediate if spec.shared_expert else 0
    return config
