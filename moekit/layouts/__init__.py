"""Layouts (how expert tensors are named and shaped) and model families, as data."""

from __future__ import annotations

from ..errors import MoekitError
from .base import ExpertBlock, Layout, ParsedExperts
from .families import FAMILIES, PROJECTIONS, Family, family_named, family_of_model_type
from .grouped import NEMO, TRANSFORMERS, VLLM, GroupedLayout, GroupedTensor
from .hf import PerExpertLayout
from .megatron import MEGATRON
from .torchtitan import TORCHTITAN

HF = PerExpertLayout()

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (HF, NEMO, TRANSFORMERS, VLLM, TORCHTITAN,
                                                          MEGATRON)}

BY_KEYS: dict[str, Layout] = {name: layout for name, layout in LAYOUTS.items()
                              if layout.found_by_keys}
"""The layouts that key names tell apart (``Layout.found_by_keys``)."""


def layout_named(name: str) -> Layout:
    """The layout called ``name``; a MoekitError lists the known ones otherwise."""
    if not isinstance(name, str) or name not in LAYOUTS:
        raise MoekitError(f"unknown layout {name!r}; known layouts: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


__all__ = [
    "BY_KEYS", "FAMILIES", "HF", "LAYOUTS", "MEGATRON", "NEMO", "PROJECTIONS", "TORCHTITAN", "TRANSFORMERS", "VLLM",
    "ExpertBlock", "Family", "GroupedLayout", "GroupedTensor", "Layout", "ParsedExperts", "PerExpertLayout",
    "family_named", "family_of_model_type", "layout_named",
]
