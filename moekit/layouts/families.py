"""Model families: how a family's Hugging Face checkpoints name their MoE blocks.

A family is data. Adding one is adding an entry to ``FAMILIES``; the planner, the
executors and the CLI need no change. Per-expert keys in HF naming are
``{block}.experts.{expert}.{projection name}.weight`` with ``block`` from ``block`` below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..model_config import (LayerRule, after_dense_prefix, block_types, dense_prefix_of,
                            every_layer, expert_period, listed_or_interleaved, mlp_layer_types,
                            sparse_step, step3p7_layers)

PROJECTIONS = ("gate", "up", "down")
"""Canonical projection names: gate (w1, activated), up (w3, multiplied), down (w2)."""
BIAS = "_bias"
"""Suffix of a projection's bias piece (``gate_bias`` [I], ``up_bias`` [I], ``down_bias`` [H])."""
MX_BLOCKS, MX_SCALES = "_mxblocks", "_mxscales"
"""Suffixes of a projection's MXFP4 pieces (GPT-OSS Hub files): packed FP4 blocks
[out, in/32, 16] uint8 and their E8M0 scales [out, in/32] uint8, in place of the weight."""
SCALE = "_scale"
"""Suffix of a projection's FP8 block-scale piece (DeepSeek-V3 style ``weight_scale_inv``,
[ceil(out/128), ceil(in/128)] float32), present only in FP8 checkpoints."""
FP8_SCALE_KEY, MXFP4_BLOCKS_KEY, MXFP4_SCALES_KEY = "_scale_inv", "_blocks", "_scales"
"""What a weight's key (``x.weight`` -> ``x.weight_scale_inv``) or a grouped tensor's name
(``gate_up_proj`` -> ``gate_up_proj_blocks``) takes for its FP8 scales or MXFP4 tensors."""
QUANTIZED_KEYS = {SCALE: FP8_SCALE_KEY, MX_BLOCKS: MXFP4_BLOCKS_KEY, MX_SCALES: MXFP4_SCALES_KEY}
"""Quantisation piece suffix -> the key suffix its tensors carry."""
MAX_EXPERTS = 1 << 16
"""The most routed experts per layer moekit plans for (about a hundred times the largest
released MoE's), so that a header or config declaring millions of tiny experts is refused
at once instead of planned one expert at a time."""
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
"""The config.json names of the routed-expert count across transformers' MoE models; a
config of a model type moekit does not know is read through all of them."""


@dataclass(frozen=True)
class Rename:
    """One rename rule: the first ``old`` in a key becomes ``new`` (only a key that starts
    with ``old`` when ``at_start``). ``undo`` turns ``new`` back into ``old``."""

    old: str
    new: str
    at_start: bool = False
    squeeze: bool = False
    """True when a tensor this rule renames also drops its leading dimension of 1 (and
    regains it when undone): NeMo AutoModel's ERNIE-4.5 score-correction bias [E], held
    [1, E] in the HF files."""

    def apply(self, key: str) -> str:
        return _replaced(key, self.old, self.new, self.at_start)

    def undo(self, key: str) -> str:
        return _replaced(key, self.new, self.old, self.at_start)


def _replaced(key: str, old: str, new: str, at_start: bool) -> str:
    if at_start:
        return new + key[len(old):] if key.startswith(old) else key
    return key.replace(old, new, 1)


@dataclass(frozen=True)
class GroupPart:
    """A tensor of one expert group outside its experts (its router, its score-correction
    bias): where the HF files hold it, and where a layout that holds the groups apart
    does."""

    hf: str
    """Its HF key, relative to the block (``gate.weight_1``)."""
    name: str
    """Its key relative to the group's module in a layout that holds the groups apart."""
    transposed: bool = False
    """True when the HF files hold it transposed (a router [H, E] for [E, H])."""
    row: bool = False
    """True when the HF files hold every group's in one tensor, the k-th group's as row k;
    a layout holding the groups apart keeps that row as a tensor of one row."""


@dataclass(frozen=True)
class ExpertGroup:
    """One of several groups of routed experts in each MoE layer, each with its own router
    (ERNIE-4.5-VL's text and vision experts, of different intermediate sizes)."""

    name: str
    modules: dict[str, str]
    """Per grouped layout that holds the groups apart: the group's module inside the block
    (``text_moe``), whose ``experts`` module holds the group's grouped tensors."""
    parts: tuple[GroupPart, ...] = ()


@dataclass(frozen=True)
class Family:
    """How one model family lays out its MoE blocks in Hugging Face checkpoints."""

    name: str
    model_types: tuple[str, ...]
    """``config.json`` ``model_type`` values of this family."""
    block: str
    """Key prefix of a layer's MoE block, with a ``{layer}`` field."""
    projections: dict[str, str]
    """Canonical projection -> on-disk module name, e.g. ``{"gate": "w1", ...}``; a
    non-gated family has no ``gate``."""
    expert_count_key: str
    """The ``config.json`` entry holding the number of routed experts (what transformers'
    config class declares)."""
    router: str | None = "gate.weight"
    """The router weight, relative to the block; None for a router that is not one linear
    layer with a row per expert, which moekit passes through unchecked (Zaya's; no such
    family is an upcycling, merging, Megatron-Core or config-planning one)."""
    shared_expert: str | None = None
    """Module name of the shared expert(s) inside the block, if the family has one."""
    renames: dict[str, tuple[Rename, ...]] = field(default_factory=dict)
    """Per layout: the rules that turn an HF key into this layout's, applied in turn to
    every key (as transformers applies its ``WeightRenaming`` list), e.g. transformers v5
    names Mixtral's ``block_sparse_moe`` ``mlp``."""
    transposed: dict[str, bool] = field(default_factory=dict)
    """Per grouped layout: the orientation this family stores it in, where it differs from
    the layout's own (Llama 4's fused experts are ``[E, in, out]``)."""
    interleaved: dict[str, bool] = field(default_factory=dict)
    """Per grouped layout: gate and up interleaved rather than concatenated (GPT-OSS)."""
    either_orientation: tuple[str, ...] = ()
    """Grouped layouts whose files hold this family's weights ``[E, out, in]`` or
    ``[E, in, out]``, each layer read in the orientation its gate+up and down shapes fit
    (the two never fit both) and written in the layout's own: Qwen3-VL-MoE, whose Hub
    files are ``[E, in, out]`` and whose save_pretrained files (transformers 5.24) are
    ``[E, out, in]``, transformers loading both."""
    saved_as: tuple[Rename, ...] = ()
    """The rules that turn this family's HF keys (its Hub files' names) into those
    transformers' ``save_pretrained`` writes where the two differ: moekit reads files
    named either way as the Hub's names, and writes the Hub's, which transformers, NeMo
    AutoModel and vLLM all read (Kimi-K2.5's text layers are ``layers`` on the Hub,
    ``blocks`` in transformers 5.24's saves)."""
    biases: bool = False
    """True when every expert projection has a bias (GPT-OSS)."""
    count_aliases: tuple[str, ...] = ()
    """Other config.json names of the expert count: transformers' ``attribute_map``
    aliases of ``expert_count_key``, which checkpoints on the Hub also carry."""
    router_extra_rows: str | None = None
    """The config.json entry counting router rows after the routed experts' that score
    experts holding no weights (LongCat-Flash's ``zero_expert_num`` zero-computation
    experts, Inkling's ``n_shared_experts`` shared-expert sinks)."""
    text_config: tuple[str, ...] = ()
    """Where a multimodal config.json keeps the settings of the model holding the experts
    (``("text_config",)``); empty when they are at the top."""
    in_experts: tuple[str, ...] = ()
    """Names of tensors inside the experts module that are no expert's weights (Laguna's
    ``experts.e_score_correction_bias``): passed through like the router."""
    unconverted: dict[str, str] = field(default_factory=dict)
    """Per layout: what that layout's consumer does on load that no rename here expresses,
    to tensors outside the experts (transformers splitting Sarvam's ``query_key_value``)
    or to the experts' values (NeMo AutoModel scaling Gemma 4's): moekit refuses to write
    the layout for the family, naming it, rather than write tensors the consumer does not
    hold."""
    mtp_unheld: dict[str, str] = field(default_factory=dict)
    """Per layout: how that layout's consumer holds the family's multi-token-prediction
    layers (the config's layers after ``num_hidden_layers``) otherwise than moekit writes
    them; a source holding such layers is refused for that layout, naming it."""
    unplaced: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per layout: tensors outside the experts that the layout's consumer has no place for,
    as HF key endings, each with why (torchtitan 0.3's Qwen3 attention has no biases): a
    source holding one is refused for that layout, naming it, rather than written where a
    strict load fails."""
    grouped_on_disk: bool = False
    """True when ``save_pretrained`` writes the experts grouped (GraniteMoE's
    ``input_linear``/``output_linear``, GPT-OSS's interleaved ``gate_up_proj``): the ``hf``
    layout is then transformers' fused tensors under the ``hf`` renames, transposition and
    interleave, read and written in that native form."""
    moe_layers: LayerRule | None = None
    """Which decoder layers config.json makes MoE layers (``first_k_dense_replace``,
    ``decoder_sparse_step``, ...); None when the config's layers are not known."""
    expert_groups: tuple[ExpertGroup, ...] = ()
    """The groups of routed experts of each MoE layer where there are several, in the order
    the HF files number their experts: one after another in one sequence, each group
    ``expert_count_key`` experts. Empty: one group."""
    groups_unheld: dict[str, str] = field(default_factory=dict)
    """Per grouped layout without a module for each expert group (``ExpertGroup.modules``):
    why; that layout is refused for the family."""
    hub_layout: str | None = None
    """The grouped layout whose names the family's Hub files give their experts where
    ``save_pretrained`` writes them per expert (Nemotron-3.5-Transcribe's NeMo export:
    nemo's ``gate_and_up_projs`` [E,H,I] and ``down_projs`` [E,I,H], which transformers
    5.24 transposes on load): files so named are read, even where ``unconverted`` refuses
    that layout as a destination."""

    @property
    def n_groups(self) -> int:
        """How many groups of routed experts each MoE layer holds."""
        return max(1, len(self.expert_groups))

    @property
    def expert_count_keys(self) -> tuple[str, ...]:
        """Every config.json name of the routed-expert count, the declared one first."""
        return (self.expert_count_key, *self.count_aliases)

    @property
    def pieces(self) -> tuple[str, ...]:
        """Every canonical piece an expert of this family has: its projections, then their
        biases when it has them."""
        biases = tuple(p + BIAS for p in self.projections) if self.biases else ()
        return (*self.projections, *biases)

    @property
    def all_pieces(self) -> tuple[str, ...]:
        """``pieces``, the optional FP8 scale of each projection and, for MXFP4 files, the
        blocks and scales that stand in for each projection's weight."""
        return (*self.pieces, *(p + suffix for suffix in (SCALE, MX_BLOCKS, MX_SCALES)
                                for p in self.projections))

    def required_pieces(self, present: set[str]) -> tuple[str, ...]:
        """What every expert must hold, given the pieces found in its layer: the weights
        (or, in an MXFP4 file, their blocks and scales), biases if the family has them,
        and FP8 scales if the file has them."""
        packed = any(p.endswith(MX_BLOCKS) for p in present)
        weights = tuple(p + suffix for suffix in (MX_BLOCKS, MX_SCALES)
                        for p in self.projections) if packed else tuple(self.projections)
        biases = tuple(p + BIAS for p in self.projections) if self.biases else ()
        scales = (tuple(p + SCALE for p in self.projections)
                  if any(p.endswith(SCALE) for p in present) else ())
        return (*weights, *biases, *scales)

    @property
    def expert_naming(self) -> tuple:
        """What decides which keys each layout reads as this family's experts, and how:
        families equal in it read the same keys alike (whatever their routers and other
        tensors are named)."""
        block = f"{self.block}.experts."
        samples = (*(f"{block}0.{name}.weight" for name in self.projections.values()),
                   *(f"{block}{name}" for name in ("gate_up_proj", "down_proj")))
        renamed = tuple(sorted((layout, tuple(rename(s, rules) for s in samples))
                               for layout, rules in self.renames.items()))
        groups = tuple(tuple(sorted(group.modules.items())) for group in self.expert_groups)
        return (self.block, tuple(sorted(self.projections.items())), self.biases,
                self.grouped_on_disk, self.in_experts, tuple(sorted(self.transposed.items())),
                tuple(sorted(self.interleaved.items())), self.either_orientation, renamed,
                groups, self.saved_as)

    def piece_key(self, piece: str) -> str:
        """A piece's name in HF per-expert keys: ``gate_proj.weight``, ``gate_proj.bias``,
        ``gate_proj.weight_scale_inv``."""
        if piece.endswith(BIAS):
            return f"{self.projections[piece[:-len(BIAS)]]}.bias"
        for suffix, key in QUANTIZED_KEYS.items():
            if piece.endswith(suffix):
                return f"{self.projections[piece[:-len(suffix)]]}.weight{key}"
        return f"{self.projections[piece]}.weight"

    def expert_key(self, layer: int, expert: int, piece: str) -> str:
        """The HF key of one expert's projection weight (or bias, for a ``*_bias`` piece)."""
        return f"{self.block.format(layer=layer)}.experts.{expert}.{self.piece_key(piece)}"


_QWEN_PROJECTIONS = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_MIXTRAL_PROJECTIONS = {"gate": "w1", "up": "w3", "down": "w2"}
_QWEN_BLOCK = "model.layers.{layer}.mlp"
_MIXTRAL_BLOCK = "model.layers.{layer}.block_sparse_moe"
_MIXTRAL_TO_MLP = (Rename(".block_sparse_moe.", ".mlp."),)
"""transformers v5 (``conversion_mapping.py``, "mixtral") names the block ``mlp`` in memory."""


def _linear_on_disk(block: str) -> tuple[Rename, ...]:
    """GraniteMoE's and JetMoE's names of the grouped experts in their files, for the
    experts of ``block`` only (GraniteMoE-Hybrid's shared_mlp and JetMoE's attention
    experts have input_linear and output_linear too)."""
    return (Rename(f".{block}.experts.gate_up_proj", f".{block}.input_linear.weight"),
            Rename(f".{block}.experts.down_proj", f".{block}.output_linear.weight"))


_NEMOTRON_H_NEMO = (Rename("backbone.", "model.", at_start=True),
                    Rename("model.embeddings.", "model.embed_tokens.", at_start=True),
                    Rename("model.norm_f.", "model.norm.", at_start=True))
"""NeMo AutoModel 0.7 (NemotronV3StateDictAdapter) holds Nemotron-H under ``model.``, its
embeddings as ``embed_tokens`` and its final norm as ``norm``."""


_LAGUNA_RENAMES = (Rename(".mlp.experts.e_score_correction_bias",
                          ".mlp.gate.e_score_correction_bias"),
                   Rename(".mlp.shared_expert.", ".mlp.shared_experts."))
"""Laguna's score-correction bias and shared expert as transformers 5.24 names them in
memory and NeMo AutoModel 0.7 (LagunaStateDictAdapter) in its own format."""


_FP32_PARAMS_NEMO = tuple(Rename(f".{module}.{name}", f".{module}._fp32_params.{name}")
                          for module in ("self_attn", "linear_attn")
                          for name in ("A_log", "dt_bias"))
"""NeMo AutoModel 0.7 keeps a linear attention's ``A_log`` and ``dt_bias`` in float32 under
``_fp32_params`` (Kimi-Linear's ``self_attn``, Qwen3-Next's ``linear_attn``)."""
_MINIMAX_M2_NEMO = (*_MIXTRAL_TO_MLP,
                    Rename(".mlp.e_score_correction_bias", ".mlp.gate.e_score_correction_bias"))
"""NeMo AutoModel 0.7 (MiniMaxM2StateDictAdapter) names MiniMax-M2's block ``mlp`` and
holds its score-correction bias on the router."""
_KIMI_LINEAR_NEMO = (*(Rename(f".block_sparse_moe.{child}.", f".mlp.{child}.")
                       for child in ("gate", "shared_experts", "experts")), *_FP32_PARAMS_NEMO)
"""NeMo AutoModel 0.7 (KimiLinear48BStateDictAdapter) moves Kimi-Linear's router, shared
experts and experts under ``mlp`` (a dense layer's ``block_sparse_moe.*_proj`` stay)."""
_HY_V3_NEMO = (Rename(".mlp.expert_bias", ".mlp.gate.e_score_correction_bias"),
               Rename(".mlp.router.gate.weight", ".mlp.gate.weight"),
               Rename(".mlp.shared_mlp.", ".mlp.shared_experts."))
"""NeMo AutoModel 0.7 (HYV3StateDictAdapter) names Hy-V3's router ``gate``, holds its
expert bias there as ``e_score_correction_bias`` and names the shared MLP
``shared_experts``."""
_ERNIE_NEMO = (Rename(".mlp.moe_statics.e_score_correction_bias",
                      ".mlp.gate.e_score_correction_bias", squeeze=True),)
"""NeMo AutoModel 0.7 (Ernie4_5_MoeStateDictAdapter) holds ERNIE-4.5's score-correction
bias on the router, as [E]."""
_QWEN3_NEXT_NEMO = (Rename(".mlp.shared_expert.", ".mlp.shared_experts."), *_FP32_PARAMS_NEMO)
"""NeMo AutoModel 0.7 (Qwen3NextStateDictAdapter) names Qwen3-Next's shared expert
``shared_experts``."""
_QWEN3_OMNI_TRANSFORMERS = tuple(
    Rename(f"thinker.{old}", f"thinker.model.{new}", at_start=True) for old, new in (
        ("audio_tower.", "audio_tower."), ("visual.", "visual."),
        ("model.embed_tokens.", "language_model.embed_tokens."),
        ("model.layers.", "language_model.layers."), ("model.norm.", "language_model.norm.")))
"""transformers 5.24 holds Qwen3-Omni's text model under ``thinker.model.language_model``,
its towers under ``thinker.model``."""
_QWEN3_OMNI_NEMO = tuple(Rename(f"thinker.{module}.", f"{module}.", at_start=True)
                         for module in ("model", "audio_tower", "visual", "lm_head"))
"""NeMo AutoModel 0.7 (Qwen3OmniMoeStateDictAdapter) holds Qwen3-Omni's thinker alone,
without the ``thinker.`` prefix (a talker's tensors keep their names)."""


_ERNIE_VL_TRANSFORMERS = (
    Rename("model.vision_model.", "model.vision_tower.", at_start=True),
    *(Rename(f".{module}_linear.{index}.", f".{module}_linear.{name}.")
      for module in ("spatial", "temporal") for index, name in (("0", "fc1"), ("2", "fc2"),
                                                                 ("3", "ln"))),
    *(Rename(f"model.{name}.", f"model.language_model.{name}.", at_start=True)
      for name in ("embed_tokens", "layers", "norm")))
"""transformers 5.24 holds ERNIE-4.5-VL's text model under ``model.language_model``, its
vision tower as ``vision_tower`` and the resampler's sequential layers by name."""
_ERNIE_VL_GROUPS = tuple(
    ExpertGroup(name, {"transformers": f"{name}_moe"}, (
        GroupPart(router, "gate.weight", transposed=True),
        GroupPart("moe_statics.e_score_correction_bias",
                  "gate.moe_statics.e_score_correction_bias", row=True)))
    for name, router in (("text", "gate.weight"), ("vision", "gate.weight_1")))
"""ERNIE-4.5-VL's expert groups as transformers 5.24 holds them: ``mlp.text_moe`` and
``mlp.vision_moe``, each with its router [E, H] and its row of the score-correction
biases [1, E]."""
_ERNIE_VL_UNHELD = {
    "nemo": "NeMo AutoModel 0.7 has no model of ERNIE-4.5-VL (its registry holds ERNIE-4.5's "
            "text MoE alone), so it has no format of its own for the two groups",
    "vllm": "vLLM's ERNIE-4.5-VL model holds the two groups in FusedMoE modules of its own "
            "(mlp.text_experts, mlp.vision_experts, routed by text_experts_gate and "
            "vision_experts_gate), which the vllm layout does not name; vLLM's loader reads "
            "the Hub files (the hf layout)",
}
"""Why the grouped layouts other than transformers' hold no ERNIE-4.5-VL experts."""


_LLAVA_TRANSFORMERS = (Rename("language_model.lm_head.", "lm_head.", at_start=True),
                       Rename("language_model.model.", "model.language_model.", at_start=True),
                       Rename("vision_tower.", "model.vision_tower.", at_start=True),
                       Rename("multi_modal_projector.", "model.multi_modal_projector.",
                              at_start=True))
"""transformers 5.24 (conversion_mapping.py "llava", which "aria" follows) holds a LLaVA-style
model's text model under ``model.language_model``, its head as ``lm_head`` and its vision
tower and projector under ``model.``."""
_ARIA_ON_DISK = (Rename(".experts.gate_up_proj", ".experts.fc1.weight"),
                 Rename(".experts.down_proj", ".experts.fc2.weight"))
"""Aria's names of its grouped experts in its files (conversion_mapping.py "aria_text")."""


_STEP3P7_ON_DISK = tuple(Rename(f".moe.experts.{name}", f".moe.{name}.weight")
                         for name in ("gate_proj", "up_proj", "down_proj"))
"""Step-3.7's names of its grouped experts in its files: ``moe.gate_proj.weight``,
``moe.up_proj.weight`` [E,I,H] and ``moe.down_proj.weight`` [E,H,I], directly under the
block (``GroupedLayout.by_family`` of the hf layout gives it the three tensors)."""
_STEP3P7_NEMO = (Rename("model.", "model.language_model.", at_start=True),
                 Rename(".moe.router_bias", ".moe.gate.e_score_correction_bias"),
                 *(Rename(f"{module}.", f"model.{module}.", at_start=True)
                   for module in ("vision_model", "vit_large_projector")))
"""NeMo AutoModel 0.7 (Step3p7StateDictAdapter, through Step3p5StateDictAdapter) holds
Step-3.7's text model under ``model.language_model``, the router's ``router_bias`` as
``moe.gate.e_score_correction_bias`` and the vision tower and projector under ``model.``."""


_MINIMAX_M3_VL_NEMO = (
    Rename("language_model.lm_head.", "lm_head.", at_start=True),
    Rename("language_model.model.", "model.", at_start=True),
    *(Rename(f"{module}.", f"vision_tower.{module}.", at_start=True)
      for module in ("multi_modal_projector", "patch_merge_mlp")),
    Rename(".block_sparse_moe.shared_experts.", ".shared_experts."),
    *(Rename(f".block_sparse_moe.{child}.", f".mlp.{child}.") for child in ("gate", "experts")),
    Rename(".block_sparse_moe.e_score_correction_bias", ".mlp.gate.e_score_correction_bias"))
"""NeMo AutoModel 0.7 (MiniMaxM3VLStateDictAdapter) holds MiniMax-M3-VL's text model under
``model.``, its projector and patch merger under ``vision_tower``, its MoE block as ``mlp``
(the score-correction bias on the router) and its shared experts beside it."""


_KIMI_K25_SAVED = (
    Rename("language_model.model.layers.", "language_model.model.blocks.", at_start=True),
    Rename("vision_tower.patch_embed.proj.", "vision_tower.encoder.patch_embed.proj.",
           at_start=True),
    Rename("mm_projector.pre_norm.", "model.mm_projector.pre_norm.", at_start=True))
"""Kimi-K2.5's Hub names (those NeMo AutoModel 0.7's KimiK25VLStateDictAdapter and its tests
read) as transformers 5.24's save_pretrained writes them: its conversion_mapping.py
"kimi_k25" renames every ``blocks`` to ``layers`` on load, so saving turns the text layers
into ``blocks`` too; the patch embedding goes back under ``vision_tower.encoder`` (the
reverse of its ``vision_tower.encoder`` -> ``model.vision_tower`` rule) and the projector's
norm, which no rule renames, keeps the model's ``model.`` prefix. transformers loads both."""
_KIMI_K25_NEMO = (Rename("language_model.", "model.language_model.", at_start=True),
                  Rename("vision_tower.", "model.vision_tower.", at_start=True),
                  Rename("mm_projector.", "model.multi_modal_projector.", at_start=True),
                  *(Rename(f"model.multi_modal_projector.proj.{index}.",
                           f"model.multi_modal_projector.linear_{number}.", at_start=True)
                    for index, number in (("0", 1), ("2", 2))))
"""NeMo AutoModel 0.7 (KimiK25VLStateDictAdapter) holds Kimi-K2.5 under ``model.``: the text
model as ``model.language_model.model``, the head ``model.language_model.lm_head``, the
projector as ``multi_modal_projector`` with ``proj.0`` and ``proj.2`` named ``linear_1``
and ``linear_2``."""


_TORCHTITAN_GQA = (
    *(Rename(f".self_attn.{hf}_proj.", f".self_attn.qkv_linear.w{hf}.") for hf in "qkv"),
    Rename(".self_attn.o_proj.", ".self_attn.wo."),
    Rename(".self_attn.", ".attention."),
    Rename(".input_layernorm.", ".attention_norm."),
    Rename(".post_attention_layernorm.", ".ffn_norm."))
"""torchtitan 0.3's names of a grouped-query attention and a layer's norms (Qwen3, GPT-OSS):
q, k and v in ``attention.qkv_linear``, ``attention.wo``, ``attention_norm``, ``ffn_norm``."""
_TORCHTITAN_TOP = (Rename("model.embed_tokens.", "tok_embeddings.", at_start=True),
                   Rename("model.layers.", "layers.", at_start=True),
                   Rename("model.norm.", "norm.", at_start=True))
"""torchtitan 0.3's names outside the layers: no ``model.`` prefix, ``tok_embeddings``."""


_QWEN3_TORCHTITAN = (
    *_TORCHTITAN_GQA,
    *(Rename(f".mlp.{hf}_proj.", f".feed_forward.{tt}.")
      for hf, tt in (("gate", "w1"), ("up", "w3"), ("down", "w2"))),
    Rename(".mlp.", ".moe."),
    Rename(".moe.gate.", ".moe.router.gate."),
    Rename(".moe.experts.", ".moe.routed_experts.inner_experts."),
    *_TORCHTITAN_TOP)
"""torchtitan 0.3's names of Qwen3's tensors (``Qwen3StateDictAdapter.from_hf_map``,
``models/qwen3/state_dict_adapter.py``): the attention under ``attention`` with q, k and
v in ``qkv_linear``, the norms ``attention_norm`` and ``ffn_norm``, a dense layer's MLP
``feed_forward.w1/w3/w2``, an MoE block ``moe`` (router ``moe.router.gate``, experts
``moe.routed_experts.inner_experts``, the load-balancing buffer ``moe.expert_bias_E``),
no ``model.`` prefix."""


_QWEN3_TORCHTITAN_UNPLACED = {
    f".self_attn.{name}_proj.bias": "torchtitan 0.3's Qwen3 attention has no biases (its "
    "make_gqa_config builds q, k, v and o without them), so a Qwen3 with attention_bias "
    "cannot be written there" for name in "qkvo"}
"""The tensors of a transformers Qwen3-MoE that torchtitan 0.3's Qwen3 model has no place for."""


_GPT_OSS_TORCHTITAN = (
    *_TORCHTITAN_GQA,
    Rename(".mlp.", ".moe."),
    Rename(".moe.router.", ".moe.router.gate."),
    Rename(".moe.experts.", ".moe.routed_experts.inner_experts."),
    *_TORCHTITAN_TOP)
"""torchtitan 0.3's names of GPT-OSS's tensors (checked against ``GptOssModel``; its
``GptOssStateDictAdapter`` maps the experts to the older ``mlp1_weight`` names): the
attention and norms as Qwen3's, with biases and the sinks (``attention.sinks``), the MoE
block ``moe`` (router weight and bias ``moe.router.gate``, experts
``moe.routed_experts.inner_experts``, the load-balancing buffer ``moe.expert_bias_E``)."""


_DEEPSEEK_V3_TORCHTITAN = (
    *(Rename(f".self_attn.{hf}.", f".self_attn.{tt}.") for hf, tt in (
        ("q_proj", "wq"), ("q_a_proj", "wq_a"), ("q_a_layernorm", "q_norm"),
        ("q_b_proj", "wq_b"), ("kv_a_proj_with_mqa", "wkv_a"), ("kv_a_layernorm", "kv_norm"),
        ("kv_b_proj", "wkv_b"), ("o_proj", "wo"))),
    Rename(".self_attn.", ".attention."),
    Rename(".input_layernorm.", ".attention_norm."),
    Rename(".post_attention_layernorm.", ".ffn_norm."),
    *(Rename(f".mlp.{hf}_proj.", f".feed_forward.{tt}.")
      for hf, tt in (("gate", "w1"), ("up", "w3"), ("down", "w2"))),
    Rename(".mlp.", ".moe."),
    *(Rename(f".moe.shared_experts.{hf}_proj.", f".moe.shared_experts.{tt}.")
      for hf, tt in (("gate", "w1"), ("up", "w3"), ("down", "w2"))),
    Rename(".moe.gate.e_score_correction_bias", ".moe.expert_bias_E"),
    Rename(".moe.gate.", ".moe.router.gate."),
    Rename(".moe.experts.", ".moe.routed_experts.inner_experts."),
    Rename("model.embed_tokens.", "tok_embeddings.", at_start=True),
    Rename("model.layers.", "layers.", at_start=True),
    Rename("model.norm.", "norm.", at_start=True))
"""torchtitan 0.3's names of DeepSeek-V3's tensors (``DeepSeekV3StateDictAdapter.from_hf_map``,
``models/deepseek_v3/state_dict_adapter.py``, checked against ``DeepSeekV3Model``): the MLA
attention under ``attention`` (``wq``, or ``wq_a``/``q_norm``/``wq_b`` with a q LoRA rank;
``wkv_a``, ``kv_norm``, ``wkv_b``, ``wo``), a dense leading layer's MLP
``feed_forward.w1/w3/w2``, an MoE block ``moe`` with shared experts ``moe.shared_experts.w1/w3/w2``
and the router's score-correction bias as ``moe.expert_bias_E`` (fp32 [E] in both: its
router adds it to the sigmoid scores to choose experts, as transformers' does), no
``model.`` prefix. Multi-token-prediction layers (index >= ``num_hidden_layers``) are
``mtp_layers.{L - num_hidden_layers}`` there, a renumbering these rules do not express."""


def _transformers_converts(what: str) -> dict[str, str]:
    """``Family.unconverted`` of a family whose transformers 5.24 conversion_mapping.py
    entry does ``what`` on load, outside the experts."""
    return {"transformers": f"transformers 5.24 {what}"}


_GEMMA4_NEMO = {"nemo": "NeMo AutoModel 0.7 (Gemma4MoEStateDictAdapter) multiplies each "
                        "layer's router.per_expert_scale into its experts' down_projs (and "
                        "moves the experts and the router under moe)"}
"""Gemma 4's experts in NeMo AutoModel's format are not its files' bytes."""


def _qwen_style(model_type: str, count_key: str, renames: tuple[Rename, ...] = (),
                nemo: tuple[Rename, ...] = (), **settings: Any) -> Family:
    """A family of one model type named as Qwen2-MoE on disk (``mlp.experts.{e}.gate_proj``)
    whose transformers names differ by ``renames`` and NeMo AutoModel's by ``nemo``."""
    aliases = tuple(k for k in EXPERT_COUNT_KEYS if k != count_key)
    return Family(model_type, (model_type,), _QWEN_BLOCK, _QWEN_PROJECTIONS, count_key,
                  renames={"transformers": renames, "nemo": nemo}, count_aliases=aliases,
                  **settings)


FAMILIES: tuple[Family, ...] = (
    Family("qwen2_moe", ("qwen2_moe",), _QWEN_BLOCK, _QWEN_PROJECTIONS, "num_experts",
           shared_expert="shared_expert", moe_layers=sparse_step),
    Family("qwen3_moe", ("qwen3_moe",), _QWEN_BLOCK, _QWEN_PROJECTIONS, "num_experts",
           count_aliases=("num_local_experts",), moe_layers=sparse_step,
           renames={"torchtitan": _QWEN3_TORCHTITAN},
           unplaced={"torchtitan": _QWEN3_TORCHTITAN_UNPLACED}),
    Family("qwen3_next", ("qwen3_next",), _QWEN_BLOCK, _QWEN_PROJECTIONS, "num_experts",
           shared_expert="shared_expert", renames={"nemo": _QWEN3_NEXT_NEMO},
           moe_layers=sparse_step),
    Family("olmoe", ("olmoe",), _QWEN_BLOCK, _QWEN_PROJECTIONS, "num_experts",
           count_aliases=("num_local_experts",), moe_layers=every_layer),
    Family("deepseek_v3", ("deepseek_v3",), _QWEN_BLOCK, _QWEN_PROJECTIONS, "n_routed_experts",
           shared_expert="shared_experts", count_aliases=("num_local_experts",),
           moe_layers=after_dense_prefix, renames={"torchtitan": _DEEPSEEK_V3_TORCHTITAN}),
    Family("mixtral", ("mixtral",), _MIXTRAL_BLOCK, _MIXTRAL_PROJECTIONS, "num_local_experts",
           renames={"transformers": _MIXTRAL_TO_MLP},
           count_aliases=("num_experts",), moe_layers=every_layer),
    Family("phimoe", ("phimoe",), _MIXTRAL_BLOCK, _MIXTRAL_PROJECTIONS, "num_local_experts",
           renames={"transformers": (*_MIXTRAL_TO_MLP, Rename(".mlp.gate.weight",
                                                                ".mlp.router.weight"))},
           moe_layers=every_layer),
    # Llama 4 (text) keeps its experts grouped on disk, as its model does in memory:
    # feed_forward.experts.gate_up_proj [E,H,2I] (gate then up) and down_proj [E,I,H], i.e.
    # the transformers layout in the [E, in, out] orientation, which is its hf layout too
    # (transformers 5.24 has no conversion that would load per-expert Llama 4 files).
    # Nemotron-H: non-gated ReLU² experts (up, down) in hybrid Mamba/attention/MoE stacks,
    # under backbone.layers.N.mixer on disk and model.layers.N.mixer in memory.
    Family("nemotron_h", ("nemotron_h",), "backbone.layers.{layer}.mixer",
           {"up": "up_proj", "down": "down_proj"}, "n_routed_experts",
           shared_expert="shared_experts",
           renames={"transformers": (Rename("backbone.", "model.", at_start=True),),
                    "nemo": _NEMOTRON_H_NEMO},
           count_aliases=("num_local_experts",), moe_layers=block_types),
    # GPT-OSS keeps its experts grouped on disk as its model does in memory (transformers
    # 5.24 has no conversion that would load per-expert GPT-OSS files): gate_up_proj
    # [E,H,2I] with gate and up interleaved, biases gate_up_proj_bias [E,2I] (same
    # interleave) and down_proj_bias [E,H], down_proj [E,I,H]; the Hub's MXFP4 files hold
    # gate_up_proj_blocks [E,2I,H/32,16] and gate_up_proj_scales [E,2I,H/32] instead. Its
    # hf layout is the transformers layout, transposed and interleaved.
    # NeMo AutoModel 0.7 (GPTOSSStateDictAdapter) keeps gate_up_proj as it is (interleaved,
    # read by its quick-GeGLU activation) as gate_and_up_projs and names the router
    # mlp.gate; vLLM 0.33 keeps w13_weight and w13_bias interleaved (its swigluoai
    # activation reads the gate from the even rows).
    Family("gpt_oss", ("gpt_oss",), _QWEN_BLOCK, _QWEN_PROJECTIONS, "num_local_experts",
           router="router.weight", transposed={"hf": True, "transformers": True},
           interleaved={"hf": True, "transformers": True, "nemo": True, "vllm": True},
           biases=True, grouped_on_disk=True,
           renames={"nemo": (Rename(".mlp.router.", ".mlp.gate."),),
                    "torchtitan": _GPT_OSS_TORCHTITAN},
           count_aliases=("num_experts",), moe_layers=every_layer),
    Family("llama4", ("llama4_text",), "model.layers.{layer}.feed_forward", _QWEN_PROJECTIONS,
           "num_local_experts", router="router.weight", shared_expert="shared_expert",
           transposed={"hf": True, "transformers": True}, grouped_on_disk=True,
           moe_layers=listed_or_interleaved),
    # Multimodal checkpoints keep the text model's experts under a prefix, as transformers
    # 5.24's save_pretrained writes them: Llama 4 (model_type llama4) under
    # language_model.model., grouped as Llama 4 text; Qwen3-VL-MoE grouped and GLM-4.5V per
    # expert under model.language_model.
    Family("llama4_multimodal", ("llama4",), "language_model.model.layers.{layer}.feed_forward",
           _QWEN_PROJECTIONS, "num_local_experts", router="router.weight",
           shared_expert="shared_expert", transposed={"hf": True, "transformers": True},
           grouped_on_disk=True, text_config=("text_config",), moe_layers=listed_or_interleaved),
    # Qwen3-VL-MoE's Hub files hold gate_up_proj [E,H,2I] and down_proj [E,I,H], which
    # transformers 5.24 transposes on load (conversion_mapping.py "qwen3_vl_moe",
    # Transpose(1, 2, check_dims=True): only where the shape is not the parameter's) and
    # NeMo AutoModel 0.7 renames unchanged; its save_pretrained writes [E,2I,H] and [E,H,I].
    Family("qwen3_vl_moe", ("qwen3_vl_moe",), "model.language_model.layers.{layer}.mlp",
           _QWEN_PROJECTIONS, "num_experts", grouped_on_disk=True,
           transposed={"hf": True}, either_orientation=("hf", "transformers"),
           text_config=("text_config",), moe_layers=sparse_step),
    Family("glm4v_moe", ("glm4v_moe",), "model.language_model.layers.{layer}.mlp",
           _QWEN_PROJECTIONS, "n_routed_experts", shared_expert="shared_experts",
           count_aliases=("num_local_experts",), text_config=("text_config",),
           moe_layers=dense_prefix_of(1)),
    # ERNIE-4.5-VL: each MoE layer holds text experts and vision experts (intermediate
    # sizes moe_intermediate_size[0] and [1]), moe_num_experts of each, numbered 0 to 2n-1
    # in the files, text first; routers gate.weight and gate.weight_1 stored [H, E], the
    # score-correction biases one [2, E] tensor. transformers 5.24 (conversion_mapping.py
    # "ernie4_5_vl_moe") splits them into text_moe and vision_moe.
    Family("ernie4_5_vl_moe", ("ernie4_5_vl_moe",), _QWEN_BLOCK, _QWEN_PROJECTIONS,
           "moe_num_experts", shared_expert="shared_experts", count_aliases=("num_experts",),
           text_config=("text_config",), renames={"transformers": _ERNIE_VL_TRANSFORMERS},
           expert_groups=_ERNIE_VL_GROUPS, groups_unheld=_ERNIE_VL_UNHELD,
           moe_layers=mlp_layer_types),
    Family("lfm2_moe", ("lfm2_moe",), "model.layers.{layer}.feed_forward", _MIXTRAL_PROJECTIONS,
           "num_experts", count_aliases=("num_local_experts",)),
    # Qwen3-Omni: the thinker's text experts per expert under thinker.model.layers on disk.
    Family("qwen3_omni_moe", ("qwen3_omni_moe",), "thinker.model.layers.{layer}.mlp",
           _QWEN_PROJECTIONS, "num_experts", text_config=("thinker_config", "text_config"),
           renames={"transformers": _QWEN3_OMNI_TRANSFORMERS, "nemo": _QWEN3_OMNI_NEMO},
           moe_layers=sparse_step),
    # Aria (model_type aria): Aria text's grouped experts under language_model.model.
    Family("aria_multimodal", ("aria",), "language_model.model.layers.{layer}.mlp",
           _QWEN_PROJECTIONS, "moe_num_experts", router="router.weight",
           shared_expert="shared_experts",
           renames={"hf": _ARIA_ON_DISK, "transformers": _LLAVA_TRANSFORMERS},
           transposed={"hf": True, "transformers": True}, grouped_on_disk=True,
           text_config=("text_config",), moe_layers=every_layer),
    # Qwen3.5-MoE and Qwen4-Exp: transformers 5.24's save_pretrained writes the text experts
    # one tensor per expert under model.language_model.; Qwen3.5-MoE's Hub files hold them
    # grouped as the model does (gate_up_proj [E,2I,H], down_proj [E,H,I], the only form
    # NeMo AutoModel 0.7's Qwen3_5MoeStateDictAdapter reads), which moekit reads as the
    # transformers layout. NeMo names the shared expert shared_experts and keeps the linear
    # attention's A_log and dt_bias under _fp32_params.
    *(Family(model_type, (model_type,), "model.language_model.layers.{layer}.mlp",
             _QWEN_PROJECTIONS, "num_experts", shared_expert="shared_expert",
             renames={"nemo": _QWEN3_NEXT_NEMO}, text_config=("text_config",),
             moe_layers=every_layer) for model_type in ("qwen3_5_moe", "qwen4_exp")),
    # MiniMax-M3-VL: the text experts per expert, named as Mixtral's, under language_model.
    Family("minimax_m3_vl", ("minimax_m3_vl",),
           "language_model.model.layers.{layer}.block_sparse_moe", _MIXTRAL_PROJECTIONS,
           "num_local_experts", shared_expert="shared_experts",
           renames={"nemo": _MINIMAX_M3_VL_NEMO}, text_config=("text_config",),
           unconverted=_transformers_converts(
               "joins each shared expert's gate_proj and up_proj into one gate_up_proj (and "
               "renames the vision tower, the projector and the attention's indexer)")),
    # Step-3.7: the text experts grouped per projection under model.layers.L.moe (the
    # layout of its Step-3.5 text model), the router moe.gate.weight and its bias
    # moe.router_bias beside them, the shared expert share_expert beside the block.
    # transformers 5.24 (conversion_mapping.py "step3p7", "step3p5_vision") joins gate and
    # up into mlp.experts.gate_up_proj and also splits and permutes the vision tower's
    # attention. Its MoE layers are read as transformers reads them (step3p7_layers): the
    # Hub's config.json lists them as moe_layers_enum (transformers' legacy alias of
    # mlp_layer_types) and its files hold num_nextn_predict_layers MTP layers after the
    # stack (transformers skips them on load; NeMo AutoModel 0.7 renumbers them as
    # mtp.layers.N, which no rename here expresses).
    Family("step3p7", ("step3p7",), "model.layers.{layer}.moe", _QWEN_PROJECTIONS,
           "n_routed_experts", count_aliases=("num_local_experts", "moe_num_experts"),
           grouped_on_disk=True, text_config=("text_config",), moe_layers=step3p7_layers,
           renames={"hf": _STEP3P7_ON_DISK, "nemo": _STEP3P7_NEMO},
           mtp_unheld={"nemo": "NeMo AutoModel 0.7 renumbers Step-3.7's multi-token-"
                               "prediction layers as mtp.layers.N, which moekit does not write"},
           unconverted=_transformers_converts(
               "splits the vision tower's in_proj_weight and in_proj_bias into q_proj, k_proj "
               "and v_proj and permutes q_proj and k_proj for its rotary embedding (and "
               "renames the text model, the MoE block and the vision tower)")),
    # Mistral-Large-4: Mistral's own format, which save_pretrained writes too: the text
    # experts per expert as layers.L.experts.e.w1/w3/w2, the router layers.L.gate.
    # NeMo AutoModel 0.7 has no model of it: its Mistral 4 model and adapter
    # (Mistral4MultimodalStateDictAdapter, language_model.model.layers.L.mlp.experts.
    # gate_up_proj) are Mistral-Small-4's, whose supports_config takes only a mistral4 text
    # model, so it builds Mistral-Large-4 through transformers.
    Family("mistral_large4", ("mistral_large4",), "layers.{layer}", _MIXTRAL_PROJECTIONS,
           "n_routed_experts", shared_expert="shared_experts",
           count_aliases=("num_local_experts",), text_config=("text_config",),
           unconverted={**_transformers_converts(
               "permutes the vision tower's wq and wk for its rotary embedding (and renames "
               "Mistral's names: tok_embeddings, attention.*, feed_forward.*, output, ...)"),
               "nemo": "NeMo AutoModel 0.7, which has no model of Mistral-Large-4 (its "
                       "Mistral 4 model takes only Mistral-Small-4's mistral4 text model), "
                       "builds it through transformers 5.24, which permutes the vision "
                       "tower's wq and wk for its rotary embedding"}),
    # Kimi-K2.5: a DeepSeek-V3 text model under language_model.model. (a dense first
    # layer, then routed experts per expert and shared experts), a MoonViT vision tower
    # and a projector. Its Hub files hold the routed experts as compressed-tensors INT4
    # (weight_packed, weight_scale, weight_shape), which moekit does not read; bf16 files
    # (a dequantized copy, or save_pretrained's) convert.
    Family("kimi_k25", ("kimi_k25",), "language_model.model.layers.{layer}.mlp",
           _QWEN_PROJECTIONS, "n_routed_experts", shared_expert="shared_experts",
           count_aliases=("num_local_experts",), text_config=("text_config",),
           moe_layers=after_dense_prefix, saved_as=_KIMI_K25_SAVED,
           renames={"nemo": _KIMI_K25_NEMO}, unconverted=_transformers_converts(
               "splits the vision tower's wqkv into q_proj, k_proj and v_proj and permutes "
               "q_proj and k_proj for its rotary embedding (and renames the text model, the "
               "vision tower's norms and MLPs and the projector)")),
    Family("jamba", ("jamba",), "model.layers.{layer}.feed_forward", _QWEN_PROJECTIONS,
           "num_experts", router="router.weight", count_aliases=("num_local_experts",),
           moe_layers=expert_period),
    # MiniMax, MiniMax-M2 and Kimi-Linear are named as Mixtral on disk; transformers 5.24
    # names the block mlp in memory (their conversion_mapping.py entries).
    Family("minimax", ("minimax",), _MIXTRAL_BLOCK, _MIXTRAL_PROJECTIONS,
           "num_local_experts", renames={"transformers": _MIXTRAL_TO_MLP},
           count_aliases=("num_experts",), moe_layers=every_layer),
    Family("minimax_m2", ("minimax_m2",), _MIXTRAL_BLOCK, _MIXTRAL_PROJECTIONS,
           "num_local_experts", renames={"transformers": _MIXTRAL_TO_MLP,
                                         "nemo": _MINIMAX_M2_NEMO},
           count_aliases=("num_experts",), moe_layers=every_layer),
    Family("kimi_linear", ("kimi_linear",), _MIXTRAL_BLOCK, _MIXTRAL_PROJECTIONS, "num_experts",
           shared_expert="shared_experts",
           renames={"transformers": _MIXTRAL_TO_MLP, "nemo": _KIMI_LINEAR_NEMO},
           unconverted=_transformers_converts("joins the attention's q_conv1d, k_conv1d "
                                              "and v_conv1d weights into one conv1d"),
           count_aliases=("num_local_experts",)),
    # Grouped on disk (transformers 5.24's conversion_mapping.py "granitemoe", "aria_text";
    # GraniteMoE-SWA and JetMoE have no entry: their models hold the on-disk tensors):
    # gate_up [E, 2I, H] with gate first (Aria [E, H, 2I]) and down [E, H, I] (Aria [E, I, H]).
    Family("granitemoe", ("granitemoe", "granitemoeshared", "granitemoehybrid"),
           _MIXTRAL_BLOCK, _QWEN_PROJECTIONS, "num_local_experts", router="router.layer.weight",
           renames={"hf": _linear_on_disk("block_sparse_moe"),
                    "transformers": (Rename(".block_sparse_moe.router.layer.weight",
                                            ".block_sparse_moe.router.weight"),)},
           grouped_on_disk=True),
    Family("granitemoe_swa", ("granitemoe_swa",), _MIXTRAL_BLOCK, _QWEN_PROJECTIONS,
           "num_local_experts", router="router.weight", grouped_on_disk=True,
           moe_layers=every_layer),
    Family("jetmoe", ("jetmoe",), _QWEN_BLOCK, _QWEN_PROJECTIONS, "num_local_experts",
           router="router.layer.weight",
           renames={"hf": _linear_on_disk("mlp"), "transformers": _linear_on_disk("mlp")},
           grouped_on_disk=True, moe_layers=every_layer),
    Family("aria", ("aria_text",), _QWEN_BLOCK, _QWEN_PROJECTIONS, "moe_num_experts",
           router="router.weight", shared_expert="shared_experts",
           renames={"hf": _ARIA_ON_DISK}, transposed={"hf": True, "transformers": True},
           grouped_on_disk=True, moe_layers=every_layer),
    # transformers 5.24: LongCat-Flash's router (router.classifier) has n_routed_experts +
    # zero_expert_num rows, Inkling's (gate) n_routed_experts + n_shared_experts; Inkling's
    # files hold its experts grouped, as its model does.
    _qwen_style("longcat_flash", "n_routed_experts", router="router.classifier.weight",
                router_extra_rows="zero_expert_num"),
    _qwen_style("inkling_text", "n_routed_experts", shared_expert="shared_experts",
                grouped_on_disk=True, router_extra_rows="n_shared_experts"),
    # Inkling 2 (and its loop variant; text and multimodal files alike): grouped experts
    # under model.llm., w13_weight [E,2I,H] with gate and up interleaved and w2_weight
    # [E,H,I] (conversion_mapping.py "inkling2_text": Interleave(dim=1) into gate_up_proj);
    # transformers names the text model model. (model.language_model. in the multimodal
    # model).
    *(Family(name, model_types, "model.llm.layers.{layer}.mlp", _QWEN_PROJECTIONS,
             "n_routed_experts", grouped_on_disk=True, interleaved={"hf": True},
             text_config=text_config, renames={
                 "hf": (Rename(".mlp.experts.gate_up_proj", ".mlp.experts.w13_weight"),
                        Rename(".mlp.experts.down_proj", ".mlp.experts.w2_weight")),
                 "transformers": (Rename("model.llm.", text_model, at_start=True),)},
             count_aliases=tuple(k for k in EXPERT_COUNT_KEYS if k != "n_routed_experts"),
             unconverted=_transformers_converts(
                 "renames Inkling 2's namespace (attn.wq_du to self_attn.q_proj.linear, ...), "
                 "moves the attn_res queries into the layers and unpads the head's vocabulary"))
      for name, model_types, text_model, text_config in (
          ("inkling2_text", ("inkling2_text", "inkling2_loop_text"), "model.", ()),
          ("inkling2", ("inkling2", "inkling2_loop"), "model.language_model.",
           ("text_config",)))),
    # Inkling (multimodal, model_type inkling_mm_model): its files hold the text experts as
    # Inkling 2's do (model.llm., w13_weight interleaved), the router scoring
    # n_routed_experts + n_shared_experts rows (conversion_mapping.py "inkling_mm_model").
    Family("inkling_mm_model", ("inkling_mm_model",), "model.llm.layers.{layer}.mlp",
           _QWEN_PROJECTIONS, "n_routed_experts", grouped_on_disk=True,
           interleaved={"hf": True}, text_config=("text_config",),
           router_extra_rows="n_shared_experts",
           renames={"hf": (Rename(".mlp.experts.gate_up_proj", ".mlp.experts.w13_weight"),
                           Rename(".mlp.experts.down_proj", ".mlp.experts.w2_weight"))},
           count_aliases=tuple(k for k in EXPERT_COUNT_KEYS if k != "n_routed_experts"),
           unconverted={**_transformers_converts(
               "joins each shared expert's interleaved shared_w13_weight into gate_proj and "
               "up_proj (and renames Inkling's namespace: model.llm. to "
               "model.language_model., attn.wq_du to self_attn.q_proj, ...)"),
               "nemo": "NeMo AutoModel 0.7 (InklingStateDictAdapter) transposes and "
                       "de-interleaves the shared experts' shared_w13_weight (and renames "
                       "Inkling's namespace: model.llm. to model.language_model., attn.wq_du "
                       "to self_attn.q_proj, ...)"}),
    # DeepSeek-OCR-2 and Unlimited-OCR: a DeepSeek-V2-style text model (routed experts per
    # expert, shared experts) under model.layers. in their files, beside SAM and Qwen2-style
    # vision encoders. NeMo AutoModel 0.7 has no model of either, so it loads them through
    # transformers, whose conversion renames and splits tower tensors.
    *(Family(model_type, (model_type,), _QWEN_BLOCK, _QWEN_PROJECTIONS, "n_routed_experts",
             shared_expert="shared_experts", text_config=("text_config",),
             count_aliases=tuple(k for k in EXPERT_COUNT_KEYS if k != "n_routed_experts"),
             moe_layers=mlp_layer_types,
             unconverted={layout: f"{consumer}transformers 5.24 {converts}"
                          for layout, consumer in (
                              ("transformers", ""),
                              ("nemo", f"NeMo AutoModel 0.7 has no model of {name}, so it "
                                       "holds what "))})
      for model_type, name, converts in (
          ("deepseek_ocr2", "DeepSeek-OCR-2",
           "loads: it renames the SAM and Qwen2 vision encoders (sam_model.blocks.N.norm1 to "
           "vision_tower.sam_encoder.layers.N.layer_norm1, qwen2_model. to "
           "vision_tower.vision_encoder., ...), the projector and view_seperator, and moves "
           "the text model under model.language_model"),
          ("unlimited_ocr", "Unlimited-OCR",
           "loads: it splits the vision encoder's qkv_proj into q_proj, k_proj and v_proj "
           "(and renames the SAM encoder, the projector and view_seperator, and moves the "
           "text model under model.language_model)"))),
    # Nemotron-H-Omni and Nemotron-3.5-Transcribe: a Nemotron-H text model (non-gated
    # experts per expert) under language_model.backbone. and llm.model. in their files,
    # beside RADIO vision and NeMo audio towers, which transformers 5.24 (conversion_mapping.py
    # "radio", "nemo_speechlm") and NeMo AutoModel 0.7 convert on load. save_pretrained
    # writes the experts per expert; Nemotron-3.5-Transcribe's Hub files (NVIDIA's NeMo
    # export) group them under nemo's names, read as that layout.
    Family("nemotron_h_omni", ("nemotron_h_omni",), "language_model.backbone.layers.{layer}.mixer",
           {"up": "up_proj", "down": "down_proj"}, "n_routed_experts",
           shared_expert="shared_experts", text_config=("text_config",),
           count_aliases=("num_local_experts",), moe_layers=block_types,
           unconverted={**_transformers_converts(
               "splits the RADIO vision tower's attn.qkv into q_proj, k_proj and v_proj (and "
               "renames the tower, the projector and the text model's backbone)"),
               "nemo": "NeMo AutoModel 0.7 (NemotronOmniStateDictAdapter) splits the RADIO "
                       "vision tower's attn.qkv into query, key and value (and renames the "
                       "tower and the text model's backbone)"}),
    Family("nemo_speechlm", ("nemo_speechlm",), "llm.model.layers.{layer}.mixer",
           {"up": "up_proj", "down": "down_proj"}, "n_routed_experts",
           shared_expert="shared_experts", text_config=("text_config",),
           count_aliases=("num_local_experts",), moe_layers=block_types, hub_layout="nemo",
           unconverted={layout: f"{consumer}transformers 5.24 loads: it renames NVIDIA's "
                                "NeMo export (perception.encoder. to model.audio_tower., "
                                "llm.model.layers. to model.language_model.layers., its "
                                "encoders' norms and attention, ...) and splits each "
                                "attention's w_qkv into q_proj, k_proj and v_proj"
                        for layout, consumer in (
                            ("transformers", ""),
                            ("nemo", "NeMo AutoModel 0.7 has no model of "
                                     "Nemotron-3.5-Transcribe, so it holds what "))}),
    _qwen_style("glm4_moe", "n_routed_experts", shared_expert="shared_experts",
                moe_layers=dense_prefix_of(1)),
    # Qwen-style experts whose router biases, shared experts, norms or attention sinks
    # transformers 5.24 renames on load (each model type's conversion_mapping.py entry).
    # Where that entry also splits, joins or renames tensors outside the experts in ways
    # these renames do not hold, the transformers layout is refused (``unconverted``).
    _qwen_style("exaone_moe", "num_experts", shared_expert="shared_experts", renames=(
        Rename(".mlp.e_score_correction_bias", ".mlp.gate.e_score_correction_bias"),)),
    _qwen_style("ernie4_5_moe", "moe_num_experts", shared_expert="shared_experts", renames=(
        Rename(".mlp.moe_statics.e_score_correction_bias",
               ".mlp.gate.moe_statics.e_score_correction_bias"),), nemo=_ERNIE_NEMO),
    _qwen_style("bailing_hybrid", "num_local_experts", shared_expert="shared_experts",
                renames=(Rename(".mlp.gate.expert_bias", ".mlp.gate.e_score_correction_bias"),),
                unconverted=_transformers_converts(
                    "joins the attention's q_conv1d, k_conv1d and v_conv1d weights into one "
                    "conv1d (and renames attention.* to self_attn.*)")),
    _qwen_style("sarvam_moe", "n_routed_experts", shared_expert="shared_experts", renames=(
        Rename(".mlp.gate.expert_bias", ".mlp.gate.e_score_correction_bias"),),
                unconverted=_transformers_converts(
                    "splits the attention's query_key_value into q_proj, k_proj and v_proj "
                    "(and renames attention.* to self_attn.*)")),
    # MiniMax-M3-VL's text model and Zaya hold their experts grouped in their files, as
    # their models do (transformers 5.24 has no conversion_mapping.py entry for them).
    # Zaya's router is an MLP (transformers 5.24's ZayaRouter: mlp.gate.down_proj, then
    # router_mlp.fc1, fc2 and out_proj, of num_experts + 1 rows).
    _qwen_style("minimax_m3_vl_text", "num_local_experts", shared_expert="shared_experts",
                grouped_on_disk=True),
    _qwen_style("zaya", "num_experts", grouped_on_disk=True, router=None),
    # Gemma 4 (enable_moe_block): each layer holds its experts beside its dense MLP, as
    # experts.gate_up_proj [E,2I,H] and experts.down_proj [E,H,I] directly under the layer
    # (router router.proj.weight), in its files as in its model; the multimodal model
    # (gemma4) holds its text model under model.language_model.
    *(Family(name, (model_type,), f"{prefix}.layers.{{layer}}", _QWEN_PROJECTIONS,
             "num_experts", router="router.proj.weight", grouped_on_disk=True,
             unconverted=_GEMMA4_NEMO, text_config=text_config, moe_layers=every_layer)
      for name, model_type, prefix, text_config in (
          ("gemma4_text", "gemma4_text", "model", ()),
          ("gemma4", "gemma4", "model.language_model", ("text_config",)))),
    # Lara-mini's files hold its experts grouped, as its model does.
    _qwen_style("lara_mini", "num_experts", shared_expert="shared_expert", grouped_on_disk=True,
                unconverted=_transformers_converts(
                    "splits the linear attention's in_proj into in_proj_qkv, in_proj_z, "
                    "in_proj_b and in_proj_a")),
    _qwen_style("axk1", "n_routed_experts", shared_expert="shared_experts", renames=(
        Rename(".post_mlp_layernorm.", ".mlp.post_mlp_layernorm."),)),
    _qwen_style("axk2", "n_routed_experts", shared_expert="shared_experts", renames=(
        Rename(".W_down.", ".mlp.fc1."), Rename(".W_up.", ".mlp.fc2."),
        Rename(".self_attn.q_b_proj.", ".self_attn.q_gate_proj."))),
    _qwen_style("hy_v3", "num_experts", router="router.gate.weight", shared_expert="shared_mlp",
                renames=(Rename(".mlp.expert_bias", ".mlp.e_score_correction_bias"),
                         Rename(".mlp.router.gate.weight", ".mlp.gate.weight"),
                         Rename(".mlp.shared_mlp.", ".mlp.shared_experts.")), nemo=_HY_V3_NEMO),
    _qwen_style("hy_v4", "n_routed_experts", shared_expert="shared_experts",
                grouped_on_disk=True, renames=(Rename(".linear_gate", ".gate_proj"),),
                unconverted=_transformers_converts(
                    "renames the hyper-connection tensors (hc_pre.hc_*, hc_attn_layer.*, "
                    "hc_mlp_layer.*, hc_head_*) and the attention sinks "
                    "(learnable_sink_param)")),
    # HY-V4-VL's files hold its text model as HY-V4's (model.layers., experts grouped) and
    # its vision tower as vit.
    Family("hy_v4_vl", ("hy_v4_vl",), _QWEN_BLOCK, _QWEN_PROJECTIONS, "n_routed_experts",
           shared_expert="shared_experts", grouped_on_disk=True, text_config=("text_config",),
           count_aliases=tuple(k for k in EXPERT_COUNT_KEYS if k != "n_routed_experts"),
           unconverted=_transformers_converts(
               "moves the text model under model.language_model and the vision tower (vit.*) "
               "under model.vision_tower, renaming its MLPs, norms and projector, and renames "
               "the hyper-connection tensors")),
    _qwen_style("kolibri1", "num_experts", shared_expert="shared_experts", renames=(
        Rename(".moe.router.expert_bias", ".mlp.gate.e_score_correction_bias"),
        Rename(".post_attn_norm.", ".post_self_attn_layernorm."),
        Rename(".post_ffn_norm.", ".post_mlp_layernorm."))),
    _qwen_style("flint", "num_experts", renames=(
        Rename(".self_attn.softmax_offset", ".self_attn.sinks"),)),
    _qwen_style("mimo_v2_flash", "n_routed_experts", renames=(
        Rename(".self_attn.attention_sink_bias", ".self_attn.sinks"),)),
    Family("laguna", ("laguna",), _QWEN_BLOCK, _QWEN_PROJECTIONS, "num_experts",
           shared_expert="shared_expert", in_experts=("e_score_correction_bias",),
           renames={layout: _LAGUNA_RENAMES for layout in ("transformers", "nemo")},
           count_aliases=tuple(k for k in EXPERT_COUNT_KEYS if k != "num_experts")),
    Family("deepseek_v4", ("deepseek_v4",), "model.layers.{layer}.ffn", _MIXTRAL_PROJECTIONS,
           "n_routed_experts", shared_expert="shared_experts",
           count_aliases=("num_local_experts",), renames={"transformers": (
               Rename(".ffn.", ".mlp."),
               Rename(".mlp.gate.bias", ".mlp.gate.e_score_correction_bias"),
               *(Rename(f".mlp.shared_experts.{old}.", f".mlp.shared_experts.{new}.")
                 for old, new in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))))},
           unconverted=_transformers_converts(
               "renames the attention (attn.* to self_attn.*, wq_a, wkv, wo_a, ...), its "
               "indexer and compressor, the hyper-connection tensors (hc_*), the norms, the "
               "embeddings and the head")),
)

GENERIC_FAMILIES: tuple[Family, ...] = (
    Family("qwen_style", (), _QWEN_BLOCK, _QWEN_PROJECTIONS, "num_experts",
           count_aliases=EXPERT_COUNT_KEYS[1:], text_config=("text_config",)),
    Family("mixtral_style", (), _MIXTRAL_BLOCK, _MIXTRAL_PROJECTIONS, "num_local_experts",
           count_aliases=tuple(k for k in EXPERT_COUNT_KEYS if k != "num_local_experts"),
           text_config=("text_config",)),
)
"""Used when config.json is absent or names a family moekit does not know: the naming
is recognised from the keys and the expert count from the tensors (and the config's, its
``text_config``'s where it has one: a multimodal model moekit does not know is then said to
declare experts that no family reads, not taken for a dense model)."""


def family_named(name: str) -> Family | None:
    """The family with this name, or None."""
    return next((f for f in FAMILIES + GENERIC_FAMILIES if f.name == name), None)


def family_of_model_type(model_type: str | None) -> Family | None:
    """The family whose checkpoints carry this ``config.json`` model_type, or None."""
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def renamed_shape(key: str, shape: tuple[int, ...], rules: tuple[Rename, ...],
                  reverse: bool = False) -> tuple[int, ...] | None:
    """The shape of the tensor ``key`` once ``rename`` has renamed it: without the leading
    dimension of 1 a squeezing rule drops (with it back, ``reverse``); None when that
    dimension is not 1."""
    for rule in reversed(rules) if reverse else rules:
        new = rule.undo(key) if reverse else rule.apply(key)
        if new != key and rule.squeeze:
            if not reverse and shape[:1] != (1,):
                return None
            shape = (1, *shape) if reverse else shape[1:]
        key = new
    return shape


def rename(key: str, rules: tuple[Rename, ...], reverse: bool = False) -> str:
    """Apply ``rules`` in turn; ``reverse`` undoes them, the last rule first."""
    for rule in reversed(rules) if reverse else rules:
        key = rule.undo(key) if reverse else rule.apply(key)
    return key
