"""Merge plans: the base model's upcycling plan, with each expert read from its source.

Built from headers alone. The base model's headers give the upcycling plan of the
target family (``moekit.upcycling``, method ``copy``, or ``granular`` with moekit's
``granularity``); then every routed expert's projections are read from its own source
checkpoint through the upcycling recipes (``expert_projections``: the G slices of a
granular merge, the re-initialised neurons of a ``drop_ratio``), the shared expert's from
its source, and the router rows (computed from prompts, or drawn) from a small checkpoint
written before the merge. Each read is named ``TAG/key`` (what ``--dry-run`` shows), the
tag being ``base``, ``expertN``, ``sharedN`` or ``router``; ``MergePlan.origins`` maps
that name to the checkpoint tag and tensor key it reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import MoekitError, PlanError, plural, printable
from ..layouts.base import TensorMeta
from ..plan import Cast, Expr, Plan, Read, TensorPlan
from ..upcycling.planner import FLOAT_RANGES, build_upcycle_plan, dense_mlps
from ..upcycling.recipes import DenseMLP, check_drop_ratio, expert_projections, scaled
from ..upcycling.spec import UpcycleSpec
from ..upcycling.targets import DENSE_PROJECTIONS, TARGETS, Target
from .config import (DEEPSEEK_BASES, DEEPSEEK_REFUSAL, MERGE_TARGETS, RANDOM_GATE_MODES,
                     ExpertSource, MergeConfig, architecture_targets)

ROUTER_TAG = "router"
BASE_TAG = "base"
TORCH_SEEDS = (-2**63, 2**64)
"""The seeds torch's ``Generator.manual_seed`` takes, from the first up to the second:
those the random gate modes can draw with."""


def _torch_name(dtype: str) -> str:
    """torch's name of a safetensors floating dtype (``F32`` -> ``float32``, ``BF16`` ->
    ``bfloat16``): what config.json's ``dtype`` and mergekit's ``dtype`` hold."""
    return dtype.lower().replace("f", "float", 1)


DTYPE_NAMES = {_torch_name(dtype): dtype for dtype in FLOAT_RANGES}
"""The floating dtypes a merge writes (those upcycling writes) by the names mergekit's
``dtype`` takes them (``mergekit.common.dtype_from_name``, also after ``torch.``)."""


@dataclass
class Origins:
    """Where the reads of a merge plan come from: read name -> (checkpoint tag, key)."""

    table: dict[str, tuple[str, str]] = field(default_factory=dict)

    def read(self, tag: str, source: Read) -> Read:
        """``source`` (a read of a tensor of checkpoint ``tag``) under its plan name."""
        name = f"{tag}/{source.key}"
        self.table[name] = (tag, source.key)
        return source._replace(key=name)


@dataclass
class MergePlan:
    """What ``merge`` writes: the tensors, the target's config.json, the target, the
    router tensors it computes first and the settings."""

    plan: Plan
    config: dict[str, Any]
    target: Target
    routers: dict[str, tuple[int, bool]]
    """Router tensor name -> (the MoE layer's position among the MoE layers, True for a
    shared-expert gate)."""
    merge: MergeConfig
    origins: Origins
    seed: int = 0
    """The seed of the random gate modes and of every ``drop_ratio``'s draws."""

    def summary(self) -> str:
        """A short human summary (what ``--dry-run`` prints)."""
        m = self.merge
        g = m.granularity
        shared = f", {len(m.shared_experts)} shared" if m.shared_experts else ""
        split = (f", each split into {g} ({len(m.experts) * g} routed experts, router rows "
                 f"repeated for each source's {g})" if g > 1 else "")
        lines = [f"merge: {len(m.experts)} experts{split}{shared} -> {self.target.family}, "
                 f"top-{m.experts_per_token * g}, gate_mode {m.gate_mode}, seed {self.seed}"]
        for tag, source in m.sources.items():
            lines.append(printable(f"  {tag}: {source.source_model}{_settings(source)}"))
        lines.append(self.plan.summary().split("\n", 1)[1])
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The merge's settings, as ``--dry-run --json`` shows them beside the tensors:
        each source with the routed experts it makes (none for a shared expert)."""
        m = self.merge
        g = m.granularity
        experts = {f"expert{i}": list(range(i * g, (i + 1) * g)) for i in range(len(m.experts))}
        return {"gate_mode": m.gate_mode, "seed": self.seed, "granularity": g,
                "routed_experts": len(m.experts) * g, "top_k": m.experts_per_token * g,
                "sources": [{"tag": tag, "source_model": source.source_model,
                             "residual_scale": source.residual_scale,
                             "drop_ratio": source.drop_ratio, "experts": experts.get(tag, [])}
                            for tag, source in m.sources.items()]}


def _settings(source: ExpertSource) -> str:
    """What ``source``'s line of the summary says besides its model."""
    said = []
    if source.residual_scale is not None:
        said.append(f"down_proj x {source.residual_scale:g}")
    if source.drop_ratio is not None:
        said.append(f"drop ratio {source.drop_ratio:g}")
    return f" ({', '.join(said)})" if said else ""


def choose_target(merge: MergeConfig, model_type: str | None) -> Target:
    """The target family mergekit-moe picks: the first of ``MERGE_TARGETS`` (those
    ``architecture`` names, if given) that takes a ``model_type`` base model with the
    configuration's number of shared experts. Where mergekit would pick its DeepSeek MoE
    output instead (tried after Mixtral) the merge is refused (``DEEPSEEK_REFUSAL``)."""
    shared = len(merge.shared_experts)
    if merge.architecture is None and _mergekit_picks_deepseek(merge, model_type):
        raise MoekitError(f"{DEEPSEEK_REFUSAL}; mergekit-moe picks it for a {model_type} base "
                          "model with one shared expert without prompts (architecture: qwen "
                          "writes Qwen MoE, whose shared expert needs prompts unless gate_mode "
                          "is random)")
    wanted = architecture_targets(merge.architecture) if merge.architecture else MERGE_TARGETS
    for family in wanted:
        if MERGE_TARGETS[family].shared_experts == shared and \
                model_type in MERGE_TARGETS[family].bases:
            return TARGETS[family]
    takes = "; ".join(f"{t.name} takes {'/'.join(t.bases)} with {t.shared_experts} shared "
                      f"{plural(t.shared_experts, 'expert')}" for t in MERGE_TARGETS.values())
    raise MoekitError(
        f"no merge target holds {shared} shared {plural(shared, 'expert')} of a "
        f"{model_type!r} base model"
        + (f" as architecture {merge.architecture}" if merge.architecture else "")
        + f": {takes}")


def _mergekit_picks_deepseek(merge: MergeConfig, model_type: str | None) -> bool:
    """True where mergekit-moe, given no ``architecture``, writes DeepSeek MoE: Mixtral
    takes no shared expert, and DeepSeek MoE takes a Llama or Mistral base model with one
    shared expert without prompts."""
    return (model_type in DEEPSEEK_BASES and len(merge.shared_experts) == 1
            and not merge.shared_experts[0].positive_prompts
            and not merge.shared_experts[0].negative_prompts)


def check_sources(base: Mapping[str, TensorMeta], base_type: str | None,
                  sources: Mapping[str, tuple[str, Mapping[str, TensorMeta], str | None]]
                  ) -> None:
    """Refuse, listing every mismatch per source and tensor, sources whose model_type or
    tensors (names, shapes, dtypes) differ from the base model's. ``sources`` maps each
    tag to (label, headers, model_type)."""
    problems: list[str] = []
    for tag, (label, tensors, model_type) in sources.items():
        where = f"{tag} ({label})"
        if model_type != base_type:
            problems.append(f"{where}: model_type {model_type!r}, the base model's is "
                            f"{base_type!r}")
        for key, meta in base.items():
            other = tensors.get(key)
            if other is None:
                problems.append(f"{where}: lacks {key}")
            elif tuple(other.shape) != tuple(meta.shape) or other.dtype != meta.dtype:
                problems.append(f"{where}: {key} is {list(other.shape)} {other.dtype}, the base "
                                f"model's is {list(meta.shape)} {meta.dtype}")
        problems.extend(f"{where}: has {key}, which the base model lacks"
                        for key in tensors if key not in base)
    if problems:
        raise PlanError(f"the expert models do not share the base model's architecture: "
                        f"{len(problems)} {plural(len(problems), 'problem')}", problems)


def build_merge_plan(base: Mapping[str, TensorMeta], config: dict | None, merge: MergeConfig,
                     label: str, seed: int = 0) -> MergePlan:
    """Plan the merged MoE from the base model's headers (the sources already checked to
    match them); ``seed`` seeds every ``drop_ratio``'s draws."""
    config = dict(config or {})
    target = choose_target(merge, config.get("model_type"))
    g = merge.granularity
    spec = UpcycleSpec(experts=len(merge.experts) * g, top_k=merge.experts_per_token * g,
                       method="granular" if g > 1 else "copy", granularity=g,
                       router="zero", target=target.family,
                       shared_expert=bool(merge.shared_experts), seed=seed)
    low, high = TORCH_SEEDS
    if merge.gate_mode in RANDOM_GATE_MODES and not low <= seed < high:
        raise MoekitError(f"seed {seed} is outside [-2**63, 2**64), the seeds torch's generator "
                          f"takes, with which gate_mode {merge.gate_mode} draws the router rows")
    upcycled = build_upcycle_plan(base, config, spec, label)
    dtype = output_dtype(merge, config, upcycled.dtype)
    origins = Origins()
    mlps = dense_mlps(base, spec, label)
    _check_drop_ratios(merge, mlps)
    recipes, routers = _merge_recipes(upcycled.plan, mlps, merge, spec, target, origins, dtype)
    tensors = [TensorPlan(t.name, _cast(recipes.get(t.name) or _from_base(t.recipe, origins),
                                        dtype))
               for t in upcycled.plan.tensors]
    plan = replace(upcycled.plan, src_layout="merge", tensors=tensors)
    moe_config = dict(upcycled.config)
    moe_config["dtype"] = _torch_name(dtype)
    return MergePlan(plan, moe_config, target, routers, merge, origins, seed)


def _check_drop_ratios(merge: MergeConfig, mlps: Mapping[int, DenseMLP]) -> None:
    """Refuse an expert's ``drop_ratio`` that re-initialises no neuron."""
    for i, source in enumerate(merge.experts):
        if source.drop_ratio is not None:
            check_drop_ratio(source.drop_ratio, mlps, f"experts[{i}].moekit.drop_ratio")


def output_dtype(merge: MergeConfig, config: Mapping[str, Any], dtype: str) -> str:
    """The dtype every tensor is written in, as mergekit-moe picks it
    (``mergekit/moe/common.py`` ``select_dtype``): ``dtype`` if given, else the base
    model's config.json ``dtype`` (``torch_dtype``) when it names a floating dtype, else
    ``dtype``, that of the base model's MLPs."""
    if merge.dtype is not None:
        wanted = DTYPE_NAMES.get(merge.dtype.removeprefix("torch."))
        if wanted is None:
            raise MoekitError(f"dtype {merge.dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
        return wanted
    declared = config.get("dtype", config.get("torch_dtype"))
    return DTYPE_NAMES.get(str(declared).removeprefix("torch."), dtype)


def _cast(recipe: Expr, dtype: str) -> Expr:
    """``recipe`` converted to ``dtype`` (as mergekit's ``tensor.to(out_dtype)``, after
    its ``residual_scale``), or as it is when it already is."""
    return recipe if recipe.dtype == dtype else Cast(recipe, dtype)


def _from_base(recipe: Expr, origins: Origins) -> Expr:
    """A tensor the upcycling plan passes through, read from the base model."""
    if not isinstance(recipe, Read):
        raise AssertionError(f"a merged tensor other than a pass-through: {recipe}")
    return origins.read(BASE_TAG, recipe)


def _merge_recipes(plan: Plan, mlps: dict[int, DenseMLP], merge: MergeConfig,
                   spec: UpcycleSpec, target: Target, origins: Origins, dtype: str
                   ) -> tuple[dict[str, Expr], dict[str, tuple[int, bool]]]:
    """Recipes of the expert, shared-expert and router tensors of every MoE layer (the
    projections read where the base model's dense MLP ``mlps`` lies, in each source;
    source i making routed experts i*G to i*G + G - 1 by the upcycling recipes of
    ``spec``), and the router tensors to compute (see ``MergePlan.routers``), which are
    computed in float32 and written straight in ``dtype``, as mergekit-moe rounds them
    once."""
    family = target.moe_family
    metas = {t.name: t for t in plan.tensors}
    recipes: dict[str, Expr] = {}
    routers: dict[str, tuple[int, bool]] = {}
    g = merge.granularity
    for index, layer in enumerate(sorted(plan.moe_layers)):
        block = family.block.format(layer=layer)
        routers[f"{block}.{family.router}"] = (index, False)
        for position, source in enumerate(merge.experts):
            mlp = _source_mlp(mlps[layer], f"expert{position}", origins)
            for expert in range(position * g, (position + 1) * g):
                made = expert_projections(mlp, _source_spec(spec, source), layer, expert,
                                          _scales(source, g))
                recipes.update({family.expert_key(layer, expert, name): recipe
                                for name, recipe in made.items()})
        if merge.shared_experts and target.shared is not None:
            shared = target.shared
            mlp = _source_mlp(mlps[layer], "shared0", origins)
            factors = _scales(merge.shared_experts[0], 1)
            for name, module in DENSE_PROJECTIONS.items():
                recipes[f"{block}.{shared.module}.{module}.weight"] = scaled(
                    mlp.projection(name), factors[name])
            if shared.gate is not None:
                routers[f"{block}.{shared.gate}"] = (index, True)
    for name in routers:
        computed = Read(name, (), metas[name].shape, dtype)
        recipes[name] = origins.read(ROUTER_TAG, computed)
    return recipes, routers


def _source_mlp(mlp: DenseMLP, tag: str, origins: Origins) -> DenseMLP:
    """The dense MLP ``mlp`` (where the base model's lies) read from checkpoint ``tag``."""
    return DenseMLP(*(None if read is None else origins.read(tag, read)
                      for read in (mlp.gate, mlp.up, mlp.down)))


def _source_spec(spec: UpcycleSpec, source: ExpertSource) -> UpcycleSpec:
    """The upcycling settings of ``source``'s routed experts: ``spec``, or Drop-Upcycling
    with the source's ``drop_ratio`` (and ``spec``'s seed, so that expert e of layer l
    re-initialises the neurons ``upcycle --method drop --seed S`` does)."""
    if source.drop_ratio is None:
        return spec
    return replace(spec, method="drop", drop_ratio=source.drop_ratio)


def _scales(source: ExpertSource, granularity: int) -> dict[str, float]:
    """The factors of the projections of ``source``'s experts, slices of G (1 for a
    shared expert): ``down_proj`` times ``residual_scale`` (computed in float32, rounded
    once, as mergekit's ``tensor * residual_scale`` on the CPU is) and times G (exact, as
    ``upcycle --method granular``'s scaling), one factor. Routed experts are not halved
    beside a shared expert as ``upcycle``'s are: mergekit-moe adds the shared expert,
    through its own gate, to whole routed experts."""
    factor = granularity * (1.0 if source.residual_scale is None else source.residual_scale)
    return {"gate": 1.0, "up": 1.0, "down": factor}
