"""The torchtitan layout for GPT-OSS, checked by torchtitan 0.3 itself: the DCP folder moekit
writes loads strictly into torchtitan's own ``GptOssModel`` (its experts ``mlp1_weight_EGD``
[E,2I,H] with gate and up interleaved, the biases, the attention sinks), which then gives
transformers' logits; every name outside the experts is the one torchtitan's adapter gives;
the folder converts back to the HF files byte for byte.

torchtitan 0.3's ``GptOssStateDictAdapter`` is no oracle for the experts: its ``from_hf_map``
maps them to ``mlp1_weight``/``mlp1_bias``/``mlp2_weight``/``mlp2_bias``, names its model no
longer has, and its ``to_hf`` skips every key missing from that map, so an export through it
drops the experts. The model's own state dict is the oracle here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.nn.attention.flex_attention import flex_attention
from torchtitan.models import gpt_oss as go
from torchtitan.models.common.attention import FlexAttention
from torchtitan.models.common import CosSinRoPE, Embedding, Linear, RMSNorm

from moekit import samples
from moekit.cli import main

from .conftest import load_all, same_bytes
from .test_fp8 import mxfp4  # noqa: F401  (the MXFP4 GPT-OSS checkpoint fixture)
from .test_torchtitan import (adapter_names, load_strictly_as_transformers_holds,
                              logits_gap, to_torchtitan)

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",  # dcp.load on one process says so
    "ignore:In CPU autocast:UserWarning")  # torchtitan's router asks CPU autocast for fp32

EXPERTS = "layers.{}.moe.routed_experts.inner_experts.{}"


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A tiny transformers GPT-OSS and its ``save_pretrained`` folder. Its sliding window is
    torchtitan 0.3's (``_build_gptoss_layers`` sets 128 on the even layers, as transformers'
    default ``layer_types`` does)."""
    model = samples.build_model("gpt_oss", sliding_window=128)
    return model, samples.save_model(model, tmp_path_factory.mktemp("gpt_oss") / "hf")


@pytest.fixture(scope="module")
def gpt_oss_titan(gpt_oss, tmp_path_factory) -> Path:
    return to_torchtitan(gpt_oss[1], tmp_path_factory.mktemp("gpt_oss_titan") / "dcp")


def gpt_oss_config(config) -> go.GptOssModel.Config:
    """torchtitan 0.3's GPT-OSS config for a transformers one, built with the helpers its own
    registry uses (``_20b`` in ``models/gpt_oss/__init__.py``): yarn RoPE from
    ``rope_parameters``, softmax routing renormalised over the top k (what transformers'
    softmax over the top-k logits gives). ``_build_gptoss_layers`` fixes 64 heads of 64
    (8 KV heads), so each layer's attention is rebuilt with ``_make_gptoss_attn_config`` for
    the config's heads, its window where ``layer_types`` says ``sliding_attention``."""
    dim, vocab, rope = config.hidden_size, config.vocab_size, config.rope_parameters
    rope = CosSinRoPE.Config(
        dim=config.head_dim, max_seq_len=config.max_position_embeddings,
        theta=rope["rope_theta"], scaling="yarn", rope_factor=rope["factor"],
        beta_fast=rope["beta_fast"], beta_slow=rope["beta_slow"], truncate=rope["truncate"],
        original_seq_len=rope["original_max_position_embeddings"])
    layers = go._build_gptoss_layers(
        dim=dim, n_layers=config.num_hidden_layers, hidden_dim=config.intermediate_size,
        num_experts=config.num_local_experts, top_k=config.num_experts_per_tok,
        load_balance_coeff=1e-3, attn_backend="flex", moe_comm_backend="standard", rope=rope)
    for number, layer in enumerate(layers):
        sliding = config.layer_types[number] == "sliding_attention"
        layer.attention = go._make_gptoss_attn_config(
            dim=dim, layer_id=number, attn_backend="flex", n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
            sliding_window_size=config.sliding_window if sliding else None, rope=rope)
    return go.GptOssModel.Config(
        vocab_size=vocab, dim=dim,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim,
                                        param_init=go._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, eps=config.rms_norm_eps,
                            param_init=go._NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab,
                              param_init=go._output_linear_init(dim)),
        layers=layers)


def test_every_name_is_torchtitans_and_the_folder_converts_back(gpt_oss, gpt_oss_titan,
                                                                tmp_path):
    """Each HF key outside the experts is named as ``GptOssStateDictAdapter.from_hf_map``
    maps it; ``inspect`` and ``verify`` read the folder; it converts back to the HF files
    byte for byte."""
    hf, src = gpt_oss
    names = dcp.FileSystemReader(gpt_oss_titan).read_metadata().state_dict_metadata
    adapter = go.GptOssStateDictAdapter(gpt_oss_config(hf.config), None)
    original = load_all(src)
    expected = adapter_names(adapter, original)
    assert expected == {key for key in names if "inner_experts" not in key
                        and not key.endswith("expert_bias_E")}
    assert main(["inspect", str(gpt_oss_titan)]) == 0
    assert main(["verify", str(src), str(gpt_oss_titan)]) == 0
    assert main(["convert", str(gpt_oss_titan), str(tmp_path / "back"), "--to", "hf"]) == 0
    returned = load_all(tmp_path / "back")
    assert original.keys() == returned.keys()
    assert all(same_bytes(original[key], returned[key]) for key in original)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
def test_torchtitan_loads_gpt_oss_strictly_and_gives_transformers_logits(gpt_oss,
                                                                         gpt_oss_titan,
                                                                         monkeypatch):
    """torchtitan's GPT-OSS holds exactly the folder's names, shapes and dtypes and loads it
    strictly; its state dict converts in memory to transformers' byte for byte.

    Two seams let torchtitan's model run in fp32 on CPU, its code otherwise untouched: its
    attention sinks need flex attention's log-sum-exp, which torch 2.13's inductor does not
    compile on CPU, so ``FlexAttention`` runs ``flex_attention`` uncompiled (the same
    function, eager); and ``GptOssGroupedExperts.forward`` returns bf16 (it lacks the
    ``type_as(x)`` that ``GroupedExperts.forward`` ends with, so it runs only on bf16
    activations), which its token dispatcher's ``scatter_add`` into the fp32 output
    refuses, so its output is cast back to the input's dtype.

    ``GptOssGroupedExperts.forward`` multiplies in bf16 whatever the weights' dtype (inputs
    and weights cast with ``.bfloat16()``, the biases added in bf16), so its logits match
    transformers' fp32 ones to bf16 rounding, not exactly: within 0.5% of the largest logit.
    Writing gate and up concatenated instead of interleaved moves them more than five times
    as far."""
    monkeypatch.setattr(FlexAttention, "_compiled_flex_attn", flex_attention)
    experts = go.GptOssGroupedExperts.forward
    monkeypatch.setattr(go.GptOssGroupedExperts, "forward",
                        lambda self, x, counts: experts(self, x, counts).type_as(x))
    hf, _ = gpt_oss
    model = gpt_oss_config(hf.config).build().eval()
    state = load_strictly_as_transformers_holds(model, gpt_oss_titan, hf)
    gap, tolerance = logits_gap(model, hf)
    assert gap() <= tolerance
    for name in ("mlp1_weight_EGD", "mlp1_bias_EG"):
        for layer in range(hf.config.num_hidden_layers):
            joined = state[EXPERTS.format(layer, name)]
            state[EXPERTS.format(layer, name)] = torch.cat([joined[:, 0::2], joined[:, 1::2]],
                                                           dim=1)
    model.load_state_dict(state, strict=True)
    assert gap() > 5 * tolerance


def test_mxfp4_experts_are_refused_unless_dequantized_as_transformers_does(
        mxfp4, tmp_path, capsys):  # noqa: F811
    """torchtitan's GPT-OSS holds bf16 or fp32 experts (it dequantizes the Hub's MXFP4 only
    when reading HF files): the packed experts are refused, saying why and what to pass;
    with ``--dequantize`` the experts are transformers' own dequantization
    (``convert_moe_packed_tensors``, [E, in, out]) laid as torchtitan holds them."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out = tmp_path / "dcp"
    assert main(["convert", str(mxfp4), str(out), "--to", "torchtitan"]) == 2
    err = capsys.readouterr().err
    assert "gate_mxblocks" in err and "dequantizes MXFP4 only when it reads" in err
    assert "--dequantize" in err and "Traceback" not in err and not out.exists()
    assert main(["convert", str(mxfp4), str(out), "--to", "torchtitan", "--dequantize"]) == 0
    hub = load_all(mxfp4)
    metadata = dcp.FileSystemReader(out).read_metadata().state_dict_metadata
    state = {key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
             for key, entry in metadata.items()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(out), no_dist=True)
    for layer in range(3):
        for hf_name, titan_name in (("gate_up_proj", "mlp1_weight_EGD"),
                                    ("down_proj", "mlp2_weight_EDF")):
            key = f"model.layers.{layer}.mlp.experts.{hf_name}"
            expected = convert_moe_packed_tensors(hub[key + "_blocks"], hub[key + "_scales"])
            assert same_bytes(state[EXPERTS.format(layer, titan_name)],
                              expected.transpose(1, 2).contiguous())
