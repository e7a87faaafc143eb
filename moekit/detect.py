"""Detecting a checkpoint's model family and expert layout from its keys, config.json and
the layout moekit recorded in the safetensors metadata."""

from __future__ import annotations

from collections.abc import Mapping

from .checkpoint import FAMILY_METADATA_KEY, LAYOUT_METADATA_KEY
from .errors import NAME_A_CONFIG, MoekitError, printable
from .layouts import BY_KEYS, HF, LAYOUTS, Family, Layout, family_named, family_of_model_type, layout_named
from .layouts.base import TensorMeta
from .layouts.families import FAMILIES, GENERIC_FAMILIES


def detect_family(tensors: Mapping[str, TensorMeta], config: dict | None,
                  metadata: Mapping[str, str]) -> Family:
    """The family named by moekit's metadata or config.json's model_type; else the
    generic family whose expert naming the keys use (qwen style when there is none)."""
    recorded = family_named(metadata.get(FAMILY_METADATA_KEY, ""))
    if recorded:
        return recorded
    known = family_of_model_type((config or {}).get("model_type"))
    if known:
        return known
    for family in GENERIC_FAMILIES:
        if _in_experts(tensors, family):
            return family
    return GENERIC_FAMILIES[0]


def detect_layout(tensors: Mapping[str, TensorMeta], family: Family,
                  metadata: Mapping[str, str], label: str) -> Layout:
    """The layout recorded in the metadata, else the one that recognises the most expert
    tensors among the keys. A dense checkpoint (no expert tensors) is in the HF layout."""
    recorded = metadata.get(LAYOUT_METADATA_KEY)
    if recorded:
        return layout_named(recorded)
    in_experts = _in_experts(tensors, family)
    best, score = _best_layout({key: tensors[key] for key in in_experts}, family)
    if max(score) > 0:
        return best
    if in_experts:
        raise MoekitError(
            f"cannot detect the expert layout of {label}: tensors such as "
            f"{printable(in_experts[0])} belong "
            f"to no known layout ({', '.join(LAYOUTS)}); name it with --from")
    _refuse_unnamed_whole_model(tensors, family, label)
    return HF


def refuse_packed(tensors: Mapping[str, TensorMeta], family: Family, label: str) -> None:
    """Refuse experts packed by compressed-tensors (``PACKED_KEY``) in any layout's naming,
    whether the source layout is given or detected, and where other experts are not packed
    (a copy dequantized in part)."""
    regions = [layout.expert_region(family) for layout in BY_KEYS.values()]
    packed = next((key for key in tensors if key.endswith(PACKED_KEY)
                   and any(region.match(key) for region in regions)), None)
    if packed:
        raise MoekitError(
            f"{label} holds its experts packed by compressed-tensors ({printable(packed)}, "
            "with its weight_scale and weight_shape: 4- or 8-bit integers in int32 words), "
            "which moekit neither reads nor writes; convert a copy of the checkpoint whose "
            "experts are dequantized (bf16)")


def _refuse_unnamed_whole_model(tensors: Mapping[str, TensorMeta], family: Family,
                                label: str) -> None:
    """Refuse keys that a whole-model layout (torchtitan's, Megatron-Core's) gives the
    experts of the families it names, when ``family`` (found without a config.json naming
    the model type) is none of them: those names are read back only through the family's
    rules, so the checkpoint would otherwise pass as a dense one under foreign names."""
    for layout in BY_KEYS.values():
        named = [f for f in FAMILIES if layout.names_family(f)]
        if len(named) == len(FAMILIES) or family in named:
            continue
        for other in named:
            region = layout.expert_region(other)
            key = next((k for k in tensors if region.match(k)), None)
            if key is not None:
                families = ", ".join(f.name for f in named)
                raise MoekitError(
                    f"{label} holds {layout.name}'s names ({printable(key)}), which moekit "
                    f"reads once a config.json beside them names the model's family (one of "
                    f"{families}); it has none that does ({NAME_A_CONFIG})")


PACKED_KEY = ".weight_packed"
"""What the key of a weight that compressed-tensors packs (``pack-quantized``: Kimi-K2.5's
INT4 experts on the Hub) ends with, in place of ``.weight``."""
SAMPLE = 1024
"""Expert keys a layout is judged on: a checkpoint is in one layout, and the chosen
layout's full parse then validates every key (and reports any that do not fit)."""


def _in_experts(tensors: Mapping[str, TensorMeta], family: Family, limit: int = SAMPLE
                ) -> list[str]:
    """Up to ``limit`` keys inside an experts module of ``family`` in any layout's naming."""
    regions = [layout.expert_region(family) for layout in BY_KEYS.values()]
    found: list[str] = []
    for key in tensors:
        if any(region.match(key) for region in regions):
            found.append(key)
            if len(found) == limit:
                break
    return found


def _best_layout(sample: Mapping[str, TensorMeta], family: Family
                 ) -> tuple[Layout, tuple[int, int]]:
    """The layout that recognises the most of ``sample`` (``_recognised``; the first of
    ``BY_KEYS`` where several do) and its score. A layout that reads every key of the
    sample cleanly scores (len(sample), 0), which no later layout can beat (a layout
    claims only keys of the sample, and finds a tensor misshapen only with a problem
    reported), so the layouts after it are not tried."""
    scores: dict[str, tuple[int, int]] = {}
    for name, layout in BY_KEYS.items():
        scores[name] = _recognised(layout, sample, family)
        if scores[name] == (len(sample), 0):
            break
    best = max(scores, key=lambda name: scores[name])
    return BY_KEYS[best], scores[best]


def _recognised(layout: Layout, tensors: Mapping[str, TensorMeta], family: Family
                ) -> tuple[int, int]:
    """How many expert tensors ``layout`` reads cleanly (malformed ones count against it),
    then how many it names but finds misshapen: a checkpoint whose expert tensors are all
    misshapen is read in the layout that names them, and its shapes are reported."""
    parsed = layout.parse(dict(tensors), family)
    return (len(parsed.claimed) - len(parsed.problems),
            sum(len(pieces) for pieces in parsed.unreadable.values()))
