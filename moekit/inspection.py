"""What is inside a checkpoint: family, layout, MoE and dense layers, sizes, dtypes."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from .errors import MoekitError, compress_ranges, printable, shortened
from .gc_pauses import without_gc_pauses
from .layouts.base import ExpertBlock
from .layouts.families import FP8_SCALE_KEY, MXFP4_BLOCKS_KEY, MXFP4_SCALES_KEY
from .plan import TensorMeta, nbytes
from .planner import Analysis, analyse_checkpoint, layer_numbers, unread_experts
from .sizes import format_size


@dataclass
class CheckpointInfo:
    """A checkpoint's description, as ``moekit inspect`` prints it."""

    path: str
    family: str
    layout: str
    model_type: str | None
    n_experts: int
    moe_layers: list[int]
    dense_layers: list[int]
    hidden_size: int | None
    expert_intermediate_size: int | None
    shared_expert_intermediate_size: int | None
    mtp_layers: list[int] = field(default_factory=list)
    """MoE layers after the decoder stack: multi-token-prediction layers (DeepSeek-V3's
    and GLM-4.5's ``num_nextn_predict_layers``), also in ``moe_layers``."""
    expert_pieces: list[str] = field(default_factory=list)
    """What each routed expert holds: gate, up, down (no gate: non-gated), *_bias, and
    *_scale (FP8 block scales)."""
    quantization: str | None = None
    """e.g. "fp8 e4m3, 128x128 block scales"; None for plain floating-point weights."""
    expert_groups: list[dict[str, object]] = field(default_factory=list)
    """Where each MoE layer holds several groups of routed experts (ERNIE-4.5-VL's text and
    vision experts), each group's name, experts and intermediate size, in the order the HF
    files number them; ``expert_intermediate_size`` is then None."""
    dtypes: dict[str, int] = field(default_factory=dict)
    """dtype -> bytes."""
    total_bytes: int = 0
    layer_bytes: dict[int, int] = field(default_factory=dict)
    n_tensors: int = 0
    training_state: dict[str, int] = field(default_factory=dict)
    """A training checkpoint's entries beside the model (optimizer state, ...), which
    moekit does not read: how many under each root."""

    def to_json(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        """Human-readable summary (every line ``printable`` and of bounded length: a
        model_type or path read from a file may be megabytes long)."""
        lines = [
            f"{self.path}",
            f"  family            {self.family} (model_type {self.model_type})",
            f"  layout            {self.layout}",
            f"  tensors           {self.n_tensors}, {format_size(self.total_bytes)}",
            "  dtypes            " + ", ".join(f"{d} {format_size(b)}" for d, b in self.dtypes.items()),
        ]
        if self.moe_layers:
            lines += [
                f"  MoE layers        {compress_ranges(self.moe_layers)} ({len(self.moe_layers)})"
                + (f", multi-token prediction {compress_ranges(self.mtp_layers)}"
                   if self.mtp_layers else ""),
                f"  routed experts    E={self.n_experts}, "
                + (f"in {len(self.expert_groups)} groups" if self.expert_groups else
                   f"I={self.expert_intermediate_size}") + f", H={self.hidden_size}",
                *(f"  expert group      {g['name']}: E={g['experts']}, "
                  f"I={g['intermediate_size']}" for g in self.expert_groups),
                f"  expert pieces     {', '.join(self.expert_pieces)}"
                + ("" if "gate" in self.expert_pieces else " (non-gated)")
                + (" (with biases)" if any(p.endswith("_bias") for p in self.expert_pieces)
                   else ""),
            ]
            if self.shared_expert_intermediate_size:
                lines.append(f"  shared expert     I={self.shared_expert_intermediate_size}")
        lines.append(f"  dense layers      {compress_ranges(self.dense_layers) or 'none'}")
        if self.quantization:
            lines.append(f"  quantization      {self.quantization}")
        if self.layer_bytes:
            per_layer = sorted(set(self.layer_bytes.values()))
            shown = (format_size(per_layer[0]) if len(per_layer) == 1 else
                     f"{format_size(per_layer[0])} to {format_size(per_layer[-1])}")
            lines.append(f"  bytes per layer   {shown}")
        if self.training_state:
            lines.append("  not read          training state (entries): " + ", ".join(
                f"{root} {count}" for root, count in self.training_state.items()))
        return "\n".join(shortened(printable(line), MoekitError.LINE_LIMIT) for line in lines)


@without_gc_pauses
def inspect(path: str | Path, from_: str | None = None,
            config: str | Path | None = None) -> CheckpointInfo:
    """Describe the checkpoint at ``path`` from its headers and config.json (``config``'s
    where given: ``Checkpoint.open``). A checkpoint whose config declares routed experts
    that no tensor reads as (a family moekit does not know) is refused, saying so, rather
    than described as a dense model."""
    checkpoint, analysis = analyse_checkpoint(path, from_, config)
    if not analysis.blocks and analysis.settings and analysis.settings.declared:
        raise MoekitError(f"cannot describe {printable(str(checkpoint.path))}: "
                          + unread_experts(analysis.settings))
    dtypes: dict[str, int] = defaultdict(int)
    for info in checkpoint.tensors.values():
        dtypes[info.dtype] += _nbytes(tuple(info.shape), info.dtype)
    model = checkpoint.made or checkpoint.tensors  # the model's tensors, however stored
    layer_bytes = _layer_bytes(analysis)
    moe = sorted(analysis.blocks)
    first = analysis.blocks[moe[0]] if moe else None
    gate = first.pieces.get(("gate", 0), first.pieces.get(("up", 0))) if first else None
    return CheckpointInfo(
        path=str(checkpoint.path),
        family=analysis.family.name if moe else f"dense ({checkpoint.model_type or 'unknown'})",
        layout=analysis.layout.name,
        model_type=checkpoint.model_type, n_experts=analysis.n_experts if moe else 0,
        moe_layers=moe, mtp_layers=_mtp_layers(moe, analysis),
        dense_layers=[l for l in sorted(layer_bytes) if l not in analysis.blocks],
        hidden_size=gate.shape[1] if gate else None,
        expert_intermediate_size=(gate.shape[0] if gate and not analysis.family.expert_groups
                                  else None),
        shared_expert_intermediate_size=_shared_size(analysis),
        expert_pieces=[p for p in analysis.family.all_pieces
                       if first and any(q == p for q, _ in first.pieces)],
        quantization=_quantization(model),
        expert_groups=_expert_groups(first, analysis),
        dtypes=dict(dtypes), total_bytes=sum(dtypes.values()), layer_bytes=layer_bytes,
        n_tensors=len(model), training_state=dict(checkpoint.training_state))


def _expert_groups(first: ExpertBlock | None, analysis: Analysis) -> list[dict[str, object]]:
    """Each expert group's name, experts and intermediate size (the rows of its first
    expert's gate, or up where there is no gate, in the first MoE layer)."""
    groups = analysis.family.expert_groups
    if first is None or not groups:
        return []
    size = analysis.n_experts // len(groups)
    found = []
    for k, group in enumerate(groups):
        piece = first.pieces.get(("gate", k * size), first.pieces.get(("up", k * size)))
        found.append({"name": group.name, "experts": size,
                      "intermediate_size": piece.shape[0] if piece else None})
    return found


def _mtp_layers(moe: list[int], analysis: Analysis) -> list[int]:
    """The MoE layers the config places after its decoder layers (its MTP layers)."""
    rule = analysis.settings.moe_layers if analysis.settings else None
    return [layer for layer in moe if rule is not None and layer in rule.extra]


def _quantization(tensors: Mapping[str, TensorMeta]) -> str | None:
    """FP8 weights with ``weight_scale_inv`` block scales (the block size is what makes
    the scale shape ``ceil(out/block)`` x ``ceil(in/block)``), or MXFP4 ``*_blocks`` with
    ``*_scales``."""
    for key, info in tensors.items():
        if (key.endswith(MXFP4_BLOCKS_KEY)
                and key[:-len(MXFP4_BLOCKS_KEY)] + MXFP4_SCALES_KEY in tensors):
            return "mxfp4 (FP4 E2M1 in groups of 32, E8M0 scales)"
        scale = tensors.get(key + FP8_SCALE_KEY)
        if scale is None or len(info.shape) != 2 or not info.dtype.startswith("F8"):
            continue
        fp8 = {"F8_E4M3": "e4m3", "F8_E5M2": "e5m2"}.get(info.dtype, info.dtype)
        for block in (128, 64, 32, 256):
            if tuple(scale.shape) == tuple(-(-n // block) for n in info.shape):
                return f"fp8 {fp8}, {block}x{block} block scales"
        return f"fp8 {fp8}, scales {list(scale.shape)} for {list(info.shape)}"
    return None


def _layer_bytes(analysis: Analysis) -> dict[int, int]:
    """Bytes of each decoder layer, its tensors found under the names the family's HF
    files give them (``Analysis.tensors``: save_pretrained's Kimi-K2.5 names and a
    Megatron-Core folder's chunks read as those), a tower's layers counted in none."""
    layer_of = layer_numbers(analysis)
    found: dict[int, int] = defaultdict(int)
    for key, info in analysis.tensors.items():
        layer = layer_of(key)
        if layer is not None:
            found[layer] += _nbytes(tuple(info.shape), info.dtype)
    return dict(found)


_nbytes = lru_cache(maxsize=1 << 12)(nbytes)
"""``nbytes``, cached: the tens of thousands of tensors of a checkpoint have a few hundred
shapes."""


def _shared_size(analysis: Analysis) -> int | None:
    """Intermediate size of the shared expert of the first MoE layer, if the family has one."""
    name = analysis.family.shared_expert
    if not name or not analysis.blocks:
        return None
    family = analysis.family
    block = analysis.blocks[min(analysis.blocks)].block
    hf_key = f"{block}.{name}.{family.projections['up']}.weight"
    info = analysis.tensors.get(analysis.layout.from_hf_key(hf_key, family))
    return info.shape[0] if info and info.shape else None

