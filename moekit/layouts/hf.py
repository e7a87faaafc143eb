"""The Hugging Face per-expert layout: one ``[out, in]`` tensor per expert and projection."""

from __future__ import annotations

import re

from ..plan import Read, TensorPlan
from .base import ExpertBlock, Layout, ParsedExperts, TensorMeta
from .families import Family


class PerExpertLayout(Layout):
    """``{block}.experts.{e}.{gate_proj|up_proj|down_proj}.weight`` (names per family)."""

    name = "hf"
    description = "Hugging Face: one tensor per expert and projection (what the Hub holds)"

    def parse(self, tensors: dict[str, TensorMeta], family: Family) -> ParsedExperts:
        parsed = ParsedExperts()
        pattern = self._key_pattern(family)
        by_name = {v: k for k, v in family.projections.items()}
        region = self.expert_region(family)
        for key, meta in tensors.items():
            inside = region.match(key)
            if not inside:
                continue
            parsed.claimed.add(key)
            match = pattern.match(key)
            layer = int(inside["layer"])
            if not match:
                parsed.problems.append((layer, f"{key} is not an expert weight of the {family.name} "
                                               f"HF layout (is the source layout right?)"))
                continue
            block = parsed.block(layer, family)
            piece = (by_name[match["proj"]], int(match["expert"]))
            block.pieces[piece] = Read(key, (), tuple(meta.shape), meta.dtype)
            block.names[piece] = key
        return parsed

    def emit(self, block: ExpertBlock, n_experts: int, family: Family) -> list[TensorPlan]:
        return [TensorPlan(family.expert_key(block.layer, e, proj), block.pieces[(proj, e)])
                for e in range(n_experts) for proj in family.projections
                if (proj, e) in block.pieces]

    @staticmethod
    def _key_pattern(family: Family) -> re.Pattern[str]:
        block = re.escape(family.block).replace(r"\{layer\}", r"(?P<layer>\d+)")
        names = "|".join(re.escape(n) for n in family.projections.values())
        return re.compile(f"^{block}\\.experts\\.(?P<expert>\\d+)\\.(?P<proj>{names})\\.weight$")
