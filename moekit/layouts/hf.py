"""The Hugging Face per-expert layout: one ``[out, in]`` tensor per expert and projection."""

from __future__ import annotations

import re

from ..plan import Read, TensorPlan
from .base import NUMBER, ExpertBlock, Layout, ParsedExperts, TensorMeta
from .families import Family


class PerExpertLayout(Layout):
    """``{block}.experts.{e}.{gate_proj|up_proj|down_proj}.weight`` (names per family),
    and ``.bias`` beside each for families whose experts have biases, and
    ``.weight_scale_inv`` beside each in FP8 checkpoints."""

    name = "hf"
    description = "Hugging Face: one tensor per expert and projection (what the Hub holds)"

    def parse(self, tensors: dict[str, TensorMeta], family: Family) -> ParsedExperts:
        parsed = ParsedExperts()
        pattern = self._key_pattern(family)
        by_name = {family.piece_key(piece): piece for piece in family.all_pieces}
        region = self.expert_region(family)
        for key, meta in tensors.items():
            match = pattern.match(key) or region.match(key)
            if not match:
                continue
            numbers = parsed.numbers(key, match)
            if numbers is None:
                continue
            if match.re is not pattern:
                parsed.problems.append((numbers["layer"], (
                    f"{key} is not an expert weight of the {family.name} HF layout (is "
                    "the source layout right?)")))
                continue
            block = parsed.block(numbers["layer"], family)
            piece = (by_name[match["piece"]], numbers["expert"])
            block.pieces[piece] = Read.whole(key, meta)
            block.names[piece] = key
        return parsed

    def emit(self, block: ExpertBlock, n_experts: int, family: Family) -> list[TensorPlan]:
        return [TensorPlan(family.expert_key(block.layer, e, piece), block.pieces[(piece, e)])
                for e in range(n_experts) for piece in family.all_pieces
                if (piece, e) in block.pieces]

    @staticmethod
    def _key_pattern(family: Family) -> re.Pattern[str]:
        block = re.escape(family.block).replace(r"\{layer\}", f"(?P<layer>{NUMBER})")
        names = "|".join(re.escape(family.piece_key(piece)) for piece in family.all_pieces)
        return re.compile(f"^{block}\\.experts\\.(?P<expert>{NUMBER})\\.(?P<piece>{names})\\Z")
