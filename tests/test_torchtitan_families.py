"""The torchtitan layout for DeepSeek-V3, checked by torchtitan 0.3 itself: the DCP folder
moekit writes loads strictly into torchtitan's own ``DeepSeekV3Model`` (MLA attention, a
dense leading layer, shared experts, the router's score-correction bias as
``expert_bias_E``), which then gives transformers' logits; every name is the one
torchtitan's adapter gives; the folder converts back to the HF files byte for byte. A
family moekit has no torchtitan names for is refused, naming the families it has."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchtitan.models import deepseek_v3 as ds
from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
from transformers import AutoModelForCausalLM

from moekit import samples
from moekit.cli import main

from .conftest import load_all, same_bytes
from .test_torchtitan import (adapter_names, load_strictly_as_transformers_holds,
                              logits_gap, to_torchtitan)

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",  # dcp.load on one process says so
    "ignore:In CPU autocast:UserWarning")  # torchtitan's router asks CPU autocast for fp32


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A tiny transformers DeepSeek-V3 (one dense layer, then MoE layers with a shared
    expert and a q LoRA rank) and its ``save_pretrained`` folder. Its score-correction
    biases are drawn non-zero so that a misplaced one changes the routing; its norms'
    epsilon is torchtitan's RMSNorm default (1e-5), which DeepSeek's builders keep."""
    model = samples.build_model("deepseek_v3", rms_norm_eps=1e-5)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.2)
    return model, samples.save_model(model, tmp_path_factory.mktemp("deepseek") / "hf")


@pytest.fixture(scope="module")
def deepseek_titan(deepseek, tmp_path_factory) -> Path:
    return to_torchtitan(deepseek[1], tmp_path_factory.mktemp("deepseek_titan") / "dcp")


def deepseek_config(config) -> ds.DeepSeekV3Model.Config:
    """torchtitan 0.3's DeepSeek-V3 config for a transformers one, built with the helpers
    its own registry uses (``_671b`` in ``models/deepseek_v3/__init__.py``): sigmoid
    scores, ``route_norm`` = ``norm_topk_prob``, ``route_scale`` = ``routed_scaling_factor``,
    expert groups = ``n_group``/``topk_group``, no multi-token-prediction layers (transformers
    builds none)."""
    dim, vocab = config.hidden_size, config.vocab_size
    return ds.DeepSeekV3Model.Config(
        vocab_size=vocab, dim=dim,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim,
                                        param_init=ds._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=ds._NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab,
                              param_init=ds._output_linear_init(dim)),
        layers=ds._build_dsv3_layers(
            n_layers=config.num_hidden_layers, n_dense_layers=config.first_k_dense_replace,
            dim=dim, n_heads=config.num_attention_heads, q_lora_rank=config.q_lora_rank or 0,
            kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
            qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
            mscale=1.0, dense_hidden_dim=config.intermediate_size,
            moe_hidden_dim=config.moe_intermediate_size, num_experts=config.n_routed_experts,
            num_shared_experts=config.n_shared_experts,
            router_top_k=config.num_experts_per_tok, router_score_func="sigmoid",
            router_num_expert_groups=config.n_group, router_num_limited_groups=config.topk_group,
            router_route_scale=config.routed_scaling_factor,
            router_route_norm=config.norm_topk_prob, attn_backend="flex",
            moe_comm_backend="standard", non_blocking_capacity_factor=None,
            rope=ComplexRoPE.Config(dim=config.qk_rope_head_dim,
                                    max_seq_len=config.max_position_embeddings,
                                    theta=config.rope_parameters["rope_theta"])),
        mtp_layers=[])


def test_every_name_is_the_one_torchtitans_adapter_gives(deepseek, deepseek_titan, tmp_path):
    """Each HF key outside the experts is named as ``DeepSeekV3StateDictAdapter.from_hf_map``
    maps it (the score-correction bias to ``expert_bias_E``, kept as it is); ``inspect`` and
    ``verify`` read the folder; it converts back to the HF files byte for byte."""
    hf, src = deepseek
    names = dcp.FileSystemReader(deepseek_titan).read_metadata().state_dict_metadata
    adapter = ds.DeepSeekV3StateDictAdapter(deepseek_config(hf.config), None)
    original = load_all(src)
    expected = adapter_names(adapter, original)
    assert expected == {key for key in names if "inner_experts" not in key}
    assert main(["inspect", str(deepseek_titan)]) == 0
    assert main(["verify", str(src), str(deepseek_titan)]) == 0
    assert main(["convert", str(deepseek_titan), str(tmp_path / "back"), "--to", "hf"]) == 0
    returned = load_all(tmp_path / "back")
    assert original.keys() == returned.keys()
    assert all(same_bytes(original[key], returned[key]) for key in original)


def test_torchtitan_loads_deepseek_strictly_and_gives_transformers_logits(deepseek,
                                                                          deepseek_titan):
    """torchtitan's DeepSeek-V3 holds exactly the folder's names, shapes and dtypes and
    loads it strictly; its state dict converts in memory to transformers' byte for byte.

    torchtitan 0.3's GroupedExperts multiplies in bf16 whatever the weights' dtype
    (``GroupedExperts.forward`` casts with ``.bfloat16()``), so its logits match
    transformers' fp32 ones to bf16 rounding, not exactly: within 0.5% of the largest
    logit. Zeroing one layer's score-correction bias (so routing ignores it) moves them
    more than five times as far."""
    hf, _ = deepseek
    model = deepseek_config(hf.config).build().eval()
    state = load_strictly_as_transformers_holds(model, deepseek_titan, hf)
    gap, tolerance = logits_gap(model, hf)
    assert gap() <= tolerance
    state["layers.1.moe.expert_bias_E"] = torch.zeros_like(state["layers.1.moe.expert_bias_E"])
    model.load_state_dict(state, strict=True)
    assert gap() > 5 * tolerance


@pytest.mark.parametrize(("model_type", "family"), [("mixtral", "mixtral"),
                                                     ("llama4_text", "llama4")])
def test_a_family_torchtitan_does_not_implement_is_refused(model_type, family, tmp_path,
                                                           capsys):
    """torchtitan 0.3 has no Mixtral and no Llama 4 model (``torchtitan/models`` holds
    deepseek_v3, gpt_oss, qwen3, qwen3_5, llama3, kimi_k2_7, flux, muse_glimmer): each is
    refused before its experts are judged, saying torchtitan has no model of the family
    and naming the families moekit writes, and nothing is left behind."""
    src = samples.save_model(samples.build_model(model_type), tmp_path / "hf")
    out = tmp_path / "dcp"
    assert main(["convert", str(src), str(out), "--to", "torchtitan"]) == 2
    err = capsys.readouterr().err
    assert f"no names for the {family} family: torchtitan 0.3 has no model of it" in err
    assert "torchtitan's names for qwen3_moe, deepseek_v3, gpt_oss" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_a_deepseek_without_its_score_correction_bias_is_refused(deepseek, tmp_path, capsys):
    """torchtitan's own DeepSeek-V3 holds ``expert_bias_E`` in every MoE layer, so a
    folder without it fails its strict load; written as zeros it would come back as a
    score-correction bias the source lacks (transformers' ``from_pretrained`` fills a
    missing one with zeros, the same bytes a fresh model saves), so moekit refuses the
    source, naming the tensor (``--dry-run`` too), and leaves nothing behind. The way out
    the message gives, a load and save with transformers, converts."""
    hf, _ = deepseek
    held = deepseek_config(hf.config).build().state_dict()
    assert {"layers.1.moe.expert_bias_E", "layers.2.moe.expert_bias_E"} <= held.keys()
    src = tmp_path / "hf"
    hf.save_pretrained(src, state_dict={key: value for key, value in hf.state_dict().items()
                                        if not key.endswith("e_score_correction_bias")})
    out = tmp_path / "dcp"
    for dry_run in ([], ["--dry-run"]):
        assert main(["convert", str(src), str(out), "--to", "torchtitan", *dry_run]) == 2
        err = capsys.readouterr().err
        assert "no model.layers.1.mlp.gate.e_score_correction_bias (nor 1 more" in err
        assert "expert_bias_E" in err and "Traceback" not in err
        assert not out.exists()
    resaved = tmp_path / "resaved"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(resaved)
    assert main(["convert", str(resaved), str(out), "--to", "torchtitan"]) == 0
