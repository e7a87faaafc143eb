"""``moekit upcycle DENSE DST --to torchtitan``, checked by torchtitan 0.3 itself: its Qwen3
MoE model, built from the upcycled model's config.json, loads the DCP folder strictly and
gives the logits of the dense model (for a function-preserving method) and of the same
upcycle written in HF naming and loaded by transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moekit import samples
from moekit.cli import main
from moekit.conversion import convert
from moekit.layouts import LAYOUTS

from .conftest import load_all, same_bytes
from .test_torchtitan import (SHARD, load_strictly_as_transformers_holds, titan_logits,
                              titan_model)

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",  # dcp.load on one process says so
    "ignore:In CPU autocast:UserWarning")  # torchtitan's router asks CPU autocast for fp32

METHODS = {
    "copy": ["--experts", "4", "--top-k", "2"],
    "granular": ["--experts", "8", "--top-k", "4", "--method", "granular", "--granularity", "2"],
    "drop": ["--experts", "4", "--top-k", "2", "--method", "drop", "--drop-ratio", "0.5"],
}
"""The methods upcycle offers a dense Qwen3 (whose target, Qwen3-MoE, has no shared
expert); drop does not preserve the dense function."""


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """A tiny dense transformers Qwen3, saved in several shards."""
    model = samples.build_model("qwen3", seed=3)
    return samples.save_model(model, tmp_path_factory.mktemp("dense") / "qwen3")


@pytest.mark.parametrize("method", METHODS)
def test_torchtitan_loads_the_upcycled_folder_and_gives_the_upcycled_logits(method, dense,
                                                                            tmp_path):
    """torchtitan 0.3's GroupedExperts multiplies in bf16 whatever the weights' dtype
    (``GroupedExperts.forward`` casts with ``.bfloat16()``), so its logits match fp32
    transformers to bf16 rounding (2^-8 relative), not exactly: within 0.5% of the largest
    logit. The weights themselves are compared exactly: torchtitan's loaded state dict,
    converted to transformers' naming, is byte for byte the state dict transformers loads
    from the same upcycle written in HF naming."""
    options = [*METHODS[method], "--seed", "5"]
    titan, hf = tmp_path / "titan", tmp_path / "hf"
    assert main(["upcycle", str(dense), str(titan), "--to", "torchtitan",
                 "--max-shard-size", str(SHARD), *options]) == 0
    assert len(list(titan.glob("*.distcp"))) > 1
    assert main(["upcycle", str(dense), str(hf), *options]) == 0
    transformers_moe = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    model = titan_model(AutoConfig.from_pretrained(titan))
    load_strictly_as_transformers_holds(model, titan, transformers_moe)

    ids = samples.sample_input(transformers_moe.config.vocab_size)
    with torch.no_grad():
        upcycled = transformers_moe(ids).logits
    dense_logits = samples.logits(dense, ids)
    tolerance = 0.005 * dense_logits.abs().max().item()
    got = titan_logits(model, ids)
    assert (got - upcycled).abs().max().item() <= tolerance
    distance = (got - dense_logits).abs().max().item()
    if method == "drop":
        assert distance > 5 * tolerance
    else:
        assert distance <= tolerance


@pytest.mark.parametrize("family,options", [
    ("llama", []), ("qwen2", []), ("qwen2", ["--target", "qwen2_moe", "--shared-expert"])])
def test_a_target_torchtitan_has_no_names_for_is_refused(family, options, tmp_path, capsys):
    """Of the families upcycle writes, torchtitan 0.3 has a model for Qwen3-MoE only (its
    ``models/`` hold no Mixtral or Qwen2-MoE; its MoE adds shared experts ungated, where
    Qwen2-MoE gates its shared expert by a sigmoid): the others are refused naming the
    family, before anything is read, dry run or not."""
    src = samples.save_model(samples.build_model(family, seed=3), tmp_path / family)
    target = {"llama": "mixtral", "qwen2": "qwen2_moe"}[family]
    for dry_run in (["--dry-run"], []):
        code = main(["upcycle", str(src), str(tmp_path / "out"), "--experts", "4", "--top-k",
                     "2", "--to", "torchtitan", *options, *dry_run])
        err = capsys.readouterr().err
        assert code == 2
        assert f"torchtitan layout has no names for the {target} family" in err
        assert "qwen3_moe" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_qwen3_with_attention_biases_is_refused_naming_one(tmp_path, capsys):
    """torchtitan's Qwen3 MoE, built from the config of an upcycle of a dense Qwen3 with
    ``attention_bias``, holds no bias: the upcycle into it is refused, naming a bias,
    before anything is written."""
    src = samples.save_model(samples.build_model("qwen3", seed=3, attention_bias=True),
                             tmp_path / "dense")
    hf = tmp_path / "hf"
    assert main(["upcycle", str(src), str(hf), *METHODS["copy"]]) == 0
    assert not [key for key in titan_model(AutoConfig.from_pretrained(hf)).state_dict()
                if key.endswith(".bias")]
    out = tmp_path / "out"
    assert main(["upcycle", str(src), str(out), *METHODS["copy"], "--to", "torchtitan"]) == 2
    err = capsys.readouterr().err
    assert "no place for model.layers.0.self_attn.k_proj.bias" in err
    assert "attention has no biases" in err and "Traceback" not in err
    assert not out.exists()


def upcycled(dense: Path, dst: Path, *options: str) -> dict[str, torch.Tensor]:
    """``moekit upcycle`` of the granular method into safetensors at ``dst``, read back."""
    assert main(["upcycle", str(dense), str(dst), *METHODS["granular"], *options]) == 0
    return load_all(dst)


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name not in ("hf", "megatron")])
def test_upcycling_into_a_layout_writes_what_converting_the_hf_upcycle_writes(layout, dense,
                                                                              tmp_path):
    """``--to`` composes the upcycling plan with the conversion ``convert --to`` runs (whose
    output each layout's own tests hold to its consumer): the two write the same tensors,
    byte for byte, as safetensors (megatron's layout, whose tensors are stored in chunks,
    is written in its own format only, and its upcycle is tested with megatron-core)."""
    direct = upcycled(dense, tmp_path / "direct", "--to", layout, "--format", "safetensors")
    upcycled(dense, tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "converted", layout, format="safetensors")
    converted = load_all(tmp_path / "converted")
    assert direct.keys() == converted.keys()
    assert all(same_bytes(direct[key], converted[key]) for key in direct)


def test_upcycling_into_transformers_writes_the_state_dict_transformers_loads(dense, tmp_path):
    direct = upcycled(dense, tmp_path / "direct", "--to", "transformers")
    upcycled(dense, tmp_path / "hf")
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                    dtype=torch.float32).state_dict()
    assert direct.keys() == expected.keys()
    assert all(same_bytes(direct[key], expected[key]) for key in expected)
