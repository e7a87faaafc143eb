"""The tensors a Hugging Face checkpoint of a config.json holds, computed without torch.

``moekit plan config.json`` needs the names, shapes and dtypes of a checkpoint it does
not have. For the families ``DECODERS`` describes they are computed here from the
config's sizes, in milliseconds, including what transformers does not build: FP8 block
quantisation (``quantization_config``: e4m3 weights and their ``weight_scale_inv``) and
DeepSeek-V3's multi-token-prediction layers. Other model types (or a config that leaves
a size to transformers' defaults) return None: the caller then asks transformers.

The shapes follow the modules of transformers 5.24 (``modeling_<family>.py``) and, for
what transformers does not build, the files of deepseek-ai/DeepSeek-V3 on the Hub.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import MoekitError
from .layouts import Family
from .layouts.families import FP8_SCALE_KEY, family_of_model_type
from .model_config import ConfigValues, MoeLayers, expert_count, fp8_block, shown


@dataclass(frozen=True)
class Header:
    """One tensor of the checkpoint: shape and safetensors dtype."""

    shape: tuple[int, ...]
    dtype: str


class _Unstated(Exception):
    """A size the config leaves to transformers' defaults."""


@dataclass(frozen=True)
class _Sizes:
    """The config's sizes, every one required (``_Unstated`` when absent)."""

    values: ConfigValues

    def __call__(self, key: str, minimum: int = 0) -> int:
        size = self.values.integer(key, minimum=minimum)
        if size is None:
            raise _Unstated(key)
        return size

    def flag(self, key: str, default: bool) -> bool:
        value = self.values.config.get(key, default)
        if not isinstance(value, bool):
            raise MoekitError(f"{self.values.source}: {key} is {shown(value)}; expected true "
                              "or false")
        return value

    @property
    def head_dim(self) -> int:
        """``head_dim``, or hidden size / heads where it is absent or null (transformers)."""
        if self.values.config.get("head_dim") is not None:
            return self("head_dim")
        return self("hidden_size") // self("num_attention_heads", minimum=1)


LINEAR, PLAIN, FLOAT32 = "linear", "plain", "float32"
"""How a tensor is stored: a linear weight (FP8 in a quantised checkpoint), in the model's
dtype, or always in float32 (DeepSeek-V3's score-correction bias, as transformers keeps
it and the Hub files hold it)."""
Entry = tuple[str, tuple[int, ...], str]
"""(key relative to a layer, shape, LINEAR, PLAIN or FLOAT32)."""


def _linear(name: str, out: int, inn: int, bias: bool = False) -> list[Entry]:
    return [(f"{name}.weight", (out, inn), LINEAR)] + ([(f"{name}.bias", (out,), PLAIN)]
                                                      if bias else [])


def _norm(name: str, size: int) -> list[Entry]:
    return [(f"{name}.weight", (size,), PLAIN)]


def _attention(bias_key: str = "attention_bias", bias_default: bool = False,
               o_bias: bool = True, qk_norm: str | None = None
               ) -> Callable[[_Sizes], list[Entry]]:
    """Grouped-query attention ``self_attn.{q,k,v,o}_proj``: biases where ``bias_key``
    says (on o_proj too unless ``o_bias`` is False), q/k norms over one head
    (``qk_norm="head"``, Qwen3) or over all heads (``"all"``, OLMoE)."""

    def entries(c: _Sizes) -> list[Entry]:
        h, heads, kv, d = (c("hidden_size"), c("num_attention_heads", minimum=1),
                           c("num_key_value_heads"), c.head_dim)
        bias = c.flag(bias_key, bias_default) if bias_key else False
        out = (_linear("self_attn.q_proj", heads * d, h, bias)
               + _linear("self_attn.k_proj", kv * d, h, bias)
               + _linear("self_attn.v_proj", kv * d, h, bias)
               + _linear("self_attn.o_proj", h, heads * d, bias and o_bias))
        if qk_norm == "head":
            out += _norm("self_attn.q_norm", d) + _norm("self_attn.k_norm", d)
        elif qk_norm == "all":
            out += (_norm("self_attn.q_norm", h)
                    + _norm("self_attn.k_norm", h // heads * kv))
        return out

    return entries


def _mla(c: _Sizes) -> list[Entry]:
    """DeepSeek-V3's multi-head latent attention (``DeepseekV3Attention``)."""
    h, heads, kv_rank = c("hidden_size"), c("num_attention_heads"), c("kv_lora_rank")
    nope, rope, v = c("qk_nope_head_dim"), c("qk_rope_head_dim"), c("v_head_dim")
    bias = c.flag("attention_bias", False)
    if c.values.config.get("q_lora_rank") is None:
        query = _linear("self_attn.q_proj", heads * (nope + rope), h)
    else:
        q_rank = c("q_lora_rank")
        query = (_linear("self_attn.q_a_proj", q_rank, h, bias)
                 + _norm("self_attn.q_a_layernorm", q_rank)
                 + _linear("self_attn.q_b_proj", heads * (nope + rope), q_rank))
    return (query + _linear("self_attn.kv_a_proj_with_mqa", kv_rank + rope, h, bias)
            + _norm("self_attn.kv_a_layernorm", kv_rank)
            + _linear("self_attn.kv_b_proj", heads * (nope + v), kv_rank)
            + _linear("self_attn.o_proj", h, heads * v, bias))


def _mlp(name: str, intermediate: int, hidden: int) -> list[Entry]:
    return (_linear(f"{name}.gate_proj", intermediate, hidden)
            + _linear(f"{name}.up_proj", intermediate, hidden)
            + _linear(f"{name}.down_proj", hidden, intermediate))


def _no_shared(c: _Sizes, name: str) -> list[Entry]:
    return []


def _qwen2_shared(c: _Sizes, name: str) -> list[Entry]:
    """Qwen2-MoE's shared expert ``name`` and its sigmoid gate ``{name}_gate`` (a [1, H]
    router, kept unquantised)."""
    return (_mlp(name, c("shared_expert_intermediate_size"), c("hidden_size"))
            + [(f"{name}_gate.weight", (1, c("hidden_size")), PLAIN)])


def _deepseek_shared(c: _Sizes, name: str) -> list[Entry]:
    """DeepSeek-V3's ``n_shared_experts`` shared experts, fused into one MLP ``name``."""
    return _mlp(name, c("moe_intermediate_size") * c("n_shared_experts"), c("hidden_size"))


def _deepseek_mtp(c: _Sizes) -> list[Entry]:
    """What a DeepSeek-V3 multi-token-prediction layer holds besides a decoder layer
    (deepseek-ai/DeepSeek-V3, layer 61): its own embedding and output head, two input
    norms and the projection joining them, all unquantised."""
    h, vocab = c("hidden_size"), c("vocab_size")
    return [("embed_tokens.weight", (vocab, h), PLAIN), ("enorm.weight", (h,), PLAIN),
            ("hnorm.weight", (h,), PLAIN), ("eh_proj.weight", (h, 2 * h), PLAIN),
            ("shared_head.norm.weight", (h,), PLAIN),
            ("shared_head.head.weight", (vocab, h), PLAIN)]


@dataclass(frozen=True)
class Decoder:
    """The non-expert tensors of one family's decoder layers."""

    architecture: str
    """The family's causal language model class, whose files these are (transformers
    5.24's ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``); the model of a config whose
    ``architectures`` names another class (a classification head instead of ``lm_head``)
    is described by transformers."""
    attention: Callable[[_Sizes], list[Entry]]
    shared: Callable[[_Sizes, str], list[Entry]] = _no_shared
    """The shared experts, given the module name the family table states for them."""
    dense_mlp: str = "mlp"
    """Module name of a dense layer's MLP."""
    score_bias: bool = False
    """The router module has an F32 ``e_score_correction_bias`` [E] (DeepSeek-V3)."""
    mtp: Callable[[_Sizes], list[Entry]] | None = None
    """The extra tensors of a multi-token-prediction layer (``num_nextn_predict_layers``
    of them after the decoder stack), for a family that has them."""
    expert_size: str = "moe_intermediate_size"
    """The config key of a routed expert's intermediate size (``intermediate_size`` where
    the family has no dense MLP of another size: Mixtral, OLMoE)."""


DECODERS: dict[str, Decoder] = {
    "qwen2_moe": Decoder("Qwen2MoeForCausalLM", _attention("qkv_bias", True, o_bias=False),
                         _qwen2_shared),
    "qwen3_moe": Decoder("Qwen3MoeForCausalLM", _attention(qk_norm="head")),
    "olmoe": Decoder("OlmoeForCausalLM", _attention(qk_norm="all"),
                     expert_size="intermediate_size"),
    "mixtral": Decoder("MixtralForCausalLM", _attention(bias_key=""),
                       expert_size="intermediate_size"),
    "deepseek_v3": Decoder("DeepseekV3ForCausalLM", _mla, _deepseek_shared, score_bias=True,
                           mtp=_deepseek_mtp),
}
"""model_type -> its decoder layers (transformers 5.24's modules)."""

MAX_EXPERT_SLOTS = 1 << 20
"""The most layers x routed experts described from a config (DeepSeek-V3 has 62 x 256):
a config declaring more is refused at once rather than described one expert at a time."""
LAYER_PREFIX = "model.layers.{layer}."
"""Where the families of ``DECODERS`` keep their layers (their MoE block inside it)."""
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
FP8_FORMATS = {"e4m3": "F8_E4M3", "e5m2": "F8_E5M2"}


def config_headers(config: dict, source: str, routed: int | None = None
                   ) -> dict[str, Header] | None:
    """Every tensor a Hugging Face checkpoint of ``config`` holds (names as on the Hub),
    or None when ``DECODERS`` does not describe its model type or the config leaves a
    size to transformers' defaults (MoekitError naming it for an FP8 config, which
    transformers' defaults cannot describe). The files are those of the family's causal
    language model (``Decoder.architecture``). ``routed`` lists only the first ``routed``
    routed experts of each layer (all their siblings have their shapes): what planning
    needs to size every expert, without describing tens of thousands of them."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in DECODERS:
        return None
    family, decoder = family_of_model_type(model_type), DECODERS[model_type]
    if (family is None or family.moe_layers is None
            or not family.block.startswith(LAYER_PREFIX)
            or (decoder.shared is not _no_shared and family.shared_expert is None)):
        return None
    values = ConfigValues(config, source)
    layers = family.moe_layers(values)
    if layers is None:
        return None
    dtypes = _weight_dtypes(values)
    try:
        return _headers(_Sizes(values), family, decoder, layers, dtypes, routed)
    except _Unstated as unstated:
        if dtypes.fp8 is None:
            return None
        raise MoekitError(f"{source}: {unstated} is not stated; moekit describes an FP8 "
                          "checkpoint from a config.json alone only from the sizes it states "
                          "(transformers' defaults know nothing of its quantised tensors): "
                          "plan from the checkpoint's files instead") from None


def _headers(c: _Sizes, family: Family, decoder: Decoder, layers: MoeLayers,
             dtypes: "_Dtypes", routed: int | None) -> dict[str, Header]:
    h, vocab = c("hidden_size"), c("vocab_size")
    counted = expert_count(c.values, family.expert_count_keys)
    if counted is None:
        raise _Unstated(family.expert_count_key)
    experts = counted[0]
    mtp = range(layers.count, layers.extra.stop) if decoder.mtp else range(0)
    declared = mtp.stop if mtp else layers.count  # len(mtp) overflows past 2**63
    if declared * experts > MAX_EXPERT_SLOTS:
        raise MoekitError(f"{c.values.source} declares {declared} layers of "
                          f"{experts} experts; moekit plans from a config.json alone for at "
                          f"most {MAX_EXPERT_SLOTS:,} layers x experts: plan from the "
                          "checkpoint's files instead")
    moe = decoder.attention(c) + _norm("input_layernorm", h) + _norm(
        "post_attention_layernorm", h) + _moe_block(c, family, decoder, experts, routed)
    dense = decoder.attention(c) + _norm("input_layernorm", h) + _norm(
        "post_attention_layernorm", h) + _mlp(decoder.dense_mlp, c("intermediate_size"), h)
    out = {"model.embed_tokens.weight": Header((vocab, h), dtypes.model)}
    for layer in (*range(layers.count), *mtp):
        prefix = f"model.layers.{layer}."
        for key, shape, kind in moe if layers.is_moe(layer) else dense:
            dtypes.add(out, prefix + key, shape, kind)
        if layer in mtp:
            for key, shape, kind in decoder.mtp(c):
                dtypes.add(out, prefix + key, shape, kind)
    out["model.norm.weight"] = Header((h,), dtypes.model)
    if not c.flag("tie_word_embeddings", False):
        out["lm_head.weight"] = Header((vocab, h), dtypes.model)
    return out


def _moe_block(c: _Sizes, family: Family, decoder: Decoder, experts: int,
               routed: int | None) -> list[Entry]:
    """The MoE block of a layer, relative to the layer: router, routed experts (keys from
    the family; the first ``routed`` of them when given), shared experts."""
    h, inter = c("hidden_size", minimum=1), c(decoder.expert_size, minimum=1)
    block = family.block[len(LAYER_PREFIX):]  # "mlp", "block_sparse_moe"
    out: list[Entry] = [(f"{block}.{family.router}", (experts, h), PLAIN)]
    if decoder.score_bias:
        router = family.router.rsplit(".", 1)[0]  # "gate.weight" -> "gate"
        out.append((f"{block}.{router}.e_score_correction_bias", (experts,), FLOAT32))
    shapes = {"gate": (inter, h), "up": (inter, h), "down": (h, inter)}
    for e in range(experts if routed is None else min(routed, experts)):
        out += [(f"{block}.experts.{e}.{family.piece_key(p)}", shapes[p], LINEAR)
                for p in family.projections]
    shared = decoder.shared(c, family.shared_expert or "")
    return out + [(f"{block}.{key}", shape, kind) for key, shape, kind in shared]


@dataclass(frozen=True)
class _Dtypes:
    """The dtypes a checkpoint stores: the model's, and for FP8 configs the quantised
    linear weights' (with their F32 block scales)."""

    model: str
    fp8: str | None
    block: tuple[int, int]
    skipped: tuple[str, ...]
    """``modules_to_not_convert``: modules whose weights stay unquantised."""

    def add(self, out: dict[str, Header], key: str, shape: tuple[int, ...], kind: str
            ) -> None:
        """Put tensor ``key`` into ``out``; a quantised weight with its scales."""
        if kind != LINEAR or self.fp8 is None or _kept(key.rsplit(".", 1)[0], self.skipped):
            out[key] = Header(shape, "F32" if kind == FLOAT32 else self.model)
            return
        out[key] = Header(shape, self.fp8)
        out[key + FP8_SCALE_KEY] = Header((math.ceil(shape[0] / self.block[0]),
                                           math.ceil(shape[1] / self.block[1])), "F32")


_MODULE_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def _kept(module: str, patterns: tuple[str, ...]) -> bool:
    """True when ``modules_to_not_convert`` keeps ``module`` unquantised, by the rule of
    transformers 5.24 (``should_convert_module``): a pattern matches from the start of
    the module name up to a module boundary, as a regex (``layers.*.mlp``), or as a suffix
    (``lm_head``), so ``model.layers.1`` is not ``model.layers.10``."""
    return any(re.match(f"(?:{p}){_MODULE_BOUNDARY}", module) or module.endswith(p)
               for p in patterns)


def _weight_dtypes(values: ConfigValues) -> _Dtypes:
    """The model dtype (``dtype`` or ``torch_dtype``, else bf16) and FP8 block
    quantisation from ``quantization_config``; another quantisation is refused (its
    tensors are not described here)."""
    name = values.config.get("dtype") or values.config.get("torch_dtype") or "bfloat16"
    if not isinstance(name, str) or name not in DTYPES:
        raise MoekitError(f"{values.source}: dtype {shown(name)} is not one of "
                          f"{', '.join(DTYPES)}")
    quantization = values.config.get("quantization_config")
    if quantization is None:
        return _Dtypes(DTYPES[name], None, (1, 1), ())
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    fmt = quantization.get("fmt", "e4m3") if isinstance(quantization, dict) else None
    if method != "fp8" or fmt not in FP8_FORMATS:
        raise MoekitError(f"{values.source}: quantization_config {shown(quantization)}: moekit "
                          "plans from a config.json alone for FP8 block quantisation "
                          "(quant_method fp8, fmt e4m3 or e5m2) only; plan from the "
                          "checkpoint's files instead")
    _check_fp8_tensors(quantization, values.source)
    skipped = quantization.get("modules_to_not_convert") or []
    if not isinstance(skipped, list) or not all(isinstance(m, str) for m in skipped):
        raise MoekitError(f"{values.source}: quantization_config.modules_to_not_convert is "
                          f"{shown(skipped)}; expected a list of module names")
    for pattern in skipped:
        try:
            re.compile(pattern)
        except re.error as err:
            raise MoekitError(f"{values.source}: quantization_config.modules_to_not_convert "
                              f"holds {shown(pattern)}, which transformers reads as a regular "
                              f"expression and is not one ({err})") from None
    return _Dtypes(DTYPES[name], FP8_FORMATS[fmt], fp8_block(values), tuple(skipped))


def _check_fp8_tensors(quantization: dict, source: str) -> None:
    """Refuse the FP8 settings under which transformers 5.24's ``FP8Linear`` holds tensors
    besides a weight and its block scales (``activation_scale`` for static activation
    scales, a scalar ``weight_scale_inv`` for ``weight_block_size`` null): the tensors
    described here would leave them out."""
    if quantization.get("activation_scheme", "dynamic") != "dynamic":
        raise MoekitError(f"{source}: quantization_config.activation_scheme is "
                          f"{shown(quantization['activation_scheme'])}; moekit plans from a "
                          "config.json alone for dynamic activation scales only (static ones "
                          "add an activation_scale beside each weight): plan from the "
                          "checkpoint's files instead")
    if "weight_block_size" in quantization and quantization["weight_block_size"] is None:
        raise MoekitError(f"{source}: quantization_config.weight_block_size is null (one scale "
                          "per weight); moekit plans from a config.json alone for block scales "
                          "only: plan from the checkpoint's files instead")
