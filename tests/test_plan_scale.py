"""Planning at scale from config.json alone: the tensors a Hub checkpoint holds (FP8 block
scales, multi-token-prediction layers, dense leading layers, shared experts) and each
rank's bytes on an (ep, dp) mesh, against what transformers saves and what the loader
reads."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from moekit.checkpoint import Checkpoint
from moekit.cli import main
from moekit.config_headers import DECODERS, config_headers
from moekit.executors.memory import run_plan
from moekit.expert_parallel.ranges import rank_plan
from moekit.expert_parallel.report import ep_report
from moekit.planner import understand_checkpoint
from moekit.sources import FileSource
from tests import sharded_workers
from tests.conftest import load_all

DEEPSEEK_V3 = Path(__file__).parent / "data" / "deepseek_v3_671b_config.json"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _layer(key: str) -> int | None:
    match = _LAYER.match(key)
    return int(match[1]) if match else None


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_a_config_describes_what_save_pretrained_writes(family, family_checkpoints):
    """Names, shapes and dtypes equal the files transformers saved (which hold no
    multi-token-prediction layer: transformers does not build it)."""
    folder = family_checkpoints[family]
    config = json.loads((folder / "config.json").read_text())
    described = config_headers(config, "config.json")
    saved = Checkpoint.open(folder).tensors
    stack = config["num_hidden_layers"]
    described = {k: (v.shape, v.dtype) for k, v in described.items()
                 if (_layer(k) or 0) < stack}
    assert described == {k: (v.shape, v.dtype) for k, v in saved.items()}


def test_deepseek_v3_671b_config_describes_its_hub_checkpoint():
    """deepseek-ai/DeepSeek-V3 on the Hub: 91,991 tensors, 688.6 GB; FP8 e4m3 linear
    weights with 128 x 128 F32 block scales; router BF16, score-correction bias F32; the
    MTP layer 61 a full MoE layer plus its own embedding, norms, eh_proj and head."""
    tensors = config_headers(json.loads(DEEPSEEK_V3.read_text()), str(DEEPSEEK_V3))
    assert len(tensors) == 91_991
    total = sum(math.prod(t.shape) * {"F8_E4M3": 1, "BF16": 2, "F32": 4}[t.dtype]
                for t in tensors.values())
    assert round(total / 1e9, 1) == 688.6
    expert = "model.layers.61.mlp.experts.255.down_proj.weight"
    assert (tensors[expert].shape, tensors[expert].dtype) == ((7168, 2048), "F8_E4M3")
    assert tensors[expert + "_scale_inv"].shape == (56, 16)
    assert tensors["model.layers.3.mlp.gate.weight"].dtype == "BF16"
    assert tensors["model.layers.3.mlp.gate.e_score_correction_bias"].dtype == "F32"
    assert "model.layers.2.mlp.experts.0.up_proj.weight" not in tensors
    assert tensors["model.layers.2.mlp.up_proj.weight"].shape == (18432, 7168)
    assert tensors["model.layers.61.eh_proj.weight"].shape == (7168, 2 * 7168)
    assert tensors["model.layers.61.shared_head.head.weight"].dtype == "BF16"
    assert max(_layer(k) or 0 for k in tensors) == 61


def test_deepseek_v3_671b_on_ep64_dp4_from_its_config_alone(capsys):
    assert main(["plan", str(DEEPSEEK_V3), "--ep", "64", "--dp", "4", "--json"]) == 0
    ranks = json.loads(capsys.readouterr().out)
    assert len(ranks) == 256
    per_expert = 3 * (2048 * 7168 + 16 * 56 * 4)  # e4m3 gate, up, down and their scales
    moe_layers = 61 - 3 + 1  # and the MTP layer
    assert all(r["experts"] == [4 * r["ep_rank"], 4 * r["ep_rank"] + 3] for r in ranks)
    assert all(r["rank"] == r["dp_rank"] * 64 + r["ep_rank"] for r in ranks)
    assert {r["expert_bytes"] for r in ranks} == {4 * moe_layers * per_expert}
    others = {r["dp_rank"]: r["other_bytes"] for r in ranks}
    checkpoint = (sum(r["expert_bytes"] for r in ranks if r["dp_rank"] == 0)
                  + sum(others.values()))
    assert round(checkpoint / 1e9, 1) == 688.6
    assert others[0] >= others[3] and max(others.values()) - min(others.values()) < 2**30


def _fp8_with_mtp(family_models, family_checkpoints, root: Path) -> Path:
    """The tiny DeepSeek-V3 checkpoint as the Hub holds DeepSeek-V3: every nn.Linear of
    the decoder layers (experts included) in float8 e4m3 with F32 block scales (8 x 8
    blocks: transformers' fused scale grid needs whole blocks of the tiny I=16), and an
    MTP layer after the stack (a copy of the last layer plus its own embedding, norms,
    eh_proj and head)."""
    folder = family_checkpoints["deepseek_v3"]
    model = family_models["deepseek_v3"]
    linear = {f"{name}.weight" for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")}
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "activation_scheme": "dynamic",
                                     "weight_block_size": [8, 8]}
    stack, h, vocab = config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]
    out = {}
    for key, value in load_all(folder).items():
        if key in linear or ".experts." in key:
            out[key] = value.to(torch.float8_e4m3fn)
            out[key + "_scale_inv"] = torch.rand(-(-value.shape[0] // 8),
                                                 -(-value.shape[1] // 8))
        else:
            out[key] = value
    last = f"model.layers.{stack - 1}."
    out.update({f"model.layers.{stack}." + k[len(last):]: v.clone()
                for k, v in out.items() if k.startswith(last)})
    mtp = f"model.layers.{stack}."
    for name, shape in (("embed_tokens.weight", (vocab, h)), ("enorm.weight", (h,)),
                        ("hnorm.weight", (h,)), ("eh_proj.weight", (h, 2 * h)),
                        ("shared_head.norm.weight", (h,)),
                        ("shared_head.head.weight", (vocab, h))):
        out[mtp + name] = torch.randn(shape)
    target = root / "deepseek-v3-fp8"
    target.mkdir()
    save_file(out, target / "model.safetensors", metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def ds3_fp8(family_models, family_checkpoints, tmp_path_factory) -> Path:
    return _fp8_with_mtp(family_models, family_checkpoints, tmp_path_factory.mktemp("ds3"))


def test_plan_from_a_config_is_what_the_loader_reads(ds3_fp8):
    """On a checkpoint of DeepSeek-V3's structure (FP8 with scales, an MTP layer, a dense
    leading layer, shared experts): the figures planned from its config.json alone equal
    those planned from its headers; a rank holds what load_experts reads for its experts
    (on an ep mesh); on a (dp, ep) mesh each non-expert tensor's share is the rows
    ``torch.chunk`` (FSDP2's split) gives that dp rank."""
    checkpoint_dir = ds3_fp8
    checkpoint = Checkpoint.open(checkpoint_dir)
    analysis = understand_checkpoint(checkpoint)
    assert max(analysis.blocks) == json.loads(
        (checkpoint_dir / "config.json").read_text())["num_hidden_layers"]
    for ep, dp in ((1, 1), (4, 1), (4, 3), (2, 4)):
        planned = ep_report(checkpoint_dir / "config.json", ep, dp_size=dp)
        assert planned == ep_report(checkpoint_dir, ep, dp_size=dp)
        for load in planned:
            plan = rank_plan(analysis, ep, load.ep_rank, "transformers")
            with FileSource(checkpoint) as source:
                loaded = run_plan(plan, source)
                if dp == 1:
                    assert source.bytes_read == load.held_bytes
            experts = sum(t.nbytes for k, t in loaded.items() if k in plan.expert_tensors)
            rows = [torch.chunk(t, dp)[load.dp_rank:load.dp_rank + 1]
                    for k, t in loaded.items() if k not in plan.expert_tensors]
            assert experts == load.expert_bytes
            assert sum(c[0].nbytes for c in rows if c) == load.other_bytes


@pytest.mark.parametrize("shapes", [[(1, 2), (2, 1)], [(3, 2), (2, 3), (1, 6), (6, 1)]],
                         ids=["world2", "world6"])
def test_plan_is_what_load_sharded_reads_and_holds_rank_by_rank(shapes, ds3_fp8, tmp_path):
    """load_sharded of the DeepSeek-V3-structured checkpoint on gloo (no transformers in the
    ranks), each (dp, ep) mesh in turn: each rank's tensors equal the checkpoint's, and
    the bytes its reader is asked for and the bytes it holds are the plan's for that
    rank, the plan made from the config.json alone."""
    world = shapes[0][0] * shapes[0][1]
    mp.spawn(sharded_workers.load_counting, nprocs=world, join=True,
             args=(world, str(tmp_path / "store"), str(ds3_fp8), str(tmp_path), shapes))
    figures = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(world)]
    tensor_bytes = Checkpoint.open(ds3_fp8).total_bytes()
    for at, (dp, ep) in enumerate(shapes):
        planned = ep_report(ds3_fp8 / "config.json", ep, dp_size=dp)
        assert [p.rank for p in planned] == list(range(world))
        assert [f[at]["read"] for f in figures] == [p.read_bytes for p in planned]
        assert [f[at]["held"] for f in figures] == [p.held_bytes for p in planned]
        assert sum(p.read_bytes for p in planned) == tensor_bytes


def test_the_mesh_is_shown_and_checked(capsys):
    assert main(["plan", str(DEEPSEEK_V3), "--ep", "8", "--dp", "2"]) == 0
    layout, *lines = capsys.readouterr().out.splitlines()
    assert layout.startswith("layout transformers: the first of nemo, transformers")
    assert lines[0].split()[:4] == ["rank", "dp", "ep", "experts"] and len(lines) == 17
    assert lines[-1].split()[:3] == ["15", "1", "7"]
    assert main(["plan", str(DEEPSEEK_V3), "--ep", "8", "--dp", "0"]) == 2
    assert "data-parallel group size is 0" in capsys.readouterr().err


def test_a_quantisation_moekit_cannot_describe_is_refused(tmp_path, capsys):
    config = {**json.loads(DEEPSEEK_V3.read_text()),
              "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["plan", str(tmp_path / "config.json"), "--ep", "8"]) == 2
    assert "FP8 block quantisation (quant_method fp8" in capsys.readouterr().err



@pytest.mark.parametrize("patterns", [["model.layers.1"], ["mlp.gate"], ["down_proj"],
                                      ["lm_head", "model.layers.*.self_attn.kv_b_proj"],
                                      ["model.layers.6.mlp.experts"]])
def test_modules_to_not_convert_keep_what_transformers_keeps_unquantised(patterns):
    """transformers' own rule (``should_convert_module``) decides which linear weights of
    an FP8 checkpoint stay in the model dtype: a pattern matches from the start of the
    module name up to a module boundary, as a regex, or as a suffix."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = json.loads(DEEPSEEK_V3.read_text())
    every = config_headers(config, "config.json", routed=1)
    linear = {k for k in every if k + "_scale_inv" in every}
    config["quantization_config"]["modules_to_not_convert"] = patterns
    tensors = config_headers(config, "config.json", routed=1)
    kept = {k for k in linear if tensors[k].dtype == "BF16"}
    assert kept == {k for k in linear
                    if not should_convert_module(k.removesuffix(".weight"), patterns)}
    assert all(k + "_scale_inv" not in tensors for k in kept)


def test_fp8_a_config_alone_cannot_describe_is_refused(tmp_path, capsys):
    """Static activation scales and per-tensor weight scales add tensors beside each
    linear weight (transformers' ``FP8Linear``): refused rather than left out."""
    base = json.loads(DEEPSEEK_V3.read_text())
    for change, named in (({"activation_scheme": "static"}, "activation_scheme"),
                          ({"weight_block_size": None}, "weight_block_size"),
                          ({"modules_to_not_convert": ["layers.(1"]}, "layers.(1")):
        config = {**base, "quantization_config": {**base["quantization_config"], **change}}
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert main(["plan", str(tmp_path / "config.json"), "--ep", "8"]) == 2
        err = capsys.readouterr().err
        assert named in err and err.count("\n") == 1 and "Traceback" not in err



def test_an_fp8_config_of_another_class_than_the_causal_lm_is_refused(tmp_path, capsys):
    """moekit describes FP8 tensors from a config alone for the causal language models of
    ``DECODERS`` only; transformers' model of another class does not hold them."""
    config = json.loads(DEEPSEEK_V3.read_text())
    config["architectures"] = ["DeepseekV3ForSequenceClassification"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["plan", str(tmp_path / "config.json"), "--ep", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only for Qwen2MoeForCausalLM" in err
    assert 'architectures ["DeepseekV3ForSequenceClassification"]' in err


def test_an_fp8_config_leaving_a_size_unstated_names_it(tmp_path, capsys):
    """transformers' defaults cannot stand in for an FP8 checkpoint's sizes (it does not
    describe the quantised tensors): the missing key is named, not the model type."""
    config = json.loads(DEEPSEEK_V3.read_text())
    del config["moe_intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["plan", str(tmp_path / "config.json"), "--ep", "8"]) == 2
    err = capsys.readouterr().err
    assert "moe_intermediate_size is not stated" in err and "not those of" not in err



@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_experts_are_never_sized_by_the_dense_intermediate_size(family, family_checkpoints):
    """A config without ``moe_intermediate_size`` leaves the experts' size to
    transformers' default, which is not ``intermediate_size`` (the dense MLPs')."""
    config = json.loads((family_checkpoints[family] / "config.json").read_text())
    del config["moe_intermediate_size"]
    assert config_headers(config, "config.json") is None



@pytest.mark.parametrize("key", ["num_attention_heads", "hidden_size", "moe_intermediate_size"])
@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_a_config_with_a_size_of_zero_is_refused(family, key, family_checkpoints, tmp_path,
                                                  capsys):
    """A model with no attention heads, no hidden features or experts of no size is
    refused, as the same sizes in a checkpoint's tensors are, not planned as zero bytes."""
    config = json.loads((family_checkpoints[family] / "config.json").read_text())
    key = "intermediate_size" if key == "moe_intermediate_size" and family == "olmoe" else key
    config[key] = 0
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["plan", str(tmp_path / "config.json"), "--ep", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{key} is 0; expected a whole number of at least 1" in err


def test_planning_from_a_config_imports_no_torch():
    probe = ("import sys; from moekit.cli import main; "
             "main(['plan', sys.argv[1], '--ep', '64', '--json']); "
             "print('torch' in sys.modules, 'transformers' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", probe, str(DEEPSEEK_V3)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr.split() == ["False", "False"], out.stderr
