"""What every layout provides: parse its tensors into canonical expert pieces, and emit
its tensors from canonical pieces.

The canonical piece is one expert's projection weight as a Hugging Face ``nn.Linear``
stores it, ``[out, in]``: gate and up ``[I, H]``, down ``[H, I]``. Converting A -> B is
``B.emit(A.parse(...))``; the recipes compose, so no pair of layouts needs its own code.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from ..errors import printable
from ..plan import Expr, Plan, TensorMeta, TensorPlan
from .families import Family, rename

NUMBER = r"[^.]+"
"""What a ``{layer}`` or ``{expert}`` field of a key pattern captures: anything between
two dots, so that a number written other than canonically (``01``, ``+1``, ``1_0``,
non-ASCII digits) or not a number at all is found and reported
(``ParsedExperts.numbers``) rather than read as another key's number or passed through
as if it were no expert tensor."""
MAX_DIGITS = 9
CANONICAL_NUMBER = r"(?:0|[1-9][0-9]{0,%d})" % (MAX_DIGITS - 1)
"""A layer or expert number written canonically (``is_canonical``), as a pattern: a key
pattern built with it in place of ``NUMBER`` matches only keys whose numbers ``int()``
reads as they are written, leaving the others to the pattern that reports them."""
_CANONICAL = re.compile(CANONICAL_NUMBER, re.ASCII)


def is_canonical(number: str) -> bool:
    """Whether a layer or expert number is written canonically: ASCII ``0`` or
    ``[1-9][0-9]*`` of at most ``MAX_DIGITS`` digits. ``int()`` reads ``01`` and non-ASCII
    digits (fullwidth, Arabic-Indic, ...) as 1, so such a key beside ``experts.1`` would
    silently replace it or be replaced by it."""
    return _CANONICAL.fullmatch(number) is not None


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
    unreadable: dict[int, set[str]] = field(default_factory=dict)
    """layer -> the pieces whose tensor is present but malformed (reported in ``problems``;
    so not reported again as lacking)."""
    _odd: dict[int, tuple[int, str, int]] = field(default_factory=dict, repr=False)
    """layer -> (index in ``problems``, first message, count) of the keys whose numbers
    are not canonical: one problem a layer, however many keys (a zero-padded checkpoint
    has thousands)."""

    def block(self, layer: int, family: Family) -> ExpertBlock:
        if layer not in self.blocks:
            self.blocks[layer] = ExpertBlock(layer, family.block.format(layer=layer))
        return self.blocks[layer]

    def numbers(self, key: str, match: re.Match[str]) -> dict[str, int] | None:
        """The ``layer`` (and ``expert``) numbers of an expert key, claimed; or None, with
        a problem recorded, when one is not canonical.

        See ``is_canonical``.
        """
        self.claimed.add(key)
        found = match.groupdict()
        layer, expert = _number(found["layer"]), found.get("expert")
        if expert is None:
            if layer is not None:
                return {"layer": layer}
        elif layer is not None and (number := _number(expert)) is not None:
            return {"layer": layer, "expert": number}
        fields = {name: found[name] for name in _NUMBERED if found.get(name) is not None}
        bad = [(name, text) for name, text in fields.items() if _number(text) is None]
        shown = ", ".join(f"{name} number {ascii(text)}" for name, text in bad)
        self._add_odd(_listed_layer(fields["layer"]), f"{printable(key)} ({shown})")
        return None

    def _add_odd(self, layer: int, example: str) -> None:
        index, first, count = self._odd.get(layer, (len(self.problems), example, 0))
        count += 1
        more = f" and {count - 1} more {'key' if count == 2 else 'keys'}" if count > 1 else ""
        problem = (layer, f"{first}{more}: layer and expert numbers are written as ASCII "
                          f"digits without a leading zero (at most {MAX_DIGITS}); such a key "
                          "could name the same tensor as another, so moekit reads none of "
                          "them: rename the tensors")
        if index == len(self.problems):
            self.problems.append(problem)
        else:
            self.problems[index] = problem
        self._odd[layer] = (index, first, count)


_NUMBERED = ("layer", "expert")


@lru_cache(maxsize=1 << 12)
def _number(text: str) -> int | None:
    """``int(text)`` when ``text`` is canonical (``is_canonical``), else None. Cached: a
    checkpoint's tens of thousands of expert keys repeat a few hundred numbers."""
    return int(text) if is_canonical(text) else None


def _listed_layer(text: str) -> int:
    """The layer a problem about a key whose layer field is ``text`` is listed under: the
    value of its first ``MAX_DIGITS`` ASCII digits, or 0 when it has none."""
    digits = re.sub(r"[^0-9]", "", text)[:MAX_DIGITS]
    return int(digits) if digits else 0


class Layout(ABC):
    """A way of naming and shaping routed-expert tensors."""

    name: str
    description: str
    grouped: bool = False
    """True when all experts of a layer share a tensor ([E, ...]): what expert parallelism
    shards by rows."""
    found_by_keys: bool = True
    """False for a layout whose plan-level names are another's (Megatron-Core's are HF's,
    its files found by their folder): detection and the naming checks judge keys by the
    layouts found by keys (``layouts.BY_KEYS``)."""
    default_format: str = "safetensors"
    """The output format (``conversion.FORMATS``) this layout is written in unless
    ``--format`` names another: the one its consumer loads."""
    quantized_note: str = ""
    """Why this layout holds no quantisation tensors (FP8 scales, MXFP4 blocks), for the
    message refusing them; empty where it holds them."""
    mtp_note: str = ""
    """Why this layout holds no multi-token-prediction layers (``num_nextn_predict_layers``),
    for the message refusing a source that has them; empty where it holds them."""

    def grouped_for(self, family: Family) -> bool:
        """True when this layout holds ``family``'s experts in grouped tensors: ``grouped``,
        or for the hf layout, whether the family's files group them."""
        return self.grouped

    def joins_scale_blocks(self, family: Family) -> bool:
        """True when this layout lays the FP8 scales of gate and up as one grid over their
        joined rows (transformers' fused FP8 experts)."""
        return False

    @abstractmethod
    def parse(self, tensors: dict[str, TensorMeta], family: Family) -> ParsedExperts:
        """Find this layout's expert tensors among ``tensors`` (keys in this layout's
        naming) and express each expert's projections as canonical pieces."""

    def names_family(self, family: Family) -> bool:
        """True when this layout has names for ``family``'s tensors (a whole-model layout
        such as torchtitan's names each family's tensors by its own rules)."""
        return True

    def needs(self, block: str, family: Family) -> dict[str, str]:
        """The HF keys of tensors beside the experts of the MoE block ``block`` (its HF key
        prefix) that this layout's consumer holds and moekit cannot make up, each with why:
        a source whose block holds its router but not one of these is refused."""
        return {}

    def unnamed(self, family: Family) -> str:
        """Why this layout has no names for ``family`` (where ``names_family`` is False)."""
        return f"the {self.name} layout has no names for the {family.name} family"

    def holds(self, piece: str, family: Family) -> bool:
        """True when this layout has a place for ``piece`` (a projection or its bias)."""
        return True

    @abstractmethod
    def emit(self, block: ExpertBlock, n_experts: int, family: Family) -> list[TensorPlan]:
        """The destination tensors of one MoE block in this layout."""

    def emit_none(self, block: ExpertBlock, family: Family) -> list[TensorPlan]:
        """The destination tensors of one MoE block when none of its experts is kept (an
        expert-parallel rank that owns none): none, where tensors are per expert."""
        return []

    def whole_model(self, plan: Plan, config: Mapping | None, family: Family,
                    source: str) -> Plan:
        """``plan`` (its tensors under this layout's names) as this layout's files store
        the model, whose config.json is ``config``: ``plan`` itself, except in a layout
        that joins tensors across names (Megatron-Core stacks layers and joins the
        attention projections)."""
        return plan

    def to_hf_key(self, key: str, family: Family) -> str:
        """This layout's name of a non-expert tensor -> the HF name."""
        return rename(key, family.renames.get(self.name, ()), reverse=True)

    def from_hf_key(self, key: str, family: Family) -> str:
        """The HF name of a non-expert tensor -> this layout's name."""
        return rename(key, family.renames.get(self.name, ()))

    def expert_region(self, family: Family) -> re.Pattern[str]:
        """Keys that lie inside an experts module of ``family`` (in this layout's naming)."""
        region = re.escape(self.from_hf_key(family.block + ".experts.", family))
        return re.compile("^" + region.replace(r"\{layer\}", f"(?P<layer>{NUMBER})"))
