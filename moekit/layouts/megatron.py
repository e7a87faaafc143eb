"""Megatron-Core's layout: a whole model under the keys of megatron-core 0.16.1's
``GPTModel.sharded_state_dict()``, stored as a ``torch_dist`` checkpoint
(``moekit.megatron_io`` writes and reads the folder).

What megatron-core 0.16.1 saves (``dist_checkpointing.save``, local and Transformer
Engine layer specs alike, checked on a saved model):

- The decoder's layers are stacked: ``decoder.layers.X`` has shape ``[L, ...]`` and one
  chunk a layer (``TransformerLayer`` prepends the layer axis to each module's sharded
  offsets). An expert's tensors are stacked over layers then experts,
  ``decoder.layers.mlp.experts.experts.linear_fc{1,2}.weight`` ``[L, E, ...]`` with
  global expert indices, one chunk an expert (``SequentialMLP``; an expert-parallel rank
  saves its own experts' chunks, so the stored tensor is the same at any EP size).
- ``linear_fc1`` of a gated MLP (dense or expert) is ``cat(gate, up)`` along its rows,
  saved as two chunks, the gate half then the up half (``apply_swiglu_sharded_factory``).
- ``linear_qkv`` holds, for each of the ``num_query_groups`` groups in turn, that
  group's query heads, then its key head, then its value head (``[G*(Q/G+2)*D, H]``);
  its bias, where the model has one, likewise.
- The norms are stored under the layer-spec-independent keys
  ``self_attention.linear_qkv.layer_norm_weight`` (input norm) and
  ``mlp.linear_fc1.layer_norm_weight`` (pre-MLP norm); Qwen3's per-head norms are
  ``self_attention.{q,k}_layernorm.weight``.
- Every linear layer (``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2``,
  dense or expert; not the output layer nor the router) has an ``_extra_state`` object
  per layer (and expert): ``{module}._extra_state/shard_{offsets}_{shape}`` over the
  stacked axes, ``torch.save([None])`` for a local-spec layer, whose
  ``get_extra_state`` returns None. A strict load requires each.
- ``common.pt`` holds ``{}`` for a model's sharded state dict, ``metadata.json`` names
  the ``torch_dist`` backend.

At plan level the layout names tensors as Hugging Face does (it is the per-expert HF
layout); ``whole_model`` then places every tensor in Megatron's stored tensors as
chunks (``TensorPlan.chunk``), joining the QKV projections with plan nodes; reading
inverts each entry of ``ENTRIES``. A model mixing dense and MoE layers, shared experts,
an attention output bias (Qwen3's ``attention_bias``: megatron-core's ``add_bias_linear``
gives every linear layer a bias, its ``add_qkv_bias`` only QKV one), and families not
named in ``FAMILIES`` (DeepSeek-V3's MLA attention among them) are refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ..errors import MoekitError
from ..plan import Chunk, Concat, Expr, Plan, Reshape, TensorPlan
from .families import PROJECTIONS, Family
from .hf import PerExpertLayout

FAMILIES = ("qwen3_moe", "mixtral", "llama", "mistral", "qwen2", "qwen3")
"""The ``model_type`` values moekit writes in Megatron-Core's layout: Llama-style
attention (grouped query heads, optional QKV biases and Qwen3's per-head norms), RMSNorm,
a gated MLP or routed experts in every layer, no shared expert."""

UNWRITTEN = {
    "deepseek_v3": "its multi-latent attention and shared experts are megatron-core's "
                   "MLASelfAttention and shared_experts modules, which moekit does not write",
    "qwen2_moe": "its shared expert and shared-expert gate are megatron-core's "
                 "shared_experts module, which moekit does not write",
}
"""Why some MoE model types are refused."""


@dataclass(frozen=True)
class Entry:
    """One stored Megatron-Core tensor and the Hugging Face tensors it holds.

    ``parts`` are HF key templates: ``{layer}``, ``{expert}``, and the family's MoE
    ``{block}``, ``{router}`` and projection names ``{gate}``, ``{up}``, ``{down}``
    (``gate_proj.weight``)."""

    key: str
    parts: tuple[str, ...]
    stacked: int = 1
    """Leading axes stacking copies of the tensor: 0 (one for the model), 1 (layers),
    2 (layers, then experts)."""
    qkv: bool = False
    """The parts are q, k and v, interleaved by query group; otherwise each part is its
    own chunk along the first axis after the stacked ones, in order."""
    linear: bool = False
    """The module is a Megatron-Core linear layer, which saves an ``_extra_state``."""
    optional: bool = False
    """Written only where the source has it (biases, an untied output layer, Qwen3's
    head norms, the MLP of a dense or an MoE model)."""

    def hf_keys(self, family: Family, index: tuple[int, ...]) -> list[str]:
        """The HF keys of the parts at ``index`` (layer, expert)."""
        fields = dict(zip(("layer", "expert"), index))
        block = family.block.format(layer=fields.get("layer", 0))
        names = {p: family.piece_key(p) for p in family.projections}
        return [part.format(**fields, block=block, router=family.router, **names)
                for part in self.parts]

    def extra_state(self, chunk: Chunk) -> str | None:
        """The ``_extra_state`` object saved with the chunk of a linear layer's weight."""
        if not (self.linear and self.key.endswith(".weight")):
            return None
        axes = chunk.offsets[:self.stacked], chunk.whole[:self.stacked]
        module = self.key[:-len(".weight")]
        return f"{module}._extra_state/shard_{'_'.join('.'.join(map(str, a)) for a in axes)}"


_LAYER = "model.layers.{layer}"
_ATTENTION = f"{_LAYER}.self_attn"
ENTRIES: tuple[Entry, ...] = (
    Entry("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), stacked=0),
    Entry("decoder.layers.self_attention.linear_qkv.layer_norm_weight",
          (f"{_LAYER}.input_layernorm.weight",)),
    Entry("decoder.layers.self_attention.linear_qkv.weight",
          tuple(f"{_ATTENTION}.{p}_proj.weight" for p in "qkv"), qkv=True, linear=True),
    Entry("decoder.layers.self_attention.linear_qkv.bias",
          tuple(f"{_ATTENTION}.{p}_proj.bias" for p in "qkv"), qkv=True, optional=True),
    Entry("decoder.layers.self_attention.q_layernorm.weight", (f"{_ATTENTION}.q_norm.weight",),
          optional=True),
    Entry("decoder.layers.self_attention.k_layernorm.weight", (f"{_ATTENTION}.k_norm.weight",),
          optional=True),
    Entry("decoder.layers.self_attention.linear_proj.weight", (f"{_ATTENTION}.o_proj.weight",),
          linear=True),
    Entry("decoder.layers.mlp.linear_fc1.layer_norm_weight",
          (f"{_LAYER}.post_attention_layernorm.weight",)),
    Entry("decoder.layers.mlp.linear_fc1.weight",
          (f"{_LAYER}.mlp.gate_proj.weight", f"{_LAYER}.mlp.up_proj.weight"), linear=True,
          optional=True),
    Entry("decoder.layers.mlp.linear_fc2.weight", (f"{_LAYER}.mlp.down_proj.weight",),
          linear=True, optional=True),
    Entry("decoder.layers.mlp.router.weight", ("{block}.{router}",), optional=True),
    Entry("decoder.layers.mlp.experts.experts.linear_fc1.weight",
          ("{block}.experts.{expert}.{gate}", "{block}.experts.{expert}.{up}"), stacked=2,
          linear=True, optional=True),
    Entry("decoder.layers.mlp.experts.experts.linear_fc2.weight",
          ("{block}.experts.{expert}.{down}",), stacked=2, linear=True, optional=True),
    Entry("decoder.final_layernorm.weight", ("model.norm.weight",), stacked=0),
    Entry("output_layer.weight", ("lm_head.weight",), stacked=0, optional=True),
)
"""Every tensor of a Megatron-Core GPT model that moekit writes, in megatron-core's order."""

BY_KEY: dict[str, Entry] = {entry.key: entry for entry in ENTRIES}


@dataclass(frozen=True)
class Dimensions:
    """The sizes that place tensors in Megatron-Core's: layers, routed experts (0 for a
    dense model) and the attention heads (``linear_qkv``'s groups)."""

    layers: int
    experts: int
    heads: int
    groups: int
    head_dim: int

    @classmethod
    def of(cls, config: Mapping | None, experts: int, source: str) -> "Dimensions":
        """The sizes ``config`` (a config.json) gives; MoekitError naming the entry that
        is missing or not a positive integer."""
        if not isinstance(config, Mapping):
            raise MoekitError("Megatron-Core's layout needs the model's config.json (it "
                              "stacks the layers and joins the attention heads by query "
                              f"group): {source} has none")
        model_type = config.get("model_type")
        if model_type not in FAMILIES:
            why = UNWRITTEN.get(model_type, "")
            raise MoekitError(f"{source}: moekit writes and reads Megatron-Core checkpoints of "
                              f"{', '.join(FAMILIES)}, not model_type {model_type!r}"
                              + (f" ({why})" if why else ""))
        heads = _positive(config, "num_attention_heads", source)
        groups = _positive(config, "num_key_value_heads", source, heads)
        hidden = _positive(config, "hidden_size", source)
        head_dim = _positive(config, "head_dim", source, hidden // heads)
        if heads % groups:
            raise MoekitError(f"{source}: num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {groups}")
        return cls(_positive(config, "num_hidden_layers", source), experts, heads, groups,
                   head_dim)

    def indices(self, entry: Entry) -> Iterator[tuple[int, ...]]:
        """(layer, expert) of every copy of ``entry``'s tensor, in stored order."""
        if entry.stacked == 0:
            yield ()
        for layer in range(self.layers if entry.stacked else 0):
            if entry.stacked == 1:
                yield (layer,)
            for expert in range(self.experts if entry.stacked == 2 else 0):
                yield (layer, expert)

    def stacked_shape(self, entry: Entry) -> tuple[int, ...]:
        """The leading axes of ``entry``'s stored tensor: (), (layers,) or (layers, experts)."""
        return (self.layers, self.experts)[:entry.stacked]

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
        "(gate then up) and linear_fc2 [L,E,H,I], QKV interleaved by query group; "
        f"model types: {', '.join(FAMILIES)}")
    default_format = "megatron"
    found_by_keys = False
    mtp_note = "moekit writes Megatron-Core's GPT decoder layers only"
    quantized_note = "moekit writes Megatron-Core checkpoints of bf16, fp16 or fp32 weights"

    def holds(self, piece: str, family: Family) -> bool:
        return piece in PROJECTIONS

    def whole_model(self, plan: Plan, config: Mapping | None, family: Family,
                    source: str) -> Plan:
        """``plan`` (HF names) as Megatron-Core stores it: each tensor a chunk of one of
        ``ENTRIES``, refused naming a tensor that no entry holds or an entry that some
        layer lacks."""
        dims = Dimensions.of(config, max(plan.moe_layers.values(), default=0), source)
        made = {t.name: t.recipe for t in plan.tensors}
        tensors: list[TensorPlan] = []
        for entry in ENTRIES:
            tensors += _chunks(entry, dims, made, family, source)
        if made:
            left = sorted(made)
            raise MoekitError(f"{source}: {left[0]}" + (f" and {len(left) - 1} more tensors"
                              if len(left) > 1 else "")
                              + " have no place in Megatron-Core's GPT model; moekit refuses "
                                "to drop them")
        experts = {t.name for t in tensors if t.chunk and BY_KEY[t.chunk.key].stacked == 2}
        return Plan(plan.family, plan.src_layout, self.name, tensors, plan.moe_layers, experts)


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
                          "holds for every layer: moekit writes Megatron-Core checkpoints "
                          "whose layers are all dense or all MoE")
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
            offsets = (*index, row, *[0] * (len(part.shape) - 1))
            row += part.shape[0]
            if not entry.stacked:
                tensors.append(TensorPlan(entry.key, part))
                continue
            shape = (*[1] * entry.stacked, *part.shape)
            tensors.append(TensorPlan(chunk_name(entry.key, offsets, whole),
                                      Reshape(part, shape), Chunk(entry.key, offsets, whole)))
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
