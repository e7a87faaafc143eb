"""The Hugging Face layout: what ``save_pretrained`` writes. For most families one ``[out,
in]`` tensor per expert and projection; for families whose Hub files keep the experts
grouped (``Family.grouped_on_disk``: GraniteMoE, JetMoE, Aria, Llama 4, GPT-OSS,
Qwen3-VL-MoE, ...), those grouped tensors."""

from __future__ import annotations

import re

from ..plan import Read, TensorPlan
from .base import CANONICAL_NUMBER, NUMBER, ExpertBlock, Layout, ParsedExperts, TensorMeta
from .families import Family
from .grouped import TRANSFORMERS, GroupedLayout, GroupedTensor, with_scales


_STEP3P7 = with_scales(tuple(GroupedTensor(f"{projection}_proj", (projection,), False)
                             for projection in ("gate", "up", "down")))
"""Step-3.7's grouped experts on disk (Step-3.5's ``MoELinear``, transformers 5.24's
save_pretrained alike): gate, up and down each one [E, out, in] tensor, not joined; in
FP8 files each with its block scales [E, ceil(out/128), ceil(in/128)] beside it."""


class PerExpertLayout(Layout):
    """``{block}.experts.{e}.{gate_proj|up_proj|down_proj}.weight`` (names per family),
    and ``.bias`` beside each for families whose experts have biases, and
    ``.weight_scale_inv`` beside each in FP8 checkpoints; for a ``grouped_on_disk`` family,
    the grouped tensors its files hold (``on_disk``)."""

    name = "hf"
    description = ("Hugging Face: what save_pretrained writes and the Hub holds (one tensor "
                   "per expert and projection; grouped where the family's files group them)")

    def __init__(self) -> None:
        self.on_disk = GroupedLayout(self.name, self.description, TRANSFORMERS.tensors,
                                     by_family={"step3p7": _STEP3P7})
        """The grouped tensors of a ``grouped_on_disk`` family: transformers' fused ones
        (or the family's own set in ``by_family``) under the family's ``hf`` renames (and
        orientation)."""

    def grouped_for(self, family: Family) -> bool:
        return family.grouped_on_disk

    def holds(self, piece: str, family: Family) -> bool:
        return self.on_disk.holds(piece, family) if family.grouped_on_disk else True

    def emit_none(self, block: ExpertBlock, family: Family) -> list[TensorPlan]:
        return self.on_disk.emit_none(block, family) if family.grouped_on_disk else []

    def parse(self, tensors: dict[str, TensorMeta], family: Family) -> ParsedExperts:
        """The per-expert weights (``_key_pattern``), each a whole read. A key whose numbers
        are canonical is read at once (``CANONICAL_NUMBER``); any other inside the experts
        module is claimed and reported, or passed over where it names no expert's weight
        (``Family.in_experts``)."""
        if family.grouped_on_disk:
            return self.on_disk.parse(tensors, family)
        parsed = ParsedExperts()
        canonical = self._key_pattern(family, CANONICAL_NUMBER)
        pattern = self._key_pattern(family)
        by_name = {family.piece_key(piece): piece for piece in family.all_pieces}
        region = self.expert_region(family)
        blocks: dict[str, tuple[dict, dict]] = {}  # layer number as written -> its block's maps
        claim = parsed.claimed.add
        whole = Read.whole
        match_canonical = canonical.match
        for key, meta in tensors.items():
            match = match_canonical(key)
            if match:
                layer, expert, name = match.groups()
                claim(key)
                maps = blocks.get(layer)
                if maps is None:
                    block = parsed.block(int(layer), family)
                    maps = blocks[layer] = block.pieces, block.names
                piece = by_name[name], int(expert)
                maps[0][piece] = whole(key, meta)
                maps[1][piece] = key
                continue
            match = pattern.match(key) or region.match(key)
            if not match or key[match.end():] in family.in_experts:
                continue
            numbers = parsed.numbers(key, match)
            if numbers is None:
                continue
            if match.re is not pattern:
                parsed.problems.append((numbers["layer"], (
                    f"{key} is not an expert weight of the {family.name} HF layout (is "
                    "the source layout right?)")))
                continue
            _add_piece(parsed.block(numbers["layer"], family),
                       (by_name[match["piece"]], numbers["expert"]), key, meta)
        return parsed

    def emit(self, block: ExpertBlock, n_experts: int, family: Family) -> list[TensorPlan]:
        if family.grouped_on_disk:
            return self.on_disk.emit(block, n_experts, family)
        return [TensorPlan(family.expert_key(block.layer, e, piece), block.pieces[(piece, e)])
                for e in range(n_experts) for piece in family.all_pieces
                if (piece, e) in block.pieces]

    @staticmethod
    def _key_pattern(family: Family, number: str = NUMBER) -> re.Pattern[str]:
        """Per-expert weight keys of ``family``, their layer and expert numbers ``number``."""
        block = re.escape(family.block).replace(r"\{layer\}", f"(?P<layer>{number})")
        names = "|".join(re.escape(family.piece_key(piece)) for piece in family.all_pieces)
        return re.compile(f"^{block}\\.experts\\.(?P<expert>{number})\\.(?P<piece>{names})\\Z")


def _add_piece(block: ExpertBlock, piece: tuple[str, int], key: str, meta: TensorMeta) -> None:
    """Read the whole tensor ``key`` as ``piece`` (projection, expert) of ``block``."""
    block.pieces[piece] = Read.whole(key, meta)
    block.names[piece] = key
