"""What every layout provides: parse its tensors into canonical expert pieces, and emit
its tensors from canonical pieces.

The canonical piece is one expert's projection weight as a Hugging Face ``nn.Linear``
stores it, ``[out, in]``: gate and up ``[I, H]``, down ``[H, I]``. Converting A -> B is
``B.emit(A.parse(...))``; the recipes compose, so no pair of layouts needs its own code.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from ..plan import Expr, TensorMeta, TensorPlan
from .families import Family, rename


@dataclass
class ExpertBlock:
    """The routed experts of one MoE layer, as canonical per-expert pieces."""

    layer: int
    block: str
    """The block's key prefix in HF naming, e.g. ``model.layers.3.mlp``."""
    pieces: dict[tuple[str, int], Expr] = field(default_factory=dict)
    """(projection, expert) -> recipe giving that expert's ``[out, in]`` weight."""
    names: dict[tuple[str, int], str] = field(default_factory=dict)
    """(projection, expert) -> the source key the piece is read from (for messages)."""

    @property
    def experts(self) -> list[int]:
        return sorted({e for _, e in self.pieces})

    @property
    def projections(self) -> list[str]:
        return sorted({p for p, _ in self.pieces})


@dataclass
class ParsedExperts:
    """What a layout found in a set of keys."""

    blocks: dict[int, ExpertBlock] = field(default_factory=dict)
    claimed: set[str] = field(default_factory=set)
    """Source keys that hold routed-expert weights (everything else passes through)."""
    problems: list[tuple[int, str]] = field(default_factory=list)
    """(layer, message) for every malformed expert tensor."""

    def block(self, layer: int, family: Family) -> ExpertBlock:
        if layer not in self.blocks:
            self.blocks[layer] = ExpertBlock(layer, family.block.format(layer=layer))
        return self.blocks[layer]


class Layout(ABC):
    """A way of naming and shaping routed-expert tensors."""

    name: str
    description: str

    @abstractmethod
    def parse(self, tensors: dict[str, TensorMeta], family: Family) -> ParsedExperts:
        """Find this layout's expert tensors among ``tensors`` (keys in this layout's
        naming) and express each expert's projections as canonical pieces."""

    def holds(self, piece: str, family: Family) -> bool:
        """True when this layout has a place for ``piece`` (a projection or its bias)."""
        return True

    @abstractmethod
    def emit(self, block: ExpertBlock, n_experts: int, family: Family) -> list[TensorPlan]:
        """The destination tensors of one MoE block in this layout."""

    def to_hf_key(self, key: str, family: Family) -> str:
        """This layout's name of a non-expert tensor -> the HF name."""
        return rename(key, family.renames.get(self.name, ()), reverse=True)

    def from_hf_key(self, key: str, family: Family) -> str:
        """The HF name of a non-expert tensor -> this layout's name."""
        return rename(key, family.renames.get(self.name, ()))

    def expert_region(self, family: Family) -> re.Pattern[str]:
        """Keys that lie inside an experts module of ``family`` (in this layout's naming)."""
        block = re.escape(self.from_hf_key(family.block + ".", family)[:-1])
        return re.compile("^" + block.replace(r"\{layer\}", r"(?P<layer>\d+)") + r"\.experts\.")
