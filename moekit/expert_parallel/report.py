"""What each EP rank will read and hold, computed from headers or from config.json alone."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from ..checkpoint import Checkpoint, read_config
from ..config_headers import DECODERS, config_headers
from ..errors import MoekitError, printable
from ..gc_pauses import without_gc_pauses
from ..hub import local_path
from ..layouts import LAYOUTS, Layout, family_of_model_type
from ..layouts.families import MX_BLOCKS, MX_SCALES, SCALE
from ..model_config import MAX_BUILT_LAYERS, ConfigValues
from ..planner import (Analysis, build_plan, config_settings, understand, understand_checkpoint,
                       validate)
from .ranges import expert_range, grouped_layout

MAX_RANKS = 1 << 16
"""The most ranks (dp x ep) ``ep_report`` tabulates: more than any training cluster
runs, few enough that a mistyped group size is refused at once rather than tabulated
rank by rank for minutes."""


@dataclass
class RankLoad:
    """One rank's share of a checkpoint."""

    rank: int
    """``dp_rank * ep_size + ep_rank`` on a (dp, ep) mesh; the EP rank when dp is 1."""
    experts: list[int]
    """First and last expert owned (empty when the rank owns none)."""
    expert_bytes: int
    other_bytes: int
    peak_bytes: int
    """Everything the rank holds after loading, plus the largest tensor it builds."""
    ep_rank: int = 0
    dp_rank: int = 0

    @property
    def read_bytes(self) -> int:
        return self.expert_bytes + self.other_bytes


@without_gc_pauses
def ep_report(path: str | Path, ep_size: int, layout: str | None = None,
              placement: str = "chunk", dp_size: int = 1) -> list[RankLoad]:
    """Per-rank experts, bytes read and peak memory for loading ``path`` on ``ep_size``
    ranks with the experts placed as ``placement`` says (``chunk`` or ``vllm``, see
    ``expert_range``). ``path`` is a checkpoint (or a Hub repo id), or a config.json (or a
    folder holding only one): then the tensors are those its Hub checkpoint holds
    (``config_headers``: FP8 scales and multi-token-prediction layers included), or for
    a model type that does not describe, those of the model transformers builds on the
    meta device. ``layout`` defaults to ``default_layout``'s choice.

    With ``dp_size`` > 1 the ranks form a (dp, ep) mesh of ``dp_size * ep_size`` ranks:
    experts ``Shard(0)`` over ep (replicated over dp), every other tensor ``Shard(0)`` over
    dp as FSDP2's ``fully_shard`` lays out its parameters (``ceil(rows / dp)`` rows a rank,
    the last ranks fewer or none; a scalar whole on every rank), replicated over ep. These
    figures are the planned read of each rank: moekit's loaders shard over ep only.

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
    analysis = _analysis(local_path(path, weights=False))
    plan = build_plan(analysis, _destination(analysis, layout), experts=range(1))
    n_experts = analysis.n_experts
    per_expert = [t.nbytes for t in plan.tensors if t.name in plan.expert_tensors]
    others = Counter((t.shape[0] if t.shape else None, t.nbytes) for t in plan.tensors
                     if t.name not in plan.expert_tensors)
    out = []
    for dp_rank in range(dp_size):
        shares = {(rows, nbytes): _row_share(rows, nbytes, dp_size, dp_rank)
                  for rows, nbytes in others}
        held = sum(share * others[kind] for kind, share in shares.items())
        for rank in range(ep_size):
            mine = expert_range(n_experts, ep_size, rank, placement)
            expert = len(mine) * sum(per_expert)
            largest = max(max(shares.values(), default=0),
                          len(mine) * max(per_expert, default=0))
            owned = [mine.start, mine.stop - 1] if mine else []
            out.append(RankLoad(dp_rank * ep_size + rank, owned, expert, held,
                                expert + held + largest, rank, dp_rank))
    return out


def default_layout(analysis: Analysis) -> str:
    """The layout ranks load by default: nemo, or for experts stored with FP8 scales or as
    MXFP4 transformers, which holds them (NeMo AutoModel dequantises such checkpoints and
    holds no scale tensors)."""
    first = next(iter(analysis.blocks.values()), None)
    pieces = first.projections if first is not None else []
    return "transformers" if any(p.endswith((SCALE, MX_BLOCKS)) for p in pieces) else "nemo"


def _destination(analysis: Analysis, layout: str | None) -> Layout:
    """The grouped layout the ranks load (``layout``, else ``default_layout``'s), refused
    when it has no place for some of the experts' pieces (FP8 scales in nemo) with the
    layouts plan takes that do: plan has no ``--dequantize`` to offer, as convert has."""
    dst = grouped_layout(layout or default_layout(analysis))
    family = analysis.family
    present = {piece for block in analysis.blocks.values() for piece, _ in block.pieces}
    lost = sorted(p for p in present if not dst.holds(p, family))
    if not lost:
        return dst
    can = [name for name, found in LAYOUTS.items()
           if found.grouped and all(found.holds(p, family) for p in lost)]
    quantized = any(p.endswith((SCALE, MX_BLOCKS, MX_SCALES)) for p in lost)
    why = f" ({dst.quantized_note})" if quantized and dst.quantized_note else ""
    then = (f"plan {' or '.join(f'--layout {name}' for name in can)}" if can
            else "no grouped layout holds them")
    raise MoekitError(f"the {dst.name} layout cannot hold the {family.name} experts' "
                      f"{', '.join(lost)}{why}: {then}")


def _row_share(rows: int | None, nbytes: int, size: int, rank: int) -> int:
    """Bytes of rank ``rank``'s rows of a tensor of ``rows`` rows and ``nbytes`` bytes
    split ``Shard(0)`` over ``size`` ranks by FSDP2's rule (``torch.chunk``:
    ``ceil(rows / size)`` rows a rank, the last ranks fewer or none); a scalar (``rows``
    None) is held whole."""
    if rows is None:
        return nbytes
    per_rank = -(-rows // size)
    mine = max(0, min((rank + 1) * per_rank, rows) - rank * per_rank)
    return nbytes // rows * mine if rows else 0


def render(loads: list[RankLoad]) -> str:
    """A table, one row per rank (with its dp and ep coordinates on a 2-D mesh)."""
    mesh = any(r.dp_rank for r in loads)
    rows = [f"{'rank':>5}{'   dp   ep' if mesh else ''} {'experts':>10} {'expert GiB':>11} "
            f"{'other GiB':>10} {'read GiB':>9} {'peak GiB':>9}"]
    for r in loads:
        owned = f"{r.experts[0]}-{r.experts[1]}" if r.experts else "none"
        where = f" {r.dp_rank:>4} {r.ep_rank:>4}" if mesh else ""
        rows.append(f"{r.rank:>5}{where} {owned:>10} {r.expert_bytes / 2**30:11.2f} "
                    f"{r.other_bytes / 2**30:10.2f} {r.read_bytes / 2**30:9.2f} "
                    f"{r.peak_bytes / 2**30:9.2f}")
    return "\n".join(rows)


def to_json(loads: list[RankLoad]) -> list[dict]:
    return [{**asdict(r), "read_bytes": r.read_bytes} for r in loads]


def _analysis(path: Path) -> Analysis:
    """A checkpoint's headers, validated; or for a bare config.json the tensors its Hub
    checkpoint holds (``config_headers``: valid by construction), else those of the model
    transformers builds on the meta device (validated)."""
    config_only = path.suffix == ".json" or (path.is_dir() and not any(path.glob("*.safetensors")))
    if not config_only:
        analysis = understand_checkpoint(Checkpoint.open(path))
        validate(analysis)
        return analysis
    folder, name = (path.parent, path.name) if path.suffix == ".json" else (path, "config.json")
    config = read_config(folder, name)
    if config is None:
        raise MoekitError(f"{path} is neither a checkpoint nor a config.json")
    source = str(folder / name)
    if not isinstance(config, dict):
        raise MoekitError(f"{source} holds a JSON {type(config).__name__}, not an object")
    if not isinstance(config.get("model_type"), str):
        raise MoekitError(f"{source} has no model_type: moekit plans from a model's "
                          "config.json or from its checkpoint")
    _check_buildable(config, source)
    headers = config_headers(config, source, routed=1)
    if headers is not None:
        return understand(headers, config, {}, source, from_="hf", config_file=source)
    if config.get("quantization_config") is not None:
        raise MoekitError(f"{source}: moekit describes the quantised tensors of "
                          f"{', '.join(DECODERS)} checkpoints from a config.json alone, not "
                          f"those of model_type {printable(repr(config.get('model_type')))}: "
                          "plan from the checkpoint's files instead")
    analysis = understand(_meta_headers(config, source), config, {}, source,
                          from_="transformers", config_file=source)
    validate(analysis)
    return analysis


def _check_buildable(config: dict, source: str) -> None:
    """Check what a config says of its experts and layers before its tensors are described
    or transformers builds the model: the counts typed and bounded, and at most
    ``MAX_BUILT_LAYERS`` decoder layers (either takes time per layer, building even on the
    meta device)."""
    family = family_of_model_type(config.get("model_type"))
    settings = config_settings(config, family, source) if family is not None else None
    rule = settings.moe_layers if settings is not None else None
    layers = rule.count if rule is not None else ConfigValues(config, source).integer(
        "num_hidden_layers")
    if layers is not None and layers > MAX_BUILT_LAYERS:
        raise MoekitError(f"{source} declares {layers} decoder layers; moekit plans from a "
                          f"config.json alone for at most {MAX_BUILT_LAYERS} (it describes or "
                          "builds each layer): plan from the checkpoint's files instead")


def _meta_headers(config: dict, source: str) -> dict:
    """Shapes and dtypes of the state dict transformers builds for ``config``, on the meta
    device (no memory). Only this path imports torch and transformers."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..conversion import state_dict_meta
    except ImportError as err:
        raise MoekitError("planning from a config.json alone needs transformers") from err
    settings = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        model_config = AutoConfig.for_model(**settings)
        dtype = model_config.dtype or torch.bfloat16
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    except Exception as err:  # transformers' own errors on a config it cannot build
        raise MoekitError(f"transformers cannot build the model {source} describes: "
                          f"{type(err).__name__}: {err}") from None
    return state_dict_meta(model.state_dict(), allow_meta=True)
