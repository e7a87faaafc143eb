"""Upcycling Megatron-Core models in memory, with Megatron-Core's own names.

Drop-in equivalents of ``megatron.core.transformer.moe.upcycling_utils``'s
``upcycle_state_dict(moe_model, dense_model)`` and ``load_and_upcycle_model``, built on
moekit's recipes:

- exact function preservation by default: only ``linear_fc2`` (and its bias) is scaled,
  by G over what a token's selected routing weights sum to. That sum is a constant where
  Megatron-Core renormalises the top-k weights (softmax after the top-k; sigmoid with
  top-k > 1), times ``moe_router_topk_scaling_factor``; or 1 where every expert is
  selected. Exact scaling is refused where no constant exists (sigmoid top-1, softmax
  before a top-k below all experts, Sinkhorn), for shared experts unless
  ``UpcycleSpec.shared_expert`` fills them, for routing weights applied to the experts'
  input and for group-limited routing whose groups split the virtual groups. Token dropping
  (``moe_expert_capacity_factor``) still drops tokens, by design;
- ``UpcycleSpec(scaling="megatron")`` reproducing Megatron-Core's state dict tensor for
  tensor, except where Megatron-Core 0.16 is wrong: with ``add_bias_linear`` and G > 1
  moekit groups the router bias like the weight (Megatron-Core leaves it ungrouped, which
  breaks the virtual groups), and with a gated MLP whose activation is not SiLU and G > 1
  moekit slices the gate and up halves of ``linear_fc1`` apart (Megatron-Core slices across
  them);
- shared experts (``UpcycleSpec(shared_expert=True)``) made as ``moekit upcycle
  --shared-expert`` makes Qwen2-MoE's: the dense MLP whole, its output halved by a zero
  ``gate_weight`` (sigmoid(0), megatron-core's ``moe_shared_expert_gate``) or, without a
  gate, by halving its ``linear_fc2``; the routed experts' ``linear_fc2`` carries the
  other half;
- the experts of the local expert-parallel rank only (``MoELayer.local_expert_indices``);
- Drop-Upcycling draws seeded by the global layer and expert indices, as ``moekit
  upcycle``'s are: the same dense model and seed give the same experts on any
  expert-parallel rank, and the same as ``moekit upcycle --to megatron`` writes;
- SequentialMLP (``experts.local_experts.{i}.linear_fc1.weight``) and TEGroupedMLP
  (``experts.linear_fc1.weight{i}``) naming, with fc1/fc2 biases;
- several model chunks (virtual pipeline): chunk i of the MoE model from chunk i of the
  dense model. (Megatron-Core 0.16 passes its arguments in the wrong order there.)

The router rows come from the MoE model's own router, so ``UpcycleSpec.router_std`` and
``target`` do not apply here and are refused. Models are read through
``state_dict()`` and module attributes; megatron-core itself is not imported, so moekit does
not depend on it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..conversion import state_dict_meta
from ..errors import MoekitError
from ..executors.memory import run_plan
from ..plan import Concat, Constant, Expr, Plan, Read, TensorPlan
from ..sources import DictSource
from . import recipes
from .recipes import DenseMLP, narrow
from .spec import UpcycleSpec

_OWN_ROUTER = "moekit.moe_router:"
"""Prefix under which the MoE model's own router rows are offered to the recipes."""


@dataclass(frozen=True)
class MoELayerInfo:
    """One Megatron-Core MoE layer: where it is and how it routes."""

    prefix: str
    """State-dict prefix of the layer's ``mlp`` module, e.g. ``decoder.layers.0.mlp``."""
    config: Any
    local_experts: tuple[int, ...]
    grouped_naming: bool
    """TEGroupedMLP (``weight{i}``) rather than SequentialMLP (``local_experts.{i}``)."""
    layer: int | None
    """The model's layer index, counted from 0 over every pipeline stage (megatron-core's
    ``MoELayer.layer_number`` - 1); None for a layer built outside a ``TransformerLayer``."""
    shared: int
    """Rows of the layer's shared experts (``moe_shared_expert_intermediate_size``); 0 for
    none."""
    shared_gate: bool
    """The shared experts' output is scaled by sigmoid(``gate_weight`` @ x)
    (``moe_shared_expert_gate``)."""

    @property
    def draw_label(self) -> int | str:
        """What Drop-Upcycling's draws are seeded with besides the global expert index: the
        layer index, as the Hugging Face planner seeds them, so that a dense model upcycled
        here or by ``moekit upcycle`` gets the same experts (``_layer_spec`` refuses drop
        without one)."""
        return self.prefix if self.layer is None else self.layer

    def expert_key(self, local: int, fc: str, kind: str) -> str:
        if self.grouped_naming:
            return f"{self.prefix}.experts.{fc}.{kind}{local}"
        return f"{self.prefix}.experts.local_experts.{local}.{fc}.{kind}"


def upcycle_state_dict(moe_model: nn.Module | Sequence[nn.Module],
                       dense_model: nn.Module | Sequence[nn.Module],
                       spec: UpcycleSpec | None = None) -> dict[str, dict[str, Any]]:
    """The MoE model's state dict(s) made from the dense model's weights.

    Returns ``{"model": sd}`` for one chunk and ``{"model0": sd0, "model1": sd1, ...}``
    for several, as Megatron-Core does. ``spec`` defaults to what the MoE model's config
    implies: its expert count and top-k, G = dense ffn size / MoE ffn size, a
    virtual-group router made from the MoE model's own router rows, exact scaling.
    """
    if spec is not None and not isinstance(spec, UpcycleSpec):
        raise MoekitError(f"the upcycling spec is a {type(spec).__name__}; expected a "
                          "moekit.UpcycleSpec or None")
    moe_chunks = _chunks(moe_model)
    dense_chunks = _chunks(dense_model)
    if len(moe_chunks) != len(dense_chunks):
        raise MoekitError(f"the MoE model has {len(moe_chunks)} chunks and the dense model "
                          f"{len(dense_chunks)}; they must match one to one")
    states = [_upcycle_chunk(m, d, spec) for m, d in zip(moe_chunks, dense_chunks)]
    if len(states) == 1:
        return {"model": states[0]}
    return {f"model{i}": state for i, state in enumerate(states)}


def load_and_upcycle_model(load_dense_ckpt_func: Callable[..., Any],
                           moe_model: nn.Module | Sequence[nn.Module],
                           dense_model: nn.Module | Sequence[nn.Module], strict: bool = True,
                           load_args: tuple = (), load_kwargs: Mapping[str, Any] | None = None,
                           spec: UpcycleSpec | None = None) -> Any:
    """Load the dense checkpoint with ``load_dense_ckpt_func(*load_args, **load_kwargs)``
    (into ``dense_model``), upcycle it into ``moe_model`` and return what the loader
    returned (Megatron's loaders return ``(iteration, flops so far)``)."""
    result = load_dense_ckpt_func(*load_args, **(load_kwargs or {}))
    state = upcycle_state_dict(moe_model, dense_model, spec)
    for chunk, sd in zip(_chunks(moe_model), state.values()):
        chunk.load_state_dict(sd, strict=strict)
    return result


def _chunks(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    return [model] if isinstance(model, nn.Module) else list(model)


def _upcycle_chunk(moe: nn.Module, dense: nn.Module, spec: UpcycleSpec | None
                   ) -> dict[str, Any]:
    dense_sd = dense.state_dict()
    state = dict(moe.state_dict())
    for key in dense_sd.keys() & state.keys():
        state[key] = dense_sd[key]
    for key, value in dense_sd.items():
        match = _FUSED_NORM.search(key)
        if match:
            state[key[:match.start()] + f".pre_mlp_layernorm.{match[1]}"] = value
    layers = _moe_layers(moe, state)
    if not layers:
        return state
    source = {k: v for k, v in dense_sd.items() if isinstance(v, torch.Tensor)}
    source.update({_OWN_ROUTER + key: state[key] for layer in layers
                   for key in (f"{layer.prefix}.router.weight", f"{layer.prefix}.router.bias")
                   if isinstance(state.get(key), torch.Tensor)})
    meta = state_dict_meta(source)
    tensors = [t for layer in layers
               for t in _layer_tensors(layer, _layer_spec(layer, meta, spec), meta)]
    plan = Plan("megatron", "dense", "megatron", tensors)
    device = state[tensors[0].name].device
    state.update(run_plan(plan, DictSource(source), device))
    return state


_FUSED_NORM = re.compile(r"\.mlp\.linear_fc1\.layer_norm_(weight|bias)$")
"""Transformer Engine fuses the pre-MLP norm into the dense fc1; MoE layers keep it apart."""


def _moe_layers(moe: nn.Module, state: Mapping[str, Any]) -> list[MoELayerInfo]:
    layers = []
    for name, module in moe.named_modules():
        if not (hasattr(module, "router") and hasattr(module, "experts")
                and hasattr(module, "local_expert_indices")):
            continue
        grouped = f"{name}.experts.linear_fc1.weight0" in state
        sequential = f"{name}.experts.local_experts.0.linear_fc1.weight" in state
        if not (grouped or sequential):
            raise MoekitError(f"{name}: experts of type {type(module.experts).__name__} are not "
                              "supported; use SequentialMLP or TEGroupedMLP")
        number = getattr(module, "layer_number", None)
        shared = getattr(module.config, "moe_shared_expert_intermediate_size", None) or 0
        layers.append(MoELayerInfo(name, module.config, tuple(module.local_expert_indices),
                                   grouped, None if number is None else number - 1, shared,
                                   f"{name}.shared_experts.gate_weight" in state))
    return layers


def _layer_spec(layer: MoELayerInfo, meta: Mapping[str, Any], spec: UpcycleSpec | None
                ) -> UpcycleSpec:
    config = layer.config
    fc1 = meta[f"{layer.prefix}.linear_fc1.weight"]
    dense_ffn = fc1.shape[0] // (2 if config.gated_linear_unit else 1)
    if dense_ffn % config.moe_ffn_hidden_size:
        raise MoekitError(f"{layer.prefix}: dense ffn size {dense_ffn} is not a multiple of the "
                          f"MoE ffn size {config.moe_ffn_hidden_size}")
    granularity = dense_ffn // config.moe_ffn_hidden_size
    if spec is None:
        spec = UpcycleSpec(config.num_moe_experts, config.moe_router_topk,
                           "granular" if granularity > 1 else "copy", granularity,
                           router="virtual-group")
    if (spec.experts, spec.top_k, spec.granularity) != (
            config.num_moe_experts, config.moe_router_topk, granularity):
        raise MoekitError(
            f"{layer.prefix}: the spec asks for {spec.experts} experts, top-{spec.top_k}, "
            f"G={spec.granularity}, but the MoE model has {config.num_moe_experts} experts, "
            f"top-{config.moe_router_topk} and G={granularity} (dense ffn {dense_ffn} / MoE "
            f"ffn {config.moe_ffn_hidden_size})")
    if spec.method == "drop" and layer.layer is None:
        raise MoekitError(f"{layer.prefix}: Drop-Upcycling seeds each expert's draws with its "
                          "layer index, and this MoE layer has no layer_number (megatron-core "
                          "sets it when a TransformerLayer builds the layer)")
    if spec.shared_expert and layer.shared != dense_ffn:
        has = (f"the MoE model's have {layer.shared} (moe_shared_expert_intermediate_size)"
               if layer.shared else "the MoE model has none (moe_shared_expert_intermediate_size)")
        raise MoekitError(f"{layer.prefix}: shared_expert fills the shared experts with the "
                          f"dense MLP of {dense_ffn} rows; {has}")
    ignored = _ignored_settings(spec)
    if ignored:
        raise MoekitError(f"{layer.prefix}: {'; '.join(ignored)}")
    if spec.scaling == "exact":
        problem = _exact_problem(config, spec)
        if problem:
            raise MoekitError(f"{layer.prefix}: exact upcycling cannot keep the dense function: "
                              f"{problem}; use UpcycleSpec(scaling='megatron') for "
                              "Megatron-Core's approximation")
    return spec


def _ignored_settings(spec: UpcycleSpec) -> list[str]:
    """Settings of ``spec`` that this path would drop: it takes the router rows from the
    MoE model and writes the MoE model's own modules."""
    found = []
    if spec.router_std is not None:
        found.append("router_std does not apply: the router rows are the MoE model's own")
    if spec.target != "auto":
        found.append(f"target {spec.target!r} does not apply: the MoE model is the target")
    return found


def _exact_problem(config: Any, spec: UpcycleSpec) -> str | None:
    """Why exact scaling cannot keep the dense function under ``config``, or None."""
    if getattr(config, "moe_shared_expert_intermediate_size", None) and not spec.shared_expert:
        return ("the MoE layer has shared experts, whose output the dense MLP does not "
                "account for unless UpcycleSpec(shared_expert=True) fills them")
    if getattr(config, "moe_apply_probs_on_input", False):
        return ("moe_apply_probs_on_input multiplies the experts' input by the routing weight, "
                "before the activation")
    why_not = _weight_sum_problem(config)
    if why_not:
        return why_not
    groups = getattr(config, "moe_router_num_groups", None)
    if (getattr(config, "moe_router_group_topk", None) and groups
            and (config.num_moe_experts // groups) % spec.granularity):
        return (f"group-limited routing over {groups} groups of "
                f"{config.num_moe_experts // groups} experts splits the virtual groups of "
                f"G={spec.granularity} experts")
    return None


def _weight_sum_problem(config: Any) -> str | None:
    """Why a token's selected routing weights do not sum to a constant, or None.

    Megatron-Core renormalises softmax scores taken after the top-k, and sigmoid scores when
    top-k > 1; a softmax over all experts (``moe_router_pre_softmax``, Sinkhorn with
    top-k > 1) sums to 1 over the top-k only when the top-k is every expert; a single sigmoid
    score is not renormalised."""
    k, n = config.moe_router_topk, config.num_moe_experts
    sinkhorn = _sinkhorn(config)
    sigmoid = getattr(config, "moe_router_score_function", "softmax") == "sigmoid"
    if (sinkhorn or sigmoid) and k == 1:
        return "a top-1 sigmoid routing weight is sigmoid(logit), not a constant"
    if (sinkhorn or (config.moe_router_pre_softmax and not sigmoid)) and k < n:
        return (f"the routing weights are a softmax over all {n} experts, which sums to 1 over "
                f"the top-{k} only when top-k selects every expert")
    factor = getattr(config, "moe_router_topk_scaling_factor", None)
    if factor and not math.isfinite(factor):
        return f"moe_router_topk_scaling_factor is {factor}"
    return None


def _weight_sum(config: Any) -> float:
    """What a token's selected routing weights sum to where they sum to a constant: 1 times
    ``moe_router_topk_scaling_factor`` (which Megatron-Core applies when it is set and not
    0, and which Sinkhorn routing does not apply)."""
    if _sinkhorn(config):
        return 1.0
    return float(getattr(config, "moe_router_topk_scaling_factor", None) or 1.0)


def _sinkhorn(config: Any) -> bool:
    """Whether the router balances with Sinkhorn, which has its own routing weights."""
    balancing = getattr(config, "moe_router_load_balancing_type", "aux_loss")
    return "sinkhorn" in (balancing if isinstance(balancing, list) else [balancing])


def _scales(spec: UpcycleSpec, config: Any) -> dict[str, float]:
    """Megatron-Core's roots: cube for gated or squared-ReLU MLPs, square otherwise; its
    activation scale R·G²/k with ``moe_router_pre_softmax``, else G (whatever the score
    function). Exact scaling divides down by the routing weights' sum."""
    if spec.scaling == "exact":
        return spec.projection_scales(weight_sum=_weight_sum(config))
    activation = getattr(config.activation_func, "__name__", "")
    root = 3 if config.gated_linear_unit or activation == "squared_relu" else 2
    g = spec.granularity
    activation_scale = spec.groups * g * g / spec.top_k if config.moe_router_pre_softmax else g
    return spec.projection_scales(root, activation_scale)


def _layer_tensors(layer: MoELayerInfo, spec: UpcycleSpec, meta: Mapping[str, Any]
                   ) -> list[TensorPlan]:
    gated = bool(layer.config.gated_linear_unit)
    weights = _dense_mlp(_read(meta, f"{layer.prefix}.linear_fc1.weight"),
                         _read(meta, f"{layer.prefix}.linear_fc2.weight"), gated)
    fc1_bias = _optional_read(meta, f"{layer.prefix}.linear_fc1.bias")
    fc2_bias = _optional_read(meta, f"{layer.prefix}.linear_fc2.bias")
    scales = _scales(spec, layer.config)
    fc2_bias_scale = 1 / _weight_sum(layer.config) if spec.scaling == "exact" else 1.0
    out = [TensorPlan(f"{layer.prefix}.router.{kind}",
                      _router(_read(meta, f"{_OWN_ROUTER}{layer.prefix}.router.{kind}"), spec))
           for kind in ("weight", "bias") if f"{_OWN_ROUTER}{layer.prefix}.router.{kind}" in meta]
    for local, expert in enumerate(layer.local_experts):
        parts = recipes.expert_projections(weights, spec, layer.draw_label, expert, scales)
        out.append(TensorPlan(layer.expert_key(local, "linear_fc1", "weight"),
                              _fc1(parts, gated)))
        out.append(TensorPlan(layer.expert_key(local, "linear_fc2", "weight"), parts["down"]))
        if fc1_bias is not None:
            halves = _dense_mlp(fc1_bias, fc1_bias, gated)
            biases = {name: recipes.scaled(recipes.neuron_slice(halves.projection(name), 0, spec,
                                                                expert), scales[name])
                      for name in halves.projections if name != "down"}
            out.append(TensorPlan(layer.expert_key(local, "linear_fc1", "bias"), _fc1(biases, gated)))
        if fc2_bias is not None:
            out.append(TensorPlan(layer.expert_key(local, "linear_fc2", "bias"),
                                  recipes.scaled(fc2_bias, fc2_bias_scale)))
    return out + (_shared_experts(layer, weights, gated) if spec.shared_expert else [])


def _shared_experts(layer: MoELayerInfo, weights: DenseMLP, gated: bool) -> list[TensorPlan]:
    """The shared experts: the dense MLP, its output halved by a zero gate or, without one,
    by its ``linear_fc2`` (``recipes.shared_expert``); megatron-core's shared experts have
    no biases."""
    shared = f"{layer.prefix}.shared_experts"
    parts = recipes.shared_expert(weights, gated=layer.shared_gate)
    out = [TensorPlan(f"{shared}.linear_fc1.weight", _fc1(parts, gated)),
           TensorPlan(f"{shared}.linear_fc2.weight", parts["down"])]
    if layer.shared_gate:
        out.append(TensorPlan(f"{shared}.gate_weight", recipes.shared_expert_gate(weights)))
    return out


def _fc1(parts: Mapping[str, Expr], gated: bool) -> Expr:
    """Megatron's fc1: gate rows then up rows ([2I, H]), or the single fc1 of a non-gated MLP."""
    return Concat((parts["gate"], parts["up"]), 0) if gated else parts["gate"]


def _dense_mlp(fc1: Read, fc2: Read, gated: bool) -> DenseMLP:
    """Megatron's dense fc1 [2I, H] (gate rows, then up rows) or [I, H], and fc2 [H, I]."""
    size = fc1.shape[0] // (2 if gated else 1)
    up = narrow(fc1, 0, size, size) if gated else None
    return DenseMLP(narrow(fc1, 0, 0, size), up, fc2)


def _router(own: Read, spec: UpcycleSpec) -> Expr:
    """The router weight [N, H] or bias [N] from the MoE model's own (randomly initialised)
    one, as Megatron-Core does: ``random`` keeps it, ``virtual-group`` repeats the first N/G
    rows G times each. Megatron-Core leaves a router *bias* as it is, which breaks the
    virtual groups; moekit groups it like the weight."""
    init = spec.router_init
    if init == "zero":
        return Constant(own.shape, own.dtype)
    if init == "random":
        return own
    rows = [narrow(own, 0, group, 1) for group in range(spec.groups)]
    return Concat(tuple(row for row in rows for _ in range(spec.granularity)), 0)


def _read(meta: Mapping[str, Any], key: str) -> Read:
    return Read.whole(key, meta[key])


def _optional_read(meta: Mapping[str, Any], key: str) -> Read | None:
    return _read(meta, key) if key in meta else None
