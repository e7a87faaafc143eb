"""Megatron-Core's layout: a whole model under the keys of megatron-core 0.16.1's
``GPTModel.sharded_state_dict()``, stored as a ``torch_dist`` checkpoint
(``moekit.megatron_io`` writes and reads the folder).

What megatron-core 0.16.1 saves (``dist_checkpointing.save``, checked on a saved model
of the local layer spec; the Transformer Engine layer spec's keys differ only where
``Entry.te_key`` says):

- The decoder's layers are stacked: ``decoder.layers.X`` has shape ``[L, ...]`` and one
  chunk a layer (``TransformerLayer`` prepends the layer axis to each module's sharded
  offsets). An expert's tensors are stacked over layers then experts,
  ``decoder.layers.mlp.experts.experts.linear_fc{1,2}.weight`` ``[L, E, ...]`` with
  global expert indices, one chunk an expert (``SequentialMLP``; an expert-parallel rank
  saves its own experts' chunks, so the stored tensor is the same at any EP size). The
  Transformer Engine spec's grouped experts (``moe_grouped_gemm``: ``TEGroupedMLP``) save
  the same keys and chunks: ``TEGroupedLinear._sharded_state_dict_grouped`` gives each
  GEMM's ``weight{i}`` the key ``linear_fc{1,2}.weight`` and its global expert's offset,
  and ``TEGroupedMLP.sharded_state_dict`` SequentialMLP's prefix.
  Where some layers are dense and others MoE (``moe_layer_freq`` a list: DeepSeek-V3's
  ``first_k_dense_replace``, Qwen3-MoE's ``mlp_only_layers``), each layer is saved under
  its own key ``decoder.layers.{layer}.X`` without the layer axis (``Entry.at_layer``).
- ``linear_fc1`` of a gated MLP (dense or expert) is ``cat(gate, up)`` along its rows,
  saved as two chunks, the gate half then the up half (``apply_swiglu_sharded_factory``).
- ``linear_qkv`` holds, for each of the ``num_query_groups`` groups in turn, that
  group's query heads, then its key head, then its value head (``[G*(Q/G+2)*D, H]``);
  its bias, where the model has one, likewise.
- The norms are stored under the keys of the Transformer Engine spec's fused layer-norm
  linears, ``self_attention.linear_qkv.layer_norm_weight`` (input norm) and
  ``mlp.linear_fc1.layer_norm_weight`` (pre-MLP norm; the TE spec's MoE layers keep it
  apart, ``pre_mlp_layernorm.weight``); Qwen3's per-head norms are
  ``self_attention.{q,k}_layernorm.weight``. DeepSeek-V3's multi-latent attention keeps
  HF's tensors as they are under the local MLA spec's module names (see ``ENTRIES``).
- Every linear layer (``linear_qkv``, MLA's projections, ``linear_proj``, ``linear_fc1``,
  ``linear_fc2``, dense, expert or shared expert; not the output layer nor the router)
  has an ``_extra_state`` object per layer (and expert): ``{module}._extra_state/
  shard_{offsets}_{shape}`` over the stacked axes (``shard_0_1`` where there are none),
  ``torch.save([None])`` for a local-spec layer, whose ``get_extra_state`` returns None.
  A strict load requires each.
- DeepSeek-V3's multi-token-prediction layers (HF layers ``num_hidden_layers + d`` for
  ``d`` below ``num_nextn_predict_layers``) are ``mtp.layers.{d}.…``
  (``MultiTokenPredictionBlock``, built with ``mtp_num_layers``): ``enorm``, ``hnorm``,
  ``eh_proj`` (a linear layer), the decoder layer under ``transformer_layer.`` with the
  decoder's keys but no layer axis (experts ``[E, ...]``), and ``final_layernorm`` (HF's
  ``shared_head.norm``). The decoder layer is built with the last decoder layer's spec
  (``get_gpt_mtp_block_spec``), so it holds that layer's tensors (``check_mtp_layer``).
  The block embeds with the main model's embedding and scores with its output layer, so
  the layer's own ``embed_tokens`` and ``shared_head.head`` are written only as those
  (``MTP_COPIES``): refused at planning where their shapes or dtypes differ, and while
  writing where their bytes do (``RequireEqual``); reading gives them back as copies of
  the main ones.
- ``common.pt`` holds what Megatron-LM's training loop reads (``megatron_io.COMMON_STATE``),
  ``metadata.json`` names the ``torch_dist`` backend.

At plan level the layout names tensors as Hugging Face does (it is the per-expert HF
layout); ``whole_model`` then places every tensor in Megatron's stored tensors as
chunks (``TensorPlan.chunk``), joining the QKV projections with plan nodes; reading
inverts each entry of ``ENTRIES``. An attention output bias (Qwen3's ``attention_bias``:
megatron-core's ``add_bias_linear`` gives every linear layer a bias, its ``add_qkv_bias``
only QKV one) and families not named in ``FAMILIES`` are refused.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace

from ..errors import NAME_A_CONFIG, MoekitError
from ..model_config import MAX_LAYERS, TOO_MANY_LAYERS
from ..plan import Chunk, Concat, Expr, Plan, RequireEqual, Reshape, TensorPlan
from .families import PROJECTIONS, Family
from .hf import PerExpertLayout

FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "llama", "mistral", "qwen2",
            "qwen3")
"""The ``model_type`` values moekit writes in Megatron-Core's layout: Llama-style
attention (grouped query heads, optional QKV biases and Qwen3's per-head norms) or
DeepSeek-V3's multi-latent attention (``MLA_FAMILIES``), RMSNorm, a gated MLP or routed
experts (with DeepSeek-V3's shared experts and score-correction bias, or Qwen2-MoE's
gated shared expert) in each layer."""

SPECS = ("local", "te")
"""The layer specs whose checkpoints moekit reads: megatron-core's local one
(``get_gpt_layer_local_spec``), which it writes, and its Transformer Engine one
(``get_gpt_layer_with_transformer_engine_spec``; ``Entry.te_key``)."""

MLA_FAMILIES = ("deepseek_v3",)
"""The model types whose attention is megatron-core's ``MLASelfAttention``."""

LAYERS = "decoder.layers."
"""The prefix of the decoder layers' keys; a checkpoint whose layers are not all alike
saves each layer under its own ``decoder.layers.{layer}.`` prefix (``Entry.at_layer``)."""


@dataclass(frozen=True)
class Entry:
    """One stored Megatron-Core tensor and the Hugging Face tensors it holds.

    ``parts`` are HF key templates: ``{layer}``, ``{expert}``, and the family's MoE
    ``{block}``, ``{router}``, ``{shared}`` (its shared expert's module) and projection
    names ``{gate}``, ``{up}``, ``{down}`` (``gate_proj.weight``)."""

    key: str
    parts: tuple[str, ...]
    stacked: int = 1
    """Copies of the tensor: 0 (one for the model), 1 (one a layer), 2 (one a layer and
    expert)."""
    qkv: bool = False
    """The parts are q, k and v, interleaved by query group; otherwise each part is its
    own chunk along the first axis after the stacked ones, in order."""
    linear: bool = False
    """The module is a Megatron-Core linear layer, which saves an ``_extra_state``."""
    optional: bool = False
    """Written only where the source has it (biases, an untied output layer, Qwen3's
    head norms, the MLP of a dense or an MoE layer, shared experts)."""
    attention: str = ""
    """``gqa`` or ``mla``: the tensor belongs to that attention only (``Dimensions.mla``)."""
    model_types: tuple[str, ...] = ()
    """Where not empty, the only model types whose transformers models hold the tensor: a
    checkpoint of another one holding it is refused, as its model would drop it."""
    layer: int | None = None
    """The one layer whose copy this entry stores under its own key (``at_layer``)."""
    te_key: str = ""
    """Where not empty, the key under which a model built with megatron-core 0.16.1's
    Transformer Engine layer spec saves the tensor (``named``): a norm that spec fuses
    into the linear layer after it (``TELayerNormColumnParallelLinear``'s
    ``layer_norm_weight``) where the local spec keeps it apart, or the reverse."""
    te_layers: str = ""
    """``moe`` or ``dense``: the only layers where ``te_key`` applies; every layer where
    empty."""
    depth: int | None = None
    """The multi-token-prediction layer (0 for the first) whose copy this entry stores
    under its own key (``in_mtp``)."""

    @property
    def axes(self) -> int:
        """Leading axes of the stored tensor stacking its copies: layers, then experts;
        no layer axis for an entry of one layer."""
        return self.stacked - (self.layer is not None or self.depth is not None)

    def at_layer(self, layer: int) -> "Entry":
        """This layer-stacked entry as megatron-core 0.16.1 saves the copy of ``layer``
        when the layers are not all alike (``moe_layer_freq`` a list):
        ``TransformerBlock.sharded_state_dict`` then names each layer's tensors
        ``decoder.layers.{layer}.…`` without a layer axis (``non_homogeneous_layers``)."""
        return replace(self, key=self.key.replace(LAYERS, f"{LAYERS}{layer}.", 1), layer=layer)

    def in_mtp(self, depth: int) -> "Entry":
        """This layer-stacked entry (or one of ``MTP_ENTRIES``) as megatron-core 0.16.1
        saves the copy of multi-token-prediction layer ``depth``:
        ``MultiTokenPredictionBlock.sharded_state_dict`` names each MTP layer's tensors
        ``mtp.layers.{depth}.…``, its decoder layer's under ``transformer_layer.``, without
        a layer axis."""
        prefix = f"{MTP_LAYERS}{depth}."
        key = (self.key.replace(LAYERS, f"{prefix}{MTP_DECODER}", 1)
               if self.key.startswith(LAYERS) else self.key.replace(MTP_LAYERS, prefix, 1))
        return replace(self, key=key, depth=depth)

    def named(self, spec: str, moe: bool) -> "Entry":
        """This entry as a model of layer spec ``spec`` (one of ``SPECS``) saves it in an
        MoE layer (``moe``) or a dense one."""
        if spec != "te" or not self.te_key or \
                self.te_layers not in ("", "moe" if moe else "dense"):
            return self
        at = "" if self.layer is None else f"{self.layer}."
        return replace(self, key=self.te_key.replace(LAYERS, f"{LAYERS}{at}", 1))

    def hf_keys(self, family: Family, index: tuple[int, ...]) -> list[str]:
        """The HF keys of the parts at ``index`` (layer, expert)."""
        fields = dict(zip(("layer", "expert"), index))
        block = family.block.format(layer=fields.get("layer", 0))
        names = {p: family.piece_key(p) for p in family.projections}
        return [part.format(**fields, block=block, router=family.router,
                            shared=family.shared_expert, **names) for part in self.parts]

    def stored_index(self, index: tuple[int, ...]) -> tuple[int, ...]:
        """The place of copy ``index`` (layer, expert) along the stored tensor's axes."""
        return index[self.stacked - self.axes:]

    def extra_state(self, chunk: Chunk) -> str | None:
        """The ``_extra_state`` object saved with the chunk of a linear layer's weight:
        sharded over the stacked axes, or one object of shape (1,) where there are none
        (``make_sharded_object_for_checkpoint`` in megatron-core 0.16.1)."""
        if not (self.linear and self.key.endswith(".weight")):
            return None
        axes = (chunk.offsets[:self.axes], chunk.whole[:self.axes]) if self.axes else ((0,), (1,))
        module = self.key[:-len(".weight")]
        return f"{module}._extra_state/shard_{'_'.join('.'.join(map(str, a)) for a in axes)}"


_LAYER = "model.layers.{layer}"
_ATTENTION = f"{_LAYER}.self_attn"
_SHARED = "{block}.{shared}"
_WITH_SHARED = ("deepseek_v3", "qwen2_moe")
"""The model types of ``FAMILIES`` whose MoE blocks have shared experts."""
ENTRIES: tuple[Entry, ...] = (
    Entry("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), stacked=0),
    # Llama-style attention: the local spec's keys map (sharded_state_dict_keys_map) names
    # its norms as the Transformer Engine spec's fused layer-norm linears do, but for the
    # pre-MLP norm of an MoE layer, which the TE spec keeps apart (a TENorm,
    # pre_mlp_layernorm.weight: get_gpt_layer_with_transformer_engine_spec with num_experts).
    Entry("decoder.layers.self_attention.linear_qkv.layer_norm_weight",
          (f"{_LAYER}.input_layernorm.weight",), attention="gqa"),
    Entry("decoder.layers.self_attention.linear_qkv.weight",
          tuple(f"{_ATTENTION}.{p}_proj.weight" for p in "qkv"), qkv=True, linear=True,
          attention="gqa"),
    Entry("decoder.layers.self_attention.linear_qkv.bias",
          tuple(f"{_ATTENTION}.{p}_proj.bias" for p in "qkv"), qkv=True, optional=True,
          attention="gqa"),
    Entry("decoder.layers.self_attention.q_layernorm.weight", (f"{_ATTENTION}.q_norm.weight",),
          optional=True, attention="gqa"),
    Entry("decoder.layers.self_attention.k_layernorm.weight", (f"{_ATTENTION}.k_norm.weight",),
          optional=True, attention="gqa"),
    # Multi-latent attention, as megatron-core 0.16.1's get_gpt_layer_local_spec(
    # multi_latent_attention=True, qk_layernorm=True) builds it: separate input_layernorm,
    # q_layernorm (over q_lora_rank) and kv_layernorm (over kv_lora_rank), and
    # pre_mlp_layernorm modules, no keys map. Its rows are HF's as they are: q per head
    # [nope, rope], kv_down [kv_lora_rank, rope], kv_up per head [nope, v];
    # MLASelfAttention applies RoPE to the rope dims de-interleaved (even then odd, rope_utils
    # _apply_rotary_pos_emb_bshd with multi_latent_attention), as transformers' DeepSeek-V3
    # does with rope_interleave. The Transformer Engine spec (multi_latent_attention=True,
    # qk_layernorm=True) fuses q_layernorm into linear_q_up_proj and kv_layernorm into
    # linear_kv_up_proj (TELayerNormColumnParallelLinear, their q_layernorm and kv_layernorm
    # IdentityOp) and, in a dense layer, the pre-MLP norm into mlp.linear_fc1 (its
    # pre_mlp_layernorm IdentityOp without num_experts).
    Entry("decoder.layers.input_layernorm.weight", (f"{_LAYER}.input_layernorm.weight",),
          attention="mla"),
    Entry("decoder.layers.self_attention.linear_q_proj.weight", (f"{_ATTENTION}.q_proj.weight",),
          linear=True, optional=True, attention="mla"),
    Entry("decoder.layers.self_attention.linear_q_down_proj.weight",
          (f"{_ATTENTION}.q_a_proj.weight",), linear=True, optional=True, attention="mla"),
    Entry("decoder.layers.self_attention.linear_q_up_proj.weight",
          (f"{_ATTENTION}.q_b_proj.weight",), linear=True, optional=True, attention="mla"),
    Entry("decoder.layers.self_attention.linear_kv_down_proj.weight",
          (f"{_ATTENTION}.kv_a_proj_with_mqa.weight",), linear=True, attention="mla"),
    Entry("decoder.layers.self_attention.linear_kv_up_proj.weight",
          (f"{_ATTENTION}.kv_b_proj.weight",), linear=True, attention="mla"),
    Entry("decoder.layers.self_attention.q_layernorm.weight",
          (f"{_ATTENTION}.q_a_layernorm.weight",), optional=True, attention="mla",
          te_key="decoder.layers.self_attention.linear_q_up_proj.layer_norm_weight"),
    Entry("decoder.layers.self_attention.kv_layernorm.weight",
          (f"{_ATTENTION}.kv_a_layernorm.weight",), attention="mla",
          te_key="decoder.layers.self_attention.linear_kv_up_proj.layer_norm_weight"),
    Entry("decoder.layers.self_attention.linear_proj.weight", (f"{_ATTENTION}.o_proj.weight",),
          linear=True),
    Entry("decoder.layers.mlp.linear_fc1.layer_norm_weight",
          (f"{_LAYER}.post_attention_layernorm.weight",), attention="gqa",
          te_key="decoder.layers.pre_mlp_layernorm.weight", te_layers="moe"),
    Entry("decoder.layers.pre_mlp_layernorm.weight",
          (f"{_LAYER}.post_attention_layernorm.weight",), attention="mla",
          te_key="decoder.layers.mlp.linear_fc1.layer_norm_weight", te_layers="dense"),
    Entry("decoder.layers.mlp.linear_fc1.weight",
          (f"{_LAYER}.mlp.gate_proj.weight", f"{_LAYER}.mlp.up_proj.weight"), linear=True,
          optional=True),
    Entry("decoder.layers.mlp.linear_fc2.weight", (f"{_LAYER}.mlp.down_proj.weight",),
          linear=True, optional=True),
    Entry("decoder.layers.mlp.router.weight", ("{block}.{router}",), optional=True),
    # The router's expert_bias buffer (moe_router_enable_expert_bias, fp32 [E]) is added
    # to the sigmoid scores to choose the experts, as DeepSeek-V3's score-correction bias.
    Entry("decoder.layers.mlp.router.expert_bias", ("{block}.gate.e_score_correction_bias",),
          optional=True, model_types=("deepseek_v3",)),
    Entry("decoder.layers.mlp.experts.experts.linear_fc1.weight",
          ("{block}.experts.{expert}.{gate}", "{block}.experts.{expert}.{up}"), stacked=2,
          linear=True, optional=True),
    Entry("decoder.layers.mlp.experts.experts.linear_fc2.weight",
          ("{block}.experts.{expert}.{down}",), stacked=2, linear=True, optional=True),
    # DeepSeek-V3's shared experts are one gated MLP of n_shared_experts *
    # moe_intermediate_size rows (megatron-core's moe_shared_expert_intermediate_size);
    # Qwen2-MoE's shared_expert one of shared_expert_intermediate_size rows.
    Entry("decoder.layers.mlp.shared_experts.linear_fc1.weight",
          (f"{_SHARED}.gate_proj.weight", f"{_SHARED}.up_proj.weight"), linear=True,
          optional=True, model_types=_WITH_SHARED),
    Entry("decoder.layers.mlp.shared_experts.linear_fc2.weight", (f"{_SHARED}.down_proj.weight",),
          linear=True, optional=True, model_types=_WITH_SHARED),
    # Qwen2-MoE's shared_expert_gate ([1, H], no bias) scales the shared expert's output by
    # sigmoid(gate @ x), as megatron-core 0.16.1's SharedExpertMLP with
    # moe_shared_expert_gate does with its gate_weight parameter ([1, H], not a linear
    # layer: no _extra_state).
    Entry("decoder.layers.mlp.shared_experts.gate_weight", ("{block}.shared_expert_gate.weight",),
          optional=True, model_types=("qwen2_moe",)),
    Entry("decoder.final_layernorm.weight", ("model.norm.weight",), stacked=0),
    Entry("output_layer.weight", ("lm_head.weight",), stacked=0, optional=True),
)
"""Every tensor of a Megatron-Core GPT model that moekit writes, in megatron-core's order."""

MTP_LAYERS = "mtp.layers."
"""The prefix of the multi-token-prediction layers' keys (``Entry.in_mtp``)."""
MTP_DECODER = "transformer_layer."
"""Where an MTP layer's keys hold its decoder layer's, which are those of ``ENTRIES``."""
MTP_ENTRIES: tuple[Entry, ...] = (
    # DeepSeek-V3's MTP layer (deepseek-ai/DeepSeek-V3, layer 61) normalises the next
    # token's embedding (enorm) and the main model's hidden state (hnorm) and joins them
    # with eh_proj over cat(embedding, hidden state), as megatron-core 0.16.1's
    # MultiTokenPredictionLayer._concat_embeddings does; shared_head.norm is the norm
    # before the output layer, megatron-core's final_layernorm.
    Entry(f"{MTP_LAYERS}enorm.weight", (f"{_LAYER}.enorm.weight",)),
    Entry(f"{MTP_LAYERS}hnorm.weight", (f"{_LAYER}.hnorm.weight",)),
    Entry(f"{MTP_LAYERS}eh_proj.weight", (f"{_LAYER}.eh_proj.weight",), linear=True),
    Entry(f"{MTP_LAYERS}final_layernorm.weight", (f"{_LAYER}.shared_head.norm.weight",)),
)
"""The modules of a multi-token-prediction layer besides its decoder layer, one copy per
MTP layer (``in_mtp``)."""
MTP_COPIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("embed_tokens.weight", ("model.embed_tokens.weight",)),
    ("shared_head.head.weight", ("lm_head.weight", "model.embed_tokens.weight")),
)
"""The tensors of DeepSeek-V3's MTP layer (under ``model.layers.{layer}.``) that
megatron-core 0.16.1's MTP block has no place for: it embeds with the main model's
embedding and scores with its output layer (``GPTModel._postprocess`` passes
``self.embedding`` to the block and applies ``self.output_layer`` to its hidden states),
and each is that tensor (the first of the names the source holds: the embedding where
the output layer is tied to it). DeepSeek's files hold copies of the main ones."""
MTP_NOTE = ("multi-token-prediction block (megatron-core 0.16.1) uses the main model's "
            "embedding and output layer")
"""Why an MTP layer's own embedding and output head are written only as the main ones."""

_BY_KEY: dict[str, Entry] = {entry.key: entry for entry in (*ENTRIES, *MTP_ENTRIES)}
"""The entries by key (the two attentions' ``q_layernorm`` entries share one, and agree on
all but their HF parts)."""
_LAYER_KEY = re.compile(rf"{re.escape(LAYERS)}(\d+)\.(.*)", re.DOTALL)
_MTP_KEY = re.compile(rf"{re.escape(MTP_LAYERS)}(\d+)\.(.*)", re.DOTALL)


def entry_of(key: str) -> Entry | None:
    """The entry of a stored key (``decoder.layers.{layer}.…`` that of one layer,
    ``mtp.layers.{depth}.…`` that of an MTP layer), or None."""
    found = _LAYER_KEY.fullmatch(key)
    if found is not None:
        entry = _BY_KEY.get(LAYERS + found.group(2))
        return entry.at_layer(int(found.group(1))) if entry is not None and entry.stacked else None
    found = _MTP_KEY.fullmatch(key)
    if found is None:
        return _BY_KEY.get(key)
    rest = found.group(2)
    entry = _BY_KEY.get(LAYERS + rest[len(MTP_DECODER):] if rest.startswith(MTP_DECODER)
                        else MTP_LAYERS + rest)
    return entry.in_mtp(int(found.group(1))) if entry is not None and entry.stacked else None


def mtp_depth(key: str) -> int | None:
    """The MTP layer a stored key belongs to (``mtp.layers.{depth}.…``), or None."""
    found = _MTP_KEY.fullmatch(key)
    return None if found is None else int(found.group(1))


def is_per_layer(key: str) -> bool:
    """Whether a stored key is one layer's (``decoder.layers.{layer}.…``)."""
    return _LAYER_KEY.fullmatch(key) is not None


@dataclass(frozen=True)
class Dimensions:
    """The sizes that place tensors in Megatron-Core's: layers, routed experts (0 for a
    dense model), the attention heads (``linear_qkv``'s groups), whether the attention
    is multi-latent, the model type (``Entry.model_types``) and the multi-token-prediction
    layers the config declares after the decoder layers (``num_nextn_predict_layers``)."""

    layers: int
    experts: int
    heads: int
    groups: int
    head_dim: int
    model_type: str
    mla: bool = False
    mtp: int = 0

    @classmethod
    def of(cls, config: Mapping | None, experts: int, source: str) -> "Dimensions":
        """The sizes ``config`` (a config.json) gives; MoekitError naming the entry that
        is missing or not a positive integer."""
        if not isinstance(config, Mapping):
            raise MoekitError("Megatron-Core's layout needs the model's config.json (it "
                              "stacks the layers and joins the attention heads by query "
                              f"group): {source} has none ({NAME_A_CONFIG})")
        model_type = config.get("model_type")
        if model_type not in FAMILIES:
            raise MoekitError(f"{source}: moekit writes and reads Megatron-Core checkpoints of "
                              f"{', '.join(FAMILIES)}, not model_type {model_type!r}")
        mla = model_type in MLA_FAMILIES
        if mla and config.get("rope_interleave", True) is not True:
            raise MoekitError(f"{source}: config.json's rope_interleave is "
                              f"{config.get('rope_interleave')!r}; megatron-core 0.16's "
                              "multi-latent attention applies RoPE to interleaved rope "
                              "dimensions only (transformers' rope_interleave true)")
        heads = _positive(config, "num_attention_heads", source)
        groups = _positive(config, "num_key_value_heads", source, heads)
        hidden = _positive(config, "hidden_size", source)
        head_dim = _positive(config, "head_dim", source, hidden // heads)
        if heads % groups:
            raise MoekitError(f"{source}: num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {groups}")
        mtp = config.get("num_nextn_predict_layers") or 0
        if isinstance(mtp, bool) or not isinstance(mtp, int) or mtp < 0:
            raise MoekitError(f"{source}: config.json's num_nextn_predict_layers is {mtp!r}, "
                              "where Megatron-Core's layout needs a count of layers")
        layers = _positive(config, "num_hidden_layers", source)
        for key, count in (("num_hidden_layers", layers), ("num_nextn_predict_layers", mtp)):
            if count > MAX_LAYERS:
                raise MoekitError(f"{source}: config.json's {key} is {count}; "
                                  f"{TOO_MANY_LAYERS}")
        return cls(layers, experts, heads, groups, head_dim, model_type, mla, mtp)

    def entries(self, per_layer: bool, spec: str = "local",
                moe_layers: Collection[int] = ()) -> list[Entry]:
        """The entries of this model's attention and model type, each layer's under its own
        key where ``per_layer`` (``Entry.at_layer``), as layer spec ``spec`` names them
        (``Entry.named``): the MoE layers are then ``moe_layers``, and where the layers are
        stacked, all of them if the model has routed experts."""
        kind = "mla" if self.mla else "gqa"
        found = []
        for entry in ENTRIES:
            if entry.attention in ("", kind) and self.model_type in (entry.model_types
                                                                     or (self.model_type,)):
                copies = ([entry.at_layer(layer) for layer in range(self.layers)]
                          if per_layer and entry.stacked else [entry])
                found += [copy.named(spec, self.experts > 0 if copy.layer is None
                                     else copy.layer in moe_layers) for copy in copies]
        return found

    def mtp_entries(self, depth: int, spec: str = "local") -> list[Entry]:
        """The entries of multi-token-prediction layer ``depth``: its own modules
        (``MTP_ENTRIES``, alike in both layer specs: TENorm and TEColumnParallelLinear in
        the TE one) and its decoder layer's, those of this model's attention and model type
        as layer spec ``spec`` names them (``in_mtp``)."""
        return [entry.in_mtp(depth)
                for entry in (*MTP_ENTRIES, *self.entries(per_layer=False, spec=spec))
                if entry.stacked]

    def mtp_layer(self, depth: int) -> int:
        """The HF layer index of multi-token-prediction layer ``depth``: the layers after
        the decoder's ``num_hidden_layers``."""
        return self.layers + depth

    def indices(self, entry: Entry) -> Iterator[tuple[int, ...]]:
        """(layer, expert) of every copy of ``entry``'s tensor, in stored order."""
        if entry.stacked == 0:
            yield ()
            return
        if entry.depth is not None:
            layers: Iterable[int] = (self.mtp_layer(entry.depth),)
        else:
            layers = range(self.layers) if entry.layer is None else (entry.layer,)
        for layer in layers:
            if entry.stacked == 1:
                yield (layer,)
            for expert in range(self.experts if entry.stacked == 2 else 0):
                yield (layer, expert)

    def stacked_shape(self, entry: Entry) -> tuple[int, ...]:
        """The leading axes of ``entry``'s stored tensor: (), (layers,), (experts,) or
        (layers, experts)."""
        return (self.layers, self.experts)[:entry.stacked][entry.stacked - entry.axes:]

    def qkv_rows(self) -> tuple[int, int, int]:
        """Rows of one query group's q, k and v heads in ``linear_qkv``."""
        return self.heads // self.groups * self.head_dim, self.head_dim, self.head_dim


def _positive(config: Mapping, key: str, source: str, default: int | None = None) -> int:
    """``config[key]`` (``default`` where it is absent or null), refused naming the key
    unless it is a positive integer."""
    value = config.get(key, default)
    if value is None and default is not None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MoekitError(f"{source}: config.json's {key} is {value!r}, where Megatron-Core's "
                          "layout needs a positive integer")
    return value


class MegatronLayout(PerExpertLayout):
    """Megatron-Core's ``torch_dist`` checkpoint of a GPT model (see the module)."""

    name = "megatron"
    description = (
        "Megatron-Core 0.16's torch_dist checkpoint (iter_0000000/ and "
        "latest_checkpointed_iteration.txt), the whole model under GPTModel's sharded keys: "
        "layers stacked, experts decoder.layers.mlp.experts.experts.linear_fc1 [L,E,2I,H] "
        "(gate then up) and linear_fc2 [L,E,H,I], QKV interleaved by query group "
        "(DeepSeek-V3: multi-latent attention; dense and MoE layers each under its own "
        "decoder.layers.N key; multi-token-prediction layers under mtp.layers.N), as the "
        "local layer spec names it (the Transformer Engine spec's names are read too); "
        f"model types: {', '.join(FAMILIES)}")
    default_format = "megatron"
    found_by_keys = False
    quantized_note = "moekit writes Megatron-Core checkpoints of bf16, fp16 or fp32 weights"

    def holds(self, piece: str, family: Family) -> bool:
        return piece in PROJECTIONS

    def names_family(self, family: Family) -> bool:
        """True when ``family``'s model type is one of ``FAMILIES``, or the family is a
        generic one (dense Llama, Mistral, Qwen2 and Qwen3 checkpoints have no family of
        their own): a family's checkpoints are those whose config.json names one of its
        model types (``detect``), and ``Dimensions.of`` refuses the model type of a
        generic family's config unless it is one of ``FAMILIES``."""
        return not family.model_types or any(t in FAMILIES for t in family.model_types)

    def unnamed(self, family: Family) -> str:
        return (f"the {self.name} layout has no names for the {family.name} family: moekit "
                f"writes and reads Megatron-Core checkpoints of {', '.join(FAMILIES)}, not "
                f"model_type {' or '.join(map(repr, family.model_types))}")

    def whole_model(self, plan: Plan, config: Mapping | None, family: Family,
                    source: str) -> Plan:
        """``plan`` (HF names) as Megatron-Core stores it: each tensor a chunk of one of
        ``ENTRIES`` (each layer's under its own key where some layers are dense and others
        MoE), refused naming a tensor that no entry holds or an entry that some layer
        lacks."""
        dims = Dimensions.of(config, max(plan.moe_layers.values(), default=0), source)
        made = {t.name: t.recipe for t in plan.tensors}
        depths = [depth for depth in range(dims.mtp)
                  if any(key.startswith(f"model.layers.{dims.mtp_layer(depth)}.") for key in made)]
        check_mtp_depths(depths, dims, source)
        for depth in depths:
            check_mtp_layer(made, dims, depth, source)
            _fold_copies(made, dims.mtp_layer(depth), source)
        moe = [layer for layer in plan.moe_layers if layer < dims.layers]
        tensors: list[TensorPlan] = []
        experts: set[str] = set()
        for entry in [*dims.entries(per_layer=0 < len(moe) < dims.layers),
                      *(entry for depth in depths for entry in dims.mtp_entries(depth))]:
            chunks = _chunks(entry, dims, made, family, source)
            tensors += chunks
            if entry.stacked == 2:
                experts.update(t.name for t in chunks)
        if made:
            left = sorted(made)
            raise MoekitError(f"{source}: {left[0]}" + (f" and {len(left) - 1} more tensors"
                              if len(left) > 1 else "")
                              + " have no place in Megatron-Core's GPT model; moekit refuses "
                                "to drop them")
        return Plan(plan.family, plan.src_layout, self.name, tensors, plan.moe_layers, experts)


def check_mtp_depths(depths: Collection[int], dims: Dimensions, source: str) -> None:
    """Refuse multi-token-prediction layers that are not the first ones: megatron-core
    0.16.1's ``MultiTokenPredictionBlock`` numbers its layers from 0 and feeds each the
    hidden states of the one before, so none of its models loads layer ``d`` without the
    layers before it."""
    missing = [depth for depth in range(max(depths, default=-1)) if depth not in depths]
    if missing:
        last = max(depths)
        raise MoekitError(f"{source} holds multi-token-prediction layer {last} (HF layer "
                          f"{dims.mtp_layer(last)}) but not layer {missing[0]} (HF layer "
                          f"{dims.mtp_layer(missing[0])}); megatron-core's multi-token-"
                          "prediction block chains its layers from the first")


def check_mtp_layer(names: Collection[str], dims: Dimensions, depth: int, source: str) -> None:
    """Refuse multi-token-prediction layer ``depth`` unless its decoder layer holds the
    tensors the last decoder layer holds (HF names within a layer, the MTP layer's own
    modules and ``MTP_COPIES`` aside): megatron-core 0.16.1 builds it with the last decoder
    layer's spec (``get_gpt_mtp_block_spec``), so its model has no place for a module only
    one of them holds, nor a value for one only the other holds."""
    last = (f"model.layers.{dims.layers - 1}", "the last decoder layer")
    mtp = (f"model.layers.{dims.mtp_layer(depth)}", f"multi-token-prediction layer {depth}")
    own = {part.removeprefix(f"{_LAYER}.") for entry in MTP_ENTRIES for part in entry.parts}
    own.update(copy for copy, _ in MTP_COPIES)
    held = {name[len(last[0]) + 1:] for name in names if name.startswith(f"{last[0]}.")}
    ours = {name[len(mtp[0]) + 1:] for name in names if name.startswith(f"{mtp[0]}.")} - own
    for (having, what), (lacking, other), missing in ((last, mtp, held - ours),
                                                      (mtp, last, ours - held)):
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise MoekitError(f"{source}: {having} ({what}) holds {min(missing)}{more}, which "
                              f"{lacking} ({other}) lacks; megatron-core 0.16.1 builds the "
                              "multi-token-prediction layer with the last decoder layer's "
                              "modules")


def _fold_copies(made: dict[str, Expr], layer: int, source: str) -> None:
    """Take the copies of MTP layer ``layer`` (``MTP_COPIES``) out of ``made``, each then
    checked to equal its main tensor as that one is written (``RequireEqual``); refused at
    once naming both where their shapes or dtypes differ."""
    for copy, mains in MTP_COPIES:
        name = f"model.layers.{layer}.{copy}"
        main = next((key for key in mains if key in made), None)
        if name not in made or main is None:
            continue
        kept, dropped = made[main], made.pop(name)
        if (kept.shape, kept.dtype) != (dropped.shape, dropped.dtype):
            raise MoekitError(f"{source}: {name} is {list(dropped.shape)} {dropped.dtype}, "
                              f"{main} {list(kept.shape)} {kept.dtype}; Megatron-Core's "
                              f"{MTP_NOTE}, so moekit writes {name} only where it is a copy "
                              f"of {main}")
        if kept != dropped:
            made[main] = RequireEqual(kept, dropped, (main, name), f"Megatron-Core's {MTP_NOTE}")


def chunk_name(key: str, offsets: tuple[int, ...], whole: tuple[int, ...]) -> str:
    """A chunk's name, as megatron-core names a sharded object: ``key/shard_{offsets}_{shape}``."""
    return f"{key}/shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, whole))}"


def _chunks(entry: Entry, dims: Dimensions, made: dict[str, Expr], family: Family,
            source: str) -> list[TensorPlan]:
    """The chunks of ``entry``'s stored tensor, taking their HF tensors out of ``made``."""
    found: list[tuple[tuple[int, ...], list[Expr]]] = []
    lacking: list[str] = []
    for index in dims.indices(entry):
        keys = entry.hf_keys(family, index)
        if all(key in made for key in keys):
            found.append((index, [made.pop(key) for key in keys]))
        else:
            lacking += [key for key in keys if key not in made]
    if not found:
        if entry.optional or not lacking:
            return []
        raise MoekitError(f"{source} has no {lacking[0]}, which Megatron-Core's "
                          f"{entry.key} holds")
    if lacking:
        raise MoekitError(f"{source} has no {lacking[0]}, which Megatron-Core's {entry.key} "
                          "holds for every layer")
    joined = [(index, _joined(entry, parts, dims, source)) for index, parts in found]
    first = joined[0][1]
    whole = (*dims.stacked_shape(entry), sum(p.shape[0] for p in first), *first[0].shape[1:])
    tensors = []
    for index, parts in joined:
        row = 0
        for part in parts:
            if part.shape[1:] != first[0].shape[1:] or part.dtype != first[0].dtype:
                raise MoekitError(f"{source}: layer {index[0]}'s part of {entry.key} is "
                                  f"{list(part.shape)} {part.dtype}, layer 0's "
                                  f"{list(first[0].shape)} {first[0].dtype}")
            offsets = (*entry.stored_index(index), row, *[0] * (len(part.shape) - 1))
            row += part.shape[0]
            if not entry.stacked:
                tensors.append(TensorPlan(entry.key, part))
                continue
            shape = (*[1] * entry.axes, *part.shape)
            tensors.append(TensorPlan(chunk_name(entry.key, offsets, whole),
                                      Reshape(part, shape) if entry.axes else part,
                                      Chunk(entry.key, offsets, whole)))
    return tensors


def _joined(entry: Entry, parts: list[Expr], dims: Dimensions, source: str) -> list[Expr]:
    """The parts as stored chunks along the first axis: each part, or q, k and v
    interleaved by query group as one."""
    if not entry.qkv:
        return parts
    rows = dims.qkv_rows()
    for part, per_group, name in zip(parts, rows, "qkv"):
        if part.shape[0] != dims.groups * per_group:
            raise MoekitError(f"{source}: the {name} projection has {part.shape[0]} rows where "
                              f"config.json's heads give {dims.groups} groups of {per_group}")
    grouped = tuple(Reshape(part, (dims.groups, per_group, *part.shape[1:]))
                    for part, per_group in zip(parts, rows))
    rest = parts[0].shape[1:]
    return [Reshape(Concat(grouped, dim=1), (dims.groups * sum(rows), *rest))]


MEGATRON = MegatronLayout()
