"""Upcycling plans: dense HF headers + an UpcycleSpec -> the MoE checkpoint's tensors.

Like conversion plans, built from headers alone and validated whole (every layer's MLP
present, shapes consistent, the intermediate size divisible by G) before anything is
written. Non-MLP tensors are copied unchanged under their own names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import MoekitError, PlanError, compress_ranges, plural, printable
from ..layouts.base import TensorMeta, is_canonical
from ..plan import Expr, Plan, Read, TensorPlan
from . import recipes
from .recipes import DenseMLP, check_drop_ratio
from .spec import UpcycleSpec
from .targets import DENSE_PROJECTIONS, Target, moe_config, resolve_target
from .windows import dense_windows

_MLP_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.(.+)\Z", re.DOTALL)
_ATTENTION_BIAS = re.compile(r"\.self_attn\.(\w+)\.bias$")


@dataclass
class UpcyclePlan:
    """What ``upcycle`` writes: the tensors, the target's config.json, the spec used (made
    concrete for the target) and the std the router rows are drawn with (None for a zero
    router)."""

    plan: Plan
    config: dict[str, Any]
    spec: UpcycleSpec
    target: Target
    router_std: float | None = None
    dtype: str = "F32"
    """The dtype the expert weights are written in (the dense MLP's)."""

    def preserved(self) -> tuple[bool, str]:
        """Whether the written MoE computes the dense function, and why: the spec's
        reasoning, over router rows that are finite and not zero in their dtype (a std that
        would not give such rows is refused when planning), and noting where the routed
        experts' ``down_proj`` is a multiple of the dense one that its dtype rounds."""
        preserved, why = self.spec.preserves_function()
        factor = self.spec.projection_scales()["down"]
        if preserved and math.frexp(factor)[0] != 0.5:
            why += (f"; the routed down_proj is {factor:g} x the dense one, rounded once to "
                    f"{self.dtype}")
        return preserved, why

    def summary(self) -> str:
        """A short human summary (what ``--dry-run`` prints)."""
        preserved, why = self.preserved()
        spec = self.spec
        std = f" (std {self.router_std:g})" if self.router_std is not None else ""
        lines = [
            f"upcycle: dense -> {self.target.family}, {spec.experts} experts, top-{spec.top_k}, "
            f"method {spec.method}"
            + (f" (G={spec.granularity}, {spec.groups} virtual groups)" if spec.granularity > 1
               else "")
            + (f" (drop ratio {spec.drop_ratio:g})" if spec.method == "drop" else "")
            + (", shared expert" if spec.shared_expert else ""),
            f"router {spec.router_init}{std}, scaling {spec.scaling}, seed {spec.seed}",
            f"dense function preserved: {'yes' if preserved else 'no'} ({why})",
            self.plan.summary().split("\n", 1)[1],
        ]
        return "\n".join(lines)


def build_upcycle_plan(tensors: Mapping[str, TensorMeta], config: dict | None,
                       spec: UpcycleSpec, label: str,
                       where: Callable[[str], str | None] = lambda key: None) -> UpcyclePlan:
    """Validate a dense model's headers against ``spec`` and plan its MoE checkpoint."""
    if not isinstance(spec, UpcycleSpec):
        raise MoekitError(f"the upcycling spec is a {type(spec).__name__}; expected a "
                          "moekit.UpcycleSpec")
    if config is not None and not isinstance(config, Mapping):
        raise MoekitError(f"the dense config is a {type(config).__name__}; expected a dict of "
                          "config.json settings")
    experts = next((k for k in tensors if ".experts." in k), None)
    if experts:
        raise MoekitError(f"{label} is not a dense model: it already has experts ({experts})")
    config = dict(config or {})
    model_type = config.get("model_type") or _guess_model_type(tensors)
    spec, target = resolve_target(spec, model_type)
    mlps = dense_mlps(tensors, spec, label, where)
    if spec.drop_ratio is not None:
        check_drop_ratio(spec.drop_ratio, mlps, "--drop-ratio")
    first = next(iter(mlps.values()))
    attention_bias = _check_attention_biases(tensors, target, label)
    std = _router_std(spec, config, label, first.dtype)
    planned: list[TensorPlan] = []
    experts: set[str] = set()
    emitted: set[int] = set()
    for key, meta in tensors.items():
        layer = _mlp_layer(key)
        if layer is None:
            planned.append(TensorPlan(key, Read.whole(key, meta)))
        elif layer not in emitted:
            emitted.add(layer)
            block = _moe_block(mlps[layer], spec, target, layer, std)
            planned.extend(block)
            experts.update(t.name for t in block if ".experts." in t.name)
    plan = Plan(family=target.family, src_layout="dense", dst_layout="hf", tensors=planned,
                moe_layers={layer: spec.experts for layer in mlps}, expert_tensors=experts)
    windows = dense_windows(model_type, config, max(mlps) + 1)
    return UpcyclePlan(plan, moe_config(config, spec, target, first.intermediate, attention_bias,
                                        windows), spec, target, std, first.dtype)


DEFAULT_ROUTER_STD = 0.02
"""Std of random router rows when neither --router-std nor ``initializer_range`` gives one."""

FLOAT_RANGES = {"F16": (6.103515625e-05, 65504.0),
                "BF16": (1.1754943508222875e-38, 3.3895313892515355e+38),
                "F32": (1.1754943508222875e-38, 3.4028234663852886e+38),
                "F64": (2.2250738585072014e-308, 1.7976931348623157e+308)}
"""Smallest normal and largest finite value of each floating dtype moekit upcycles."""
LARGEST_DRAW = 10.0
"""A bound on |N(0, 1)| draws (float32 Box-Muller draws stay below 6)."""


def _router_std(spec: UpcycleSpec, config: Mapping[str, Any], label: str, dtype: str
                ) -> float | None:
    """The std the router rows are drawn with: ``--router-std``, else the dense config's
    ``initializer_range``, else 0.02; None for a zero router, which draws nothing. A std
    whose rows would be NaN, infinite or flushed to zero in float32 (where they are drawn)
    or in ``dtype`` (where they are stored) is refused: with such rows the router would
    not pick whole groups, or would give NaN, and the summary's claims would not hold."""
    if spec.router_init == "zero":
        return None
    if spec.router_std is not None:
        return _drawable(float(spec.router_std), dtype, f"--router-std {spec.router_std:g}",
                         "choose a std in that range")
    value = config.get("initializer_range", DEFAULT_ROUTER_STD)
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not (math.isfinite(value) and value > 0)):
        raise MoekitError(f"{label}: config.json initializer_range is {value!r}, which cannot "
                          "be the std of the router rows (a finite number above 0 is needed); "
                          "give one with --router-std")
    return _drawable(float(value), dtype,
                     f"{label}: config.json initializer_range {value:g}", "give one with --router-std")


def _drawable(std: float, dtype: str, what: str, advice: str) -> float:
    """``std`` when N(0, std²) rows are finite and not flushed to zero in float32 and in
    ``dtype``."""
    tiny = max(FLOAT_RANGES["F32"][0], FLOAT_RANGES[dtype][0])
    top = min(FLOAT_RANGES["F32"][1], FLOAT_RANGES[dtype][1]) / LARGEST_DRAW
    if not tiny <= std <= top:
        fault = "infinite" if std > top else "rounded to zero"
        raise MoekitError(f"{what} would draw router rows that are {fault} in {dtype}; the std "
                          f"of the router rows must lie in [{tiny:.3g}, {top:.3g}]: {advice}")
    return std


def dense_mlps(tensors: Mapping[str, TensorMeta], spec: UpcycleSpec, label: str,
               where: Callable[[str], str | None] = lambda key: None) -> dict[int, DenseMLP]:
    """Every layer's dense MLP; one PlanError lists all that is missing or misshapen."""
    by_layer: dict[int, dict[str, str]] = {}
    for key in tensors:
        match = _MLP_KEY.match(key)
        if match and not is_canonical(match[1]):
            raise MoekitError(f"{label}: {printable(key)} writes its layer number other than as "
                              "ASCII digits without a leading zero; rename the tensor")
        if match:
            by_layer.setdefault(int(match[1]), {})[match[2]] = key
    if not by_layer:
        raise MoekitError(f"{label} is not a dense model moekit can upcycle: no "
                          "model.layers.N.mlp.* tensors were found")
    problems: list[str] = []
    mlps: dict[int, DenseMLP] = {}
    for layer, found in sorted(by_layer.items()):
        mlp = _layer_mlp(layer, found, tensors, spec, problems, where)
        if mlp is not None:
            mlps[layer] = mlp
    _check_agreement(mlps, problems)
    if problems:
        raise PlanError(f"cannot upcycle {label}: {len(problems)} "
                        f"{plural(len(problems), 'problem')}", problems)
    return mlps


def _layer_mlp(layer: int, found: dict[str, str], tensors: Mapping[str, TensorMeta],
               spec: UpcycleSpec, problems: list[str], where: Callable[[str], str | None]
               ) -> DenseMLP | None:
    names = {f"{DENSE_PROJECTIONS[p]}.weight": p for p in ("gate", "up", "down")}
    extra = sorted(set(found) - set(names))
    if extra:
        problems.append(f"layer {layer}: the MLP has {', '.join(extra)}, which the MoE experts "
                        "cannot hold (biases or unknown parts)")
    missing = [n for n in names if n not in found]
    if missing:
        problems.append(f"layer {layer}: the MLP lacks {', '.join(missing)}")
        return None
    reads = {p: Read.whole(found[n], tensors[found[n]]) for n, p in names.items()}
    gate, up, down = reads["gate"], reads["up"], reads["down"]
    if (len(gate.shape) != 2 or up.shape != gate.shape or down.shape != gate.shape[::-1]
            or len({gate.dtype, up.dtype, down.dtype}) > 1):
        file = where(found["gate_proj.weight"])
        problems.append(f"layer {layer}: MLP shapes gate {list(gate.shape)}, up {list(up.shape)}, "
                        f"down {list(down.shape)} ({gate.dtype}/{up.dtype}/{down.dtype}) are not "
                        f"a gated MLP [I, H], [I, H], [H, I] of one dtype"
                        + (f" (in {file})" if file else ""))
        return None
    if gate.dtype not in FLOAT_RANGES:
        problems.append(f"layer {layer}: the MLP weights are {gate.dtype}; moekit upcycles "
                        f"floating-point weights ({', '.join(FLOAT_RANGES)})")
        return None
    if gate.shape[0] % spec.granularity:
        problems.append(f"layer {layer}: intermediate size {gate.shape[0]} is not divisible by "
                        f"the granularity {spec.granularity}")
        return None
    return DenseMLP(gate, up, down)


def _check_agreement(mlps: dict[int, DenseMLP], problems: list[str]) -> None:
    shapes: dict[tuple, list[int]] = {}
    for layer, mlp in mlps.items():
        shapes.setdefault((mlp.gate.shape, mlp.dtype), []).append(layer)
    if len(shapes) > 1:
        listed = "; ".join(f"layers {compress_ranges(layers)}: gate {list(shape)} {dtype}"
                           for (shape, dtype), layers in shapes.items())
        problems.append(f"the layers' MLPs differ in shape or dtype ({listed})")


def _check_attention_biases(tensors: Mapping[str, TensorMeta], target: Target, label: str
                            ) -> bool:
    """True when the dense attention has biases; refuse those the target cannot hold."""
    found = {m[1]: key for key in tensors if (m := _ATTENTION_BIAS.search(key))}
    refused = sorted(set(found) - set(target.attention_biases))
    if refused:
        raise MoekitError(f"{label} has attention biases ({found[refused[0]]}) that "
                          f"{target.family} attention cannot hold; choose another --target")
    return bool(found)


def _mlp_layer(key: str) -> int | None:
    match = _MLP_KEY.match(key)
    return int(match[1]) if match else None


def _moe_block(mlp: DenseMLP, spec: UpcycleSpec, target: Target, layer: int,
               std: float | None) -> list[TensorPlan]:
    family = target.moe_family
    block = family.block.format(layer=layer)
    out = [TensorPlan(f"{block}.{family.router}",
                      recipes.router(spec, layer, mlp.hidden, mlp.dtype, std))]
    for expert in range(spec.experts):
        for name, recipe in recipes.expert_projections(mlp, spec, layer, expert).items():
            out.append(TensorPlan(family.expert_key(layer, expert, name), recipe))
    if spec.shared_expert and target.shared is not None:
        shared = target.shared
        parts: dict[str, Expr] = recipes.shared_expert(mlp, gated=shared.gate is not None)
        for name, recipe in parts.items():
            out.append(TensorPlan(f"{block}.{shared.module}.{DENSE_PROJECTIONS[name]}.weight",
                                  recipe))
        if shared.gate is not None:
            out.append(TensorPlan(f"{block}.{shared.gate}", recipes.shared_expert_gate(mlp)))
    return out


def _guess_model_type(tensors: Mapping[str, TensorMeta]) -> str:
    """The dense family the keys suggest, for a checkpoint or state dict without a config:
    Qwen3 has q/k norms, Qwen2 has q/k/v biases, otherwise the Llama naming."""
    if any(k.endswith("self_attn.q_norm.weight") for k in tensors):
        return "qwen3"
    if any(k.endswith("self_attn.q_proj.bias") for k in tensors):
        return "qwen2"
    return "llama"

