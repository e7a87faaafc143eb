"""torchtitan's layout: a whole model under torchtitan's state-dict names, written as the
``torch.distributed.checkpoint`` folder torchtitan loads.

The experts are a grouped layout (``GroupedExperts`` in torchtitan 0.3's
``models/common/moe.py``: ``w1_EFD`` and ``w3_EFD`` [E, I, H], ``w2_EDF`` [E, H, I]; GPT-OSS's
``GptOssGroupedExperts`` holds a set of its own, with biases, ``_GPT_OSS`` below);
every other tensor is renamed by the family's ``torchtitan`` rules (``Family.renames``),
so a family is written in this layout only where those rules exist. Each MoE block also
holds ``expert_bias_E``, the fp32 [E] load-balancing buffer torchtitan adds to the router
scores when choosing experts (``MoE.__init__`` registers it, persistent, whenever
``load_balance_coeff`` is set, as it is by default). Where the family's rules name an HF
tensor ``expert_bias_E`` (DeepSeek-V3's router ``e_score_correction_bias``, which
transformers adds to the scores the same way), it is that tensor, renamed both ways;
otherwise it is written as zeros and read back only when it is all zeros, since no other
layout has a place for it.
"""

from __future__ import annotations

from ..errors import MoekitError
from ..plan import Constant, Read, RequireZeros, TensorPlan
from .base import ExpertBlock, ParsedExperts, TensorMeta
from .families import FAMILIES, Family
from .grouped import GroupedLayout, GroupedTensor

EXPERT_BIAS = "expert_bias_E"
"""torchtitan's load-balancing bias, beside the router in the MoE block."""
EXPERT_BIAS_DTYPE = "F32"
MODELS = ("deepseek_v3", "gpt_oss", "kimi_k2_7", "qwen3", "qwen3_5", "llama3", "flux",
          "muse_glimmer")
"""The models torchtitan 0.3 implements (``torchtitan/models``), for the message refusing
a family it has none of (Mixtral, Llama 4, ...)."""


def named_families() -> list[str]:
    """The families with torchtitan names (``torchtitan`` rename rules)."""
    return [family.name for family in FAMILIES if family.renames.get("torchtitan")]


class TorchtitanLayout(GroupedLayout):
    """The grouped experts of torchtitan, plus its ``expert_bias_E`` buffer."""

    default_format = "dcp"
    mtp_note = ("torchtitan 0.3 names them mtp_layers.N with one mtp_norm and keeps no "
                "per-layer shared_head.head or embed_tokens, so they cannot be written there "
                "byte for byte")

    def parse(self, tensors: dict[str, TensorMeta], family: Family) -> ParsedExperts:
        """The grouped experts, and each block's ``expert_bias_E`` claimed (unless the
        family renames it, see ``renames_bias``): every expert's first piece requires it
        to be all zeros (``RequireZeros``), so that converting to a layout without the
        buffer refuses a trained bias rather than drop it."""
        if not self.names_family(family):
            return ParsedExperts()
        parsed = super().parse(tensors, family)
        if self.renames_bias(family):
            return parsed
        for layer, block in parsed.blocks.items():
            key = self._bias_key(block.block, family)
            meta = tensors.get(key)
            if meta is None:
                continue
            parsed.claimed.add(key)
            problem = self._bias_problem(key, meta, len(block.experts))
            if problem:
                parsed.problems.append((layer, problem))
                continue
            first = family.pieces[0]
            checked = Read.whole(key, meta)
            for (piece, expert), part in list(block.pieces.items()):
                if piece == first:
                    block.pieces[(piece, expert)] = RequireZeros(part, checked, self._reason())
        return parsed

    def emit(self, block: ExpertBlock, n_experts: int, family: Family) -> list[TensorPlan]:
        """The grouped experts, then a zero ``expert_bias_E`` unless the family renames
        its own (a ``RequireZeros`` piece read from torchtitan carries the check that it
        was zero)."""
        if not self.names_family(family):
            raise MoekitError(self.unnamed(family))
        experts = super().emit(block, n_experts, family)
        if self.renames_bias(family):
            return experts
        bias = TensorPlan(self._bias_key(block.block, family),
                          Constant((n_experts,), EXPERT_BIAS_DTYPE))
        return [*experts, bias]

    def needs(self, block: str, family: Family) -> dict[str, str]:
        """The router's score-correction bias, where the family's rules rename it
        ``expert_bias_E`` (DeepSeek-V3): written as zeros when the source lacks it, it
        would read back as a tensor the source did not have, and a source whose bias is
        all zeros (as transformers initialises it) could not be told from one without."""
        if not self.renames_bias(family):
            return {}
        hf_key = self.to_hf_key(self._bias_key(block, family), family)
        return {hf_key: (
            f"torchtitan 0.3's {family.name} model holds it as {EXPERT_BIAS}, and moekit does "
            "not write it as zeros, which would come back from torchtitan as a tensor the "
            "source lacks. Load and save the model with transformers first, which adds it "
            "as zeros")}

    def unnamed(self, family: Family) -> str:
        return (f"the {self.name} layout has no names for the {family.name} family: "
                f"torchtitan 0.3 has no model of it (its models are {', '.join(MODELS)}); "
                f"moekit writes torchtitan's names for {', '.join(named_families())}")

    def names_family(self, family: Family) -> bool:
        """True when ``family`` has torchtitan names (its ``torchtitan`` rename rules)."""
        return bool(family.renames.get(self.name))

    def renames_bias(self, family: Family) -> bool:
        """True when ``family``'s rules name an HF tensor ``expert_bias_E`` (a router
        score-correction bias): it then passes through like the router, renamed."""
        block = family.block.format(layer=0)
        return self.to_hf_key(self._bias_key(block, family), family) != f"{block}.{EXPERT_BIAS}"

    def _bias_key(self, block: str, family: Family) -> str:
        return self.from_hf_key(f"{block}.{EXPERT_BIAS}", family)

    def _reason(self) -> str:
        return (f"torchtitan's {EXPERT_BIAS} (its load-balancing bias, added to the router "
                "scores) has no place in Hugging Face's naming, which moekit converts and "
                "compares checkpoints through")

    @staticmethod
    def _bias_problem(key: str, meta: TensorMeta, experts: int) -> str | None:
        shape, dtype = tuple(meta.shape), meta.dtype
        if shape != (experts,) or dtype != EXPERT_BIAS_DTYPE:
            return (f"{key} is {list(shape)} {dtype}; torchtitan's {EXPERT_BIAS} is "
                    f"[{experts}] {EXPERT_BIAS_DTYPE}, one value per expert")
        return None


_GPT_OSS = (
    GroupedTensor("mlp1_weight_EGD", ("gate", "up"), transposed=False, interleaved=True),
    GroupedTensor("mlp1_bias_EG", ("gate_bias", "up_bias"), False, interleaved=True,
                  piece_dims=1, orientable=False),
    GroupedTensor("mlp2_weight_EDF", ("down",), transposed=False),
    GroupedTensor("mlp2_bias_ED", ("down_bias",), False, piece_dims=1, orientable=False))
"""torchtitan 0.3's GPT-OSS experts (``GptOssGroupedExperts`` in ``models/gpt_oss/moe.py``):
``mlp1_weight_EGD`` [E,2I,H] with gate and up interleaved (its ``swiglu`` reads the gate
from the even rows, as transformers' does), ``mlp1_bias_EG`` [E,2I] interleaved alike,
``mlp2_weight_EDF`` [E,H,I], ``mlp2_bias_ED`` [E,H]."""

TORCHTITAN = TorchtitanLayout(
    "torchtitan", "torchtitan 0.3's model state dict, the whole model under torchtitan's "
    "names, written as a torch.distributed.checkpoint folder by default: "
    "moe.routed_experts.inner_experts.w1_EFD/w3_EFD [E,I,H] (gate, up), w2_EDF [E,H,I] "
    "(GPT-OSS: mlp1_weight_EGD [E,2I,H] gate and up interleaved, mlp1_bias_EG, "
    "mlp2_weight_EDF [E,H,I], mlp2_bias_ED), router moe.router.gate.weight, "
    "moe.expert_bias_E fp32 [E] (zeros, or DeepSeek-V3's score-correction bias; zeros read "
    f"back only when all zeros); families: {', '.join(named_families())}",
    (GroupedTensor("w1_EFD", ("gate",), transposed=False),
     GroupedTensor("w3_EFD", ("up",), transposed=False),
     GroupedTensor("w2_EDF", ("down",), transposed=False)),
    quantized_note="torchtitan 0.3 loads bf16 or fp32 weights and holds no scale tensors "
                   "(its GPT-OSS dequantizes MXFP4 only when it reads Hugging Face files)",
    by_family={"gpt_oss": _GPT_OSS})
