"""What each EP rank will read and hold, computed from headers or from config.json alone."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from ..checkpoint import Checkpoint, is_checkpoint_folder, read_config
from ..config_headers import DECODERS, config_headers
from ..errors import MoekitError, printable
from ..gc_pauses import without_gc_pauses
from ..hub import local_path
from ..layouts import LAYOUTS, TRANSFORMERS, Family, Layout, family_of_model_type
from ..model_config import MAX_BUILT_LAYERS, ConfigValues, shown
from ..plan import Plan, TensorPlan, nbytes, reads
from ..planner import (Analysis, config_settings, split_groups_refusal, understand,
                       understand_checkpoint, validate)
from .ranges import EP_LAYOUTS, chunk, expert_range, grouped_layout, plan_if_held, planned

MAX_RANKS = 1 << 16
"""The most ranks (dp x ep) ``ep_report`` tabulates: more than any training cluster
runs, few enough that a mistyped group size is refused at once rather than tabulated
rank by rank for minutes."""


@dataclass
class RankLoad:
    """One rank's share of a checkpoint: what it holds once loaded, and what
    ``load_sharded`` reads for it (``load_experts`` reads what a rank of a 1-D ep mesh
    holds)."""

    rank: int
    """``dp_rank * ep_size + ep_rank`` on a (dp, ep) mesh; the EP rank when dp is 1."""
    layout: str
    """The grouped layout the rank loads the experts in."""
    experts: list[int]
    """First and last expert owned (empty when the rank owns none)."""
    expert_bytes: int
    """Bytes of the experts the rank holds."""
    other_bytes: int
    """Bytes of its rows of every other tensor."""
    expert_read_bytes: int
    """Bytes of the experts ``load_sharded`` reads on this rank: its dp rank's chunk of
    its ep rank's experts (the ranks of a dp group gather the rest)."""
    other_read_bytes: int
    """Bytes of the other tensors' rows ``load_sharded`` reads on this rank: its ep rank's
    chunk of its dp rank's rows, a scalar whole (the ranks of an ep group gather the
    rest)."""
    peak_bytes: int
    """Everything the rank holds after loading, plus the largest tensor it builds."""
    ep_rank: int = 0
    dp_rank: int = 0

    @property
    def held_bytes(self) -> int:
        return self.expert_bytes + self.other_bytes

    @property
    def read_bytes(self) -> int:
        return self.expert_read_bytes + self.other_read_bytes


@without_gc_pauses
def ep_report(path: str | Path, ep_size: int, layout: str | None = None,
              placement: str = "chunk", dp_size: int = 1,
              config: str | Path | None = None) -> list[RankLoad]:
    """Per-rank experts, bytes held and read, and peak memory for loading ``path`` on
    ``ep_size`` ranks with the experts placed as ``placement`` says (``chunk`` or
    ``vllm``, see ``expert_range``). ``path`` is a checkpoint (or a Hub repo id), or a
    config.json (or a folder holding only one): then the tensors are those its Hub
    checkpoint holds (``config_headers``: FP8 scales and multi-token-prediction layers
    included), or for a model type that does not describe, those of the model
    transformers builds on the meta device. ``layout`` defaults to the first of
    ``EP_LAYOUTS`` (nemo, then the others) that holds the checkpoint (``_planned``).
    ``config`` names the model's config.json a checkpoint is read by (``Checkpoint.open``).

    The ranks form a (dp, ep) mesh of ``dp_size * ep_size`` ranks, as ``load_sharded``
    lays a checkpoint out on it: experts ``Shard(0)`` over ep (replicated over dp), every
    other tensor ``Shard(0)`` over dp as FSDP2's ``fully_shard`` lays out its parameters
    (``ceil(rows / dp)`` rows a rank, the last ranks fewer or none; a scalar whole on
    every rank), replicated over ep. Each rank holds those bytes and reads its share of
    them (``RankLoad``): ``load_sharded`` reads each byte once over the mesh, scalars once
    a rank. ``load_experts`` (a 1-D ep mesh, ``dp_size`` 1) reads what a rank holds.

    The whole checkpoint is validated, and planned for one expert a layer: a rank's
    grouped tensors hold its share of every expert row, each expert's rows as large as
    the first one's, so its figures follow from its expert count."""
    for name, size in (("expert-parallel", ep_size), ("data-parallel", dp_size)):
        if type(size) is not int or size < 1:
            raise MoekitError(f"the {name} group size is {size!r}; expected a whole "
                              "number of ranks, at least 1")
    if dp_size * ep_size > MAX_RANKS:
        raise MoekitError(f"a mesh of {dp_size} x {ep_size} = {dp_size * ep_size:,} ranks; "
                          f"moekit plans for at most {MAX_RANKS:,} ranks")
    analysis = _analysis(local_path(path, weights=False), config)
    dst, plan = _planned(analysis, layout)
    n_experts = analysis.n_experts
    per_expert = [t.nbytes for t in plan.tensors if t.name in plan.expert_tensors]
    others = Counter(_Other.of(t) for t in plan.tensors if t.name not in plan.expert_tensors)
    out = []
    for dp_rank in range(dp_size):
        held = {kind: kind.held(dp_size, dp_rank) for kind in others}
        held_bytes = sum(share * others[kind] for kind, share in held.items())
        for rank in range(ep_size):
            mine = expert_range(n_experts, ep_size, rank, placement)
            experts_read = _chunk_length(len(mine), dp_size, dp_rank)
            other_read = sum(kind.read(dp_size, dp_rank, ep_size, rank) * count
                             for kind, count in others.items())
            largest = max(max(held.values(), default=0),
                          len(mine) * max(per_expert, default=0))
            expert = len(mine) * sum(per_expert)
            owned = [mine.start, mine.stop - 1] if mine else []
            out.append(RankLoad(dp_rank * ep_size + rank, dst.name, owned, expert,
                                held_bytes, experts_read * sum(per_expert), other_read,
                                expert + held_bytes + largest, rank, dp_rank))
    return out


class _Other(NamedTuple):
    """A kind of non-expert tensor, as far as its shares go (tensors of one kind share
    them: counting kinds keeps a large mesh fast)."""

    rows: int | None
    """Its rows; None for a scalar, held whole."""
    row_bytes: int
    whole_read: int | None
    """Bytes ``load_sharded`` reads on every rank: a scalar whole, or for a tensor its
    recipe builds, the source bytes the recipe reads; None for a source tensor copied
    unchanged, of which each rank reads its rows only."""

    @classmethod
    def of(cls, tensor: TensorPlan) -> "_Other":
        rows = tensor.shape[0] if tensor.shape else None
        row_bytes = tensor.nbytes // rows if rows else tensor.nbytes
        whole = (None if rows is not None and tensor.is_copy
                 else sum(nbytes(r.shape, r.dtype) for r in reads(tensor.recipe)))
        return cls(rows, row_bytes, whole)

    def held(self, dp_size: int, dp_rank: int) -> int:
        """Bytes of dp rank ``dp_rank``'s rows (FSDP2's ``Shard(0)``); a scalar whole."""
        if self.rows is None:
            return self.row_bytes
        return self.row_bytes * _chunk_length(self.rows, dp_size, dp_rank)

    def read(self, dp_size: int, dp_rank: int, ep_size: int, ep_rank: int) -> int:
        """Bytes ``load_sharded`` reads on the rank at (``dp_rank``, ``ep_rank``): its ep
        rank's chunk of its dp rank's rows."""
        if self.whole_read is not None:
            return self.whole_read
        held = _chunk_length(self.rows, dp_size, dp_rank)
        return self.row_bytes * _chunk_length(held, ep_size, ep_rank)


def _chunk_length(length: int, parts: int, index: int) -> int:
    """How many of ``length`` rows part ``index`` of ``parts`` gets (``chunk``)."""
    part = chunk(length, parts, index)
    return part.stop - part.start


def _planned(analysis: Analysis, layout: str | None) -> tuple[Layout, Plan]:
    """The layout the ranks load and its plan of one expert a layer: ``layout``, else the
    first of ``EP_LAYOUTS`` in which the checkpoint plans (transformers for experts with
    FP8 scales or in MXFP4, which NeMo AutoModel dequantises and holds no scales of; vllm
    for FP8 experts whose size is not a whole number of scale blocks, which transformers'
    joined gate+up scale grid cannot hold, or for a family whose nemo and transformers
    layouts are refused), refused as nemo is where none is."""
    if layout is not None:
        dst = grouped_layout(layout)
        return dst, _one_expert_plan(analysis, dst)
    for name in EP_LAYOUTS:
        plan = plan_if_held(analysis, LAYOUTS[name])
        if plan is not None:
            return LAYOUTS[name], plan
    first = LAYOUTS[EP_LAYOUTS[0]]
    return first, _one_expert_plan(analysis, first)  # refused, with nemo's reason


def _one_expert_plan(analysis: Analysis, dst: Layout) -> Plan:
    """The plan of one expert a layer in ``dst``, a refusal naming the ``--layout``
    options in which the checkpoint plans (``planned``)."""
    return planned(analysis, dst, lambda can: _instead(can, analysis.family))


def _instead(can: list[str], family: Family) -> str:
    """What to plan instead: the ``--layout`` options ``can``."""
    return (f"plan {' or '.join(f'--layout {name}' for name in can)}" if can
            else f"plan takes no other layout that holds the {family.name} experts")


def render(loads: list[RankLoad], *, chosen: bool) -> str:
    """The layout the ranks load (``chosen``: as given; else said to be the default), then
    a table, one row per rank (with its dp and ep coordinates on a 2-D mesh): bytes held,
    by kind and in all, and bytes ``load_sharded`` reads."""
    mesh = any(r.dp_rank for r in loads)
    layout = f"layout {loads[0].layout}" + ("" if chosen else (
        f": the first of {', '.join(EP_LAYOUTS)} that holds the checkpoint "
        "(--layout chooses one)"))
    rows = [layout, f"{'rank':>5}{'   dp   ep' if mesh else ''} {'experts':>10} "
            f"{'expert GiB':>11} {'other GiB':>10} {'held GiB':>9} {'read GiB':>9} "
            f"{'peak GiB':>9}"]
    for r in loads:
        owned = f"{r.experts[0]}-{r.experts[1]}" if r.experts else "none"
        where = f" {r.dp_rank:>4} {r.ep_rank:>4}" if mesh else ""
        rows.append(f"{r.rank:>5}{where} {owned:>10} {r.expert_bytes / 2**30:11.2f} "
                    f"{r.other_bytes / 2**30:10.2f} {r.held_bytes / 2**30:9.2f} "
                    f"{r.read_bytes / 2**30:9.2f} {r.peak_bytes / 2**30:9.2f}")
    return "\n".join(rows)


def to_json(loads: list[RankLoad]) -> list[dict]:
    return [{**asdict(r), "held_bytes": r.held_bytes, "read_bytes": r.read_bytes}
            for r in loads]


def _analysis(path: Path, config: str | Path | None = None) -> Analysis:
    """A checkpoint's headers (read by ``config`` where given), validated; or for a bare
    config.json (or a folder holding only one) the tensors its Hub checkpoint holds
    (``config_headers``: valid by construction), else those of the model transformers
    builds on the meta device (validated)."""
    config_only = path.suffix == ".json" or (path.is_dir() and not any(
        path.glob("*.safetensors")) and not is_checkpoint_folder(path))
    if not config_only or config is not None:
        analysis = understand_checkpoint(Checkpoint.open(path, config))
        validate(analysis)
        return analysis
    folder, name = (path.parent, path.name) if path.suffix == ".json" else (path, "config.json")
    values = read_config(folder, name)
    if values is None:
        raise MoekitError(f"{path} is neither a checkpoint nor a config.json")
    source = str(folder / name)
    if not isinstance(values, dict):
        raise MoekitError(f"{source} holds a JSON {type(values).__name__}, not an object")
    if not isinstance(values.get("model_type"), str):
        raise MoekitError(f"{source} has no model_type: moekit plans from a model's "
                          "config.json or from its checkpoint")
    _check_buildable(values, source)
    headers = config_headers(values, source, routed=1) if _built_as_described(values, source) \
        else None
    if headers is not None:
        return understand(headers, values, {}, source, from_="hf", config_file=source)
    if values.get("quantization_config") is not None:
        described = ", ".join(decoder.architecture for decoder in DECODERS.values())
        raise MoekitError(f"{source}: moekit describes quantised tensors from a config.json "
                          f"alone only for {described} (this config: model_type "
                          f"{printable(repr(values.get('model_type')))}, architectures "
                          f"{shown(values.get('architectures'))}): plan from the "
                          "checkpoint's files instead")
    _check_built_as_files(values, source)
    analysis = understand(_meta_headers(values, source), values, {}, source,
                          from_="transformers", config_file=source)
    validate(analysis)
    return analysis


def _check_buildable(config: dict, source: str) -> None:
    """Check what a config says of its experts and layers before its tensors are described
    or transformers builds the model: a family whose layers hold several expert groups
    refused (expert parallelism does not split them), the counts typed and bounded, and at
    most ``MAX_BUILT_LAYERS`` decoder layers (either takes time per layer, building even on
    the meta device)."""
    family = family_of_model_type(config.get("model_type"))
    if family is not None and family.expert_groups:
        raise MoekitError(split_groups_refusal(family))
    settings = config_settings(config, family, source) if family is not None else None
    rule = settings.moe_layers if settings is not None else None
    layers = rule.count if rule is not None else ConfigValues(config, source).integer(
        "num_hidden_layers")
    if layers is not None and layers > MAX_BUILT_LAYERS:
        raise MoekitError(f"{source} declares {layers} decoder layers; moekit plans from a "
                          f"config.json alone for at most {MAX_BUILT_LAYERS} (it describes or "
                          "builds each layer): plan from the checkpoint's files instead")


def _check_built_as_files(config: dict, source: str) -> None:
    """Refuse a config of a family whose tensors transformers converts on load
    (``Family.unconverted``): the model it builds holds them under other names or shapes
    than the checkpoint's files."""
    family = family_of_model_type(config.get("model_type"))
    reason = family.unconverted.get(TRANSFORMERS.name) if family is not None else None
    if reason:
        raise MoekitError(f"{source}: {reason} on load, so the model it builds does not hold "
                          f"the tensors of {family.name}'s files: plan from the checkpoint's "
                          "files instead")


def _meta_headers(config: dict, source: str) -> dict:
    """Shapes and dtypes of the state dict transformers builds for ``config``, on the meta
    device (no memory), with the class ``_model_class`` picks. Only this path imports torch
    and transformers."""
    try:
        import torch
        from transformers import AutoConfig, PretrainedConfig

        from ..conversion import state_dict_meta
    except ImportError as err:
        raise MoekitError("planning from a config.json alone needs transformers") from err
    settings = {k: v for k, v in config.items() if k != "quantization_config"}
    # save_pretrained writes an infinite or NaN float as {"__float__": "Infinity"} (JSON has
    # no such number; Nemotron-H's time_step_limit holds one): read as transformers does.
    decode = getattr(PretrainedConfig, "_decode_special_floats", None)
    if decode is not None:
        settings = decode(settings)
    try:
        model_config = AutoConfig.for_model(**settings)
        model_class = _model_class(model_config, source)
        dtype = model_config.dtype or torch.bfloat16
        with torch.device("meta"):
            model = model_class._from_config(model_config, dtype=dtype)
    except MoekitError:
        raise
    except Exception as err:  # transformers' own errors on a config it cannot build
        raise MoekitError(f"transformers cannot build the model {source} describes: "
                          f"{type(err).__name__}: {err}") from None
    return state_dict_meta(model.state_dict(), allow_meta=True)


MODEL_MAPPINGS = ("MODEL_FOR_CAUSAL_LM_MAPPING", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING",
                  "MODEL_FOR_MULTIMODAL_LM_MAPPING")
"""The mappings of transformers' ``AutoModelForCausalLM``, ``AutoModelForImageTextToText``
and ``AutoModelForMultimodalLM`` (transformers.models.auto.modeling_auto, 5.24), in the
order a config's model class is looked up in them: the language models whose files a
checkpoint holds, multimodal ones (Qwen3-VL-MoE, Qwen3-Omni) included."""


def _built_as_described(config: dict, source: str) -> bool:
    """Whether transformers builds ``config``'s model with the causal language model class
    that ``DECODERS`` describes the files of (as ``_model_class`` picks it: the first class
    ``architectures`` names that transformers has for the config, else the causal LM);
    transformers is imported only for an ``architectures`` other than none or that class."""
    names = _checked_architectures(config.get("architectures"), source)
    decoder = DECODERS.get(config.get("model_type"))
    if decoder is None or not names or names == [decoder.architecture]:
        return True
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    named = _named_class(names, CONFIG_MAPPING[config["model_type"]])
    return named is None or named.__name__ == decoder.architecture


def _checked_architectures(names: object, source: str) -> list[str] | None:
    """A config's ``architectures``: a list of model class names or None (as transformers
    declares it); refused naming the value otherwise."""
    if names is not None and not (isinstance(names, list)
                                  and all(isinstance(name, str) for name in names)):
        raise MoekitError(f"{source}: architectures is {shown(names)}; expected a list of "
                          "model class names")
    return names


def _named_class(names: list[str] | None, config_type: type) -> type | None:
    """The first class of ``names`` that transformers has for configs of ``config_type``
    (the class that saved the files), else None."""
    import transformers

    for name in names or ():
        named = getattr(transformers, name, None)
        if getattr(named, "config_class", None) is config_type:
            return named
    return None


def _model_class(model_config, source: str) -> type:
    """The class transformers builds the model of ``model_config`` with: the first one its
    ``architectures`` names that transformers has for this config class (the class that
    saved the checkpoint), else the first class of ``MODEL_MAPPINGS`` that transformers
    builds from the config itself; refused where there is none. A mapped class of the
    config's ``text_config`` is passed over: transformers builds it from that sub-config
    alone (auto_factory's ``from_config``, 5.24: ``AutoModelForCausalLM`` of Llama 4's or
    Qwen3.5-MoE's multimodal config), a text model whose tensors are not those of the
    files the multimodal model saves."""
    import transformers
    from transformers.models.auto import modeling_auto

    config_type = type(model_config)
    named = _named_class(_checked_architectures(model_config.architectures, source),
                         config_type)
    if named is not None:
        return named
    text_config = model_config.sub_configs.get("text_config")
    for mapping in MODEL_MAPPINGS:
        mapped = getattr(modeling_auto, mapping).get(config_type, None)
        if mapped is not None and (text_config is None
                                   or getattr(mapped, "config_class", None) is not text_config):
            return mapped
    raise MoekitError(f"{source}: transformers has no language model of model_type "
                      f"{printable(repr(model_config.model_type))} to describe its tensors "
                      "by: plan from the checkpoint's files instead")
