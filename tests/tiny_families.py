"""Tiny seeded models of every MoE model type the installed transformers knows, found by
walking its auto mappings (not a hand list), for the per-family tests."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moekit import samples

EXPERT_COUNT_NAMES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
"""Config attributes (or ``attribute_map`` aliases) that declare routed experts."""

SMALL: dict[str, Any] = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    moe_intermediate_size=16, expert_ffn_hidden_size=16, shared_expert_intermediate_size=24,
    moe_shared_expert_intermediate_size=24, num_experts_per_tok=2, moe_topk=2, top_k=2,
    n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
    qk_nope_head_dim=4, v_head_dim=8, index_head_dim=8, index_n_heads=2,
    first_k_dense_replace=1, zero_expert_num=2, n_shared_experts=1, num_dense_layers=1,
    tie_word_embeddings=False, unpadded_vocab_size=96, linear_head_dim=8,
    **{name: 6 for name in EXPERT_COUNT_NAMES})
"""Sizes every tiny model takes where its config has the attribute: three layers, the
first dense where the config has a dense prefix, six experts of two chosen. A config with
multi-head latent attention (``kv_lora_rank``) takes ``head_dim`` = ``qk_rope_head_dim``
and as many key-value heads as query heads, as DeepSeek's configs derive them."""
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
"""Special token ids, moved into the tiny vocabulary where they lie beyond it."""
OVERRIDES: dict[str, dict[str, Any]] = {
    "doge": dict(is_moe=True, num_experts=16),
    "longcat_flash": dict(num_layers=2),
    "zaya": dict(num_experts_per_tok=1),
    "granitemoehybrid": dict(mamba_n_heads=8, mamba_d_head=8),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"]),
    "gemma4_text": dict(enable_moe_block=True, top_k_experts=2, vocab_size_per_layer_input=96,
                        hidden_size_per_layer_input=8),
    "dots3_note_text": dict(head_dim=8),
}
"""What a model type needs beyond ``SMALL`` to be built tiny with experts: Doge's experts
form a square grid of product keys and exist only with ``is_moe``; LongCat-Flash counts
its layers in ``num_layers``; ZAYA routes to one expert; GraniteMoE-Hybrid's Mamba heads
divide its expanded hidden size; LFM2-MoE has no default list of layer types; Gemma 4 has
experts only with ``enable_moe_block`` and a per-layer input embedding of its own sizes;
dots.3's sliding-window attention takes head_dim = qk_nope_head_dim + qk_rope_head_dim."""


def _declares(config_class: type, name: str) -> bool:
    params = inspect.signature(config_class.__init__).parameters
    annotated = {a for c in config_class.__mro__ for a in getattr(c, "__annotations__", {})}
    return name in params or name in annotated or name in getattr(config_class, "attribute_map", {})


def moe_causal_lm_types() -> list[str]:
    """Model types with a causal-LM class whose config declares routed experts."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t in CONFIG_MAPPING
                  and any(_declares(CONFIG_MAPPING[t], n) for n in EXPERT_COUNT_NAMES))


def _mlp_layer_types(default: list[str], count: int) -> list[str]:
    """A per-layer MLP kind list of ``count`` layers: the default's first kind, then a
    sparse kind from the default list (its last), so that the model has MoE layers."""
    return [default[0]] + [default[-1]] * (count - 1)


def _uniform(config) -> dict[str, dict]:
    """``{"per_layer_config": {}}`` for a config with per-layer overrides, whose global
    values it then lets be read; else nothing."""
    if not config.to_dict().get("per_layer_config"):
        return {}
    config.allow_global_per_layer_attribute_access = True
    return {"per_layer_config": {}}


def tiny_config(model_type: str, **overrides: Any):
    """``model_type``'s config with the ``SMALL`` sizes it has. A config with per-layer
    overrides (Gemma 4's head_dim, dots.3's attention sizes) is built without them, so
    that the tiny sizes hold for every layer (and its global values can be read)."""
    config_class = samples.config_class(model_type)
    default = config_class()
    uniform = _uniform(default)
    settings = {**uniform, **{k: v for k, v in SMALL.items()
                if hasattr(default, k) and not isinstance(getattr(default, k), list)}}
    settings.update({name: token for token, name in enumerate(TOKEN_IDS)
                     if isinstance(getattr(default, name, None), int)
                     and getattr(default, name) >= SMALL["vocab_size"]})
    if hasattr(default, "kv_lora_rank"):
        settings.update(head_dim=SMALL["qk_rope_head_dim"],
                        num_key_value_heads=SMALL["num_attention_heads"])
    if isinstance(getattr(default, "mlp_layer_types", None), list):
        settings["mlp_layer_types"] = _mlp_layer_types(default.mlp_layer_types,
                                                       SMALL["num_hidden_layers"])
    return config_class(**{**settings, **OVERRIDES.get(model_type, {}), **overrides})


def build(model_type: str, seed: int = 0, **overrides: Any):
    """A tiny causal LM of ``model_type``, float32, every parameter drawn from N(0, 0.2)
    so that a misplaced tensor changes the logits."""
    return samples.from_config(tiny_config(model_type, **overrides), seed)


MULTIMODAL = ("llama4", "qwen3_vl_moe", "glm4v_moe", "ernie4_5_vl_moe", "qwen3_omni_moe",
              "aria", "qwen3_5_moe", "qwen4_exp", "minimax_m3_vl", "mistral_large4", "gemma4",
              "inkling2", "inkling2_loop", "hy_v4_vl", "step3p7", "kimi_k25", "deepseek_ocr2",
              "unlimited_ocr", "inkling_mm_model", "nemotron_h_omni", "nemo_speechlm")
"""Multimodal model types whose text model has routed experts that moekit has a family for."""


def multimodal_moe_types() -> list[str]:
    """Model types whose config nests a text model (``text_config``, or a ``thinker_config``
    holding one) that declares routed experts."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    found = []
    for model_type, config_class in CONFIG_MAPPING.items():
        if not {"text_config", "thinker_config"} & set(getattr(config_class, "sub_configs", {})):
            continue
        try:
            config = config_class()
        except Exception:  # a config that needs arguments: not one save_pretrained writes alone
            continue
        thinker = getattr(config, "thinker_config", None)
        text = getattr(thinker if thinker is not None else config, "text_config", None)
        if text is not None and any(_declares(type(text), n) for n in EXPERT_COUNT_NAMES):
            found.append(model_type)
    return sorted(found)
TEXT_OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen3_vl_moe": dict(moe_intermediate_size=8),
    "ernie4_5_vl_moe": dict(moe_intermediate_size=[16, 8], rope_parameters=dict(
        rope_type="default", rope_theta=500000.0, mrope_section=[1, 1, 2])),
    "hy_v4_vl": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                          mrope_section=[0, 1, 1])),
    "glm5_next": dict(qk_rope_head_dim=0),
    "muse_spark": dict(moe_hidden_size=32),
    "deepseek_ocr2": dict(mlp_layer_types=["dense", "sparse", "sparse"])}
"""What a multimodal model type's text model takes beyond ``build``'s: Qwen3-VL-MoE's
gate+up not square (2I != H), so that the Hub's orientation of it differs in shape from
save_pretrained's (transformers reads a square one as its own); ERNIE-4.5-VL's text and
vision expert sizes, and rotary sections that fit its four rotary frequencies; HY-V4-VL's
rotary sections that fit its two; GLM-5-Next's DSA layers without rotary dimensions; Muse
Spark's experts at the tiny hidden size; DeepSeek-OCR-2's list of dense and sparse layers,
which its config has no default for."""
MAX_PARAMETERS = 5_000_000
"""The most parameters a tiny multimodal model is built with: one whose towers keep sizes
the tiny settings do not reach (hundreds of millions of parameters) is not built."""
SMALL_VISION: dict[str, Any] = dict(
    hidden_size=32, num_hidden_layers=1, depth=1, num_attention_heads=2, num_heads=2,
    intermediate_size=64, out_hidden_size=32, projector_input_dim=32, projector_output_dim=32,
    vision_output_dim=32, patch_size=4, image_size=16, deepstack_visual_indexes=[],
    text_hidden_size=32, adapter_in_dim=32, adapter_out_dim=32, max_image_size=16,
    mlp_dim=64, output_channels=16, downsample_channels=[16, 32], max_img_size=16)
"""Sizes of a tiny vision tower, where its config has the attribute (Inkling 2's and dots.3's
checked against the text model's hidden size; DeepSeek-OCR-2's SAM encoder's MLP, neck and
downsampling channels, which its config does not derive from its hidden size; RADIO's
largest image, which sizes its position embeddings)."""


MULTIMODAL_OVERRIDES: dict[str, dict[str, Any]] = {
    "muse_spark": dict(out_hidden_size=32, projector_hidden_size=32),
    "nemotron_h_omni": dict(projector_hidden_size=32, vision_hidden_size=32),
    "nemo_speechlm": dict(word_timestamp_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=16, blank_token_id=15)),
    "kimi_k25": dict(projection_hidden_size=32, tie_word_embeddings=False),
    "gemma4": dict(tie_word_embeddings=False,
                   vision_config=dict(model_type="gemma4_vision", num_key_value_heads=2,
                                      head_dim=16, position_embedding_size=64))}
"""What a multimodal model type's config takes beyond its towers' tiny sizes: Muse Spark's
projector at the tiny hidden size; Nemotron-H-Omni's projector, and its record of the
vision tower's width, at the tiny sizes; Kimi-K2.5's projector norm at the tiny vision tower's
width, its head untied as the Hub's (``language_model.lm_head``); Gemma 4's default has no
vision tower (given here with the sizes ``SMALL_VISION`` does not set) and ties its head to
the embeddings, a head save_pretrained leaves out of the files."""


SMALL_AUDIO: dict[str, Any] = dict(
    d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=32,
    num_hidden_layers=1, downsample_hidden_size=8, adapter_out_dim=32, out_hidden_size=32,
    hidden_size=32, intermediate_size=64, num_attention_heads=2, adapter_input_size=32,
    conv_output_size=32, audio_hidden_size=32, num_key_value_heads=2)
"""Sizes of a tiny audio tower (Qwen3-Omni's thinker), where its config has the attribute
(dots.3's and Muse Spark's output width checked against the text model's hidden size;
Nemotron-3.5-Transcribe's diarization head checked against its audio encoder's width, and
its encoders' attention with as many key-value heads as query heads, as the files' joined
w_qkv, which transformers splits in three equal parts, requires)."""


def build_multimodal(model_type: str, seed: int = 0, **text: Any):
    """A tiny multimodal model of ``model_type``: its text model as ``build`` makes it (with
    ``TEXT_OVERRIDES`` and ``text``), its vision (and audio) towers one small layer, and
    ``MULTIMODAL_OVERRIDES``; every parameter drawn from N(0, 0.2).
    Qwen3-Omni's towers and text model sit in its ``thinker_config``; it is built without
    its talker (``enable_audio_output`` false). The model is transformers' image-text-to-text
    class, else its multimodal LM class (Nemotron-3.5-Transcribe, audio only)."""
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES)

    overrides = MULTIMODAL_OVERRIDES.get(model_type, {})
    config_class = samples.config_class(model_type)
    default = config_class(**overrides)
    omni = hasattr(default, "thinker_config")
    inner = _tiny_towers(default.thinker_config if omni else default,
                         {**TEXT_OVERRIDES.get(model_type, {}), **text})
    if omni:
        config = config_class(enable_audio_output=False,
                              thinker_config={**default.thinker_config.to_dict(), **inner})
        make = transformers.Qwen3OmniMoeForConditionalGeneration._from_config
    else:
        config = config_class(**{**overrides, **inner})
        name = (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
                or MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES[model_type])
        make = getattr(transformers, name)._from_config
    with torch.device("meta"):
        count = sum(p.numel() for p in make(config).parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(f"the tiny settings leave {model_type} {count} parameters (towers "
                         f"they do not reach), more than the {MAX_PARAMETERS} built here")
    return samples.from_config(config, seed, make)


def _tiny_towers(config, text: dict[str, Any]) -> dict[str, dict]:
    """Tiny ``text_config`` (with ``text`` set), ``vision_config`` and ``audio_config`` for a
    multimodal config."""
    towers = {"text_config": tiny_config(config.text_config.model_type, **text).to_dict()}
    for name, small in (("vision_config", SMALL_VISION), ("audio_config", SMALL_AUDIO)):
        tower = getattr(config, name, None)
        if tower is not None:
            towers[name] = _tiny_tower(tower, small)
    return towers


def _tiny_tower(tower, small: dict[str, Any]) -> dict[str, Any]:
    """A tower's config with the ``small`` sizes it has, each set through the attribute
    its config stores it in (Inkling's ``n_layers`` for ``num_hidden_layers``), and so its
    own sub-configs (DeepSeek-OCR-2's SAM and encoder configs inside its vision config).
    A size the config derives from a sub-config's (Nemotron-3.5-Transcribe's audio
    ``hidden_size``, its ASR encoder's) is set there."""
    aliases = getattr(type(tower), "attribute_map", {})
    held = {k: v for k, v in small.items() if hasattr(tower, k)
            and not isinstance(getattr(type(tower), k, None), property)}
    parts = {part: _tiny_tower(getattr(tower, part), small)
             for part in getattr(type(tower), "sub_configs", {})
             if getattr(tower, part, None) is not None}
    sized = {aliases.get(k, k): v for k, v in held.items()}
    return {**tower.to_dict(), **_uniform(tower), **sized, **parts,
            **_first_layers(tower, held.get("num_hidden_layers"))}


PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "patch_sizes", "hidden_sizes", "depths")
"""Tower config lists with one entry per layer (or stage: Muse Spark's audio tower)."""


def _first_layers(tower, count: int | None) -> dict[str, list]:
    """A tower's ``PER_LAYER_LISTS`` cut to its first ``count`` layers, which its
    validators require to match its layer count."""
    if count is None:
        return {}
    return {name: list(getattr(tower, name)[:count]) for name in PER_LAYER_LISTS
            if isinstance(getattr(tower, name, None), (list, tuple))}


def saved_multimodal(root: Path) -> Callable[[str], tuple[Any, Path]]:
    """model type -> (its tiny multimodal model, its save_pretrained folder under ``root``),
    each built on first use (for a module-scoped fixture)."""
    built: dict[str, tuple[Any, Path]] = {}

    def get(model_type: str) -> tuple[Any, Path]:
        if model_type not in built:
            model = build_multimodal(model_type)
            model.save_pretrained(root / model_type)
            built[model_type] = model, root / model_type
        return built[model_type]

    return get


def per_expert_pieces(saved: dict[str, Any], pattern: re.Pattern[str]
                      ) -> tuple[dict[str, Any], dict[str, dict[tuple[int, str], Any]]]:
    """``saved``'s tensors split by ``pattern`` (groups: experts module, expert number,
    projection): those it does not match, and each experts module's (expert, projection)
    -> tensor, for test oracles that group per-expert weights as a layout's files do."""
    others: dict[str, Any] = {}
    experts: dict[str, dict[tuple[int, str], Any]] = {}
    for key, tensor in saved.items():
        match = pattern.fullmatch(key)
        if match:
            experts.setdefault(match[1], {})[(int(match[2]), match[3])] = tensor
        else:
            others[key] = tensor
    return others, experts
