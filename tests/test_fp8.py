"""FP8 block-scaled checkpoints (DeepSeek-V3/R1 style): scales travel with their experts,
and ``--dequantize`` matches a reference dequantisation written from the format.

The checkpoint is synthetic (transformers cannot run FP8 block-scaled models on a CPU):
Qwen3-MoE naming, every expert weight and one attention weight stored as float8_e4m3fn
[out, in] with ``{weight}_scale_inv`` float32 [ceil(out/128), ceil(in/128)]; the shapes
(I=200, H=160) are not multiples of 128, so the last blocks are partial.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moekit import convert, inspect, verify
from moekit.cli import main

from .conftest import load_all, pack_mxfp4, same_bytes

H, I, E, LAYERS, BLOCK = 160, 200, 4, 2, 128


def _quantised(shape: tuple[int, int], generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.randn(shape, generator=generator).to(torch.float8_e4m3fn)
    blocks = (math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK))
    scale = torch.rand(blocks, generator=generator) + 0.5
    return weight, scale


def reference_dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The format's definition, element by element over the blocks: W[i, j] times the
    scale of block (i // 128, j // 128), in float32, rounded once to bf16."""
    out = torch.empty(weight.shape, dtype=torch.float32)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            rows = slice(bi * BLOCK, (bi + 1) * BLOCK)
            cols = slice(bj * BLOCK, (bj + 1) * BLOCK)
            out[rows, cols] = weight[rows, cols].float() * scale[bi, bj]
    return out.to(torch.bfloat16)


def fp8_checkpoint(folder: Path, intermediate: int = I) -> Path:
    """A two-shard FP8 Qwen3-MoE checkpoint whose experts have ``intermediate`` rows."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(64, H, generator=generator).bfloat16()}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        q, q_scale = _quantised((H, H), generator)
        tensors[f"{p}.self_attn.q_proj.weight"] = q
        tensors[f"{p}.self_attn.q_proj.weight_scale_inv"] = q_scale
        tensors[f"{p}.mlp.gate.weight"] = torch.randn(E, H, generator=generator).bfloat16()
        for e in range(E):
            for proj, shape in (("gate", (intermediate, H)), ("up", (intermediate, H)),
                                ("down", (H, intermediate))):
                w, s = _quantised(shape, generator)
                tensors[f"{p}.mlp.experts.{e}.{proj}_proj.weight"] = w
                tensors[f"{p}.mlp.experts.{e}.{proj}_proj.weight_scale_inv"] = s
    names = sorted(tensors)
    half = len(names) // 2
    index = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, folder / file)
        index.update({k: file for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "qwen3_moe", "num_experts": E, "hidden_size": H,
         "moe_intermediate_size": intermediate, "num_hidden_layers": LAYERS}))
    return folder


@pytest.fixture(scope="module")
def fp8(tmp_path_factory) -> Path:
    return fp8_checkpoint(tmp_path_factory.mktemp("fp8") / "ckpt")


@pytest.fixture(scope="module")
def fp8_whole_blocks(tmp_path_factory) -> Path:
    """Experts whose intermediate size (256) is a whole number of 128-row blocks."""
    return fp8_checkpoint(tmp_path_factory.mktemp("fp8") / "ckpt", intermediate=256)


@pytest.mark.parametrize("layout, checkpoint", [("transformers", "fp8_whole_blocks"),
                                                ("vllm", "fp8"), ("vllm", "fp8_whole_blocks")])
def test_fp8_experts_and_scales_round_trip_byte_identically(layout, checkpoint, request,
                                                             tmp_path):
    source = request.getfixturevalue(checkpoint)
    convert(source, tmp_path / layout, to=layout, max_shard_size="200KB")
    convert(tmp_path / layout, tmp_path / "back", to="hf", max_shard_size="200KB")
    original, restored = load_all(source), load_all(tmp_path / "back")
    assert original.keys() == restored.keys()
    assert all(same_bytes(original[k], restored[k]) for k in original)
    assert verify(source, tmp_path / layout).equal


def test_grouped_scales_are_stacked_and_oriented_like_their_weights(fp8, tmp_path):
    """vLLM's block-quantised FusedMoE (Fp8MoEMethod.create_weights, vLLM 0.33) holds
    w13_weight_scale_inv [E, 2*ceil(I/128), ceil(H/128)]: the gate and up grids one after
    the other."""
    convert(fp8, tmp_path / "vllm", to="vllm")
    hf, vllm = load_all(fp8), load_all(tmp_path / "vllm")
    block = "model.layers.1.mlp.experts"
    grouped = vllm[f"{block}.routed_experts.w13_weight_scale_inv"]
    assert grouped.dtype == torch.float32 and grouped.shape == (E, 4, 2)
    assert vllm[f"{block}.routed_experts.w13_weight"].dtype == torch.float8_e4m3fn
    for e in range(E):
        gate, up = (hf[f"{block}.{e}.{p}_proj.weight_scale_inv"] for p in ("gate", "up"))
        assert torch.equal(grouped[e], torch.cat([gate, up]))
        assert torch.equal(vllm[f"{block}.routed_experts.w2_weight_scale_inv"][e],
                           hf[f"{block}.{e}.down_proj.weight_scale_inv"])


def _fp8_experts_shapes(intermediate: int) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of transformers' own fused FP8 experts module (5.24,
    ``integrations.finegrained_fp8.FP8Experts``) for this checkpoint's experts."""
    from transformers import Qwen3MoeConfig
    from transformers.integrations.finegrained_fp8 import FP8Experts

    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=intermediate, num_experts=E)
    with torch.device("meta"):
        module = FP8Experts(config, block_size=(BLOCK, BLOCK))
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def test_transformers_fp8_experts_are_shaped_as_transformers_builds_them(fp8_whole_blocks,
                                                                         tmp_path):
    convert(fp8_whole_blocks, tmp_path / "tf", to="transformers")
    out = load_all(tmp_path / "tf")
    block = "model.layers.0.mlp.experts."
    ours = {k[len(block):]: tuple(v.shape) for k, v in out.items() if k.startswith(block)}
    assert ours == _fp8_experts_shapes(256)


def test_an_fp8_gate_up_grid_that_spans_gate_and_up_is_refused(tmp_path, capsys):
    """I = 192: transformers' fused grid has max(ceil(2I/128), 2) = 3 rows, its middle
    block spanning gate rows 128-191 and up rows 0-63, which the per-expert grids (2 + 2
    rows) scale separately: refused without --dequantize, exact with it."""
    assert _fp8_experts_shapes(192)["gate_up_proj_scale_inv"] == (E, 3, 2)
    source = fp8_checkpoint(tmp_path / "fp8", intermediate=192)
    assert main(["convert", str(source), str(tmp_path / "out"), "--to", "transformers"]) == 2
    err = capsys.readouterr().err
    assert "intermediate size of 192, not a multiple of 128" in err and "--dequantize" in err
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(source), str(tmp_path / "out"), "--to", "transformers",
                 "--dequantize"]) == 0
    hf, out = load_all(source), load_all(tmp_path / "out")
    block = "model.layers.0.mlp.experts"
    gate, up = (reference_dequantize(hf[f"{block}.1.{p}_proj.weight"],
                                     hf[f"{block}.1.{p}_proj.weight_scale_inv"])
                for p in ("gate", "up"))
    assert same_bytes(out[f"{block}.gate_up_proj"][1], torch.cat([gate, up]))
    assert "gate_up_proj_scale_inv" not in "".join(out)


def test_a_transformers_fp8_grid_over_joined_rows_is_not_split_into_halves(tmp_path, capsys):
    """I = 32: transformers' fused grid has 2 rows, the first scaling all 64 gate+up rows
    and the second none; split in halves it would give up the second row's value."""
    folder = tmp_path / "tf"
    folder.mkdir()
    tensors = {"model.layers.0.mlp.gate.weight": torch.zeros(E, H, dtype=torch.bfloat16),
               "model.layers.0.mlp.experts.gate_up_proj":
                   torch.zeros(E, 64, H).to(torch.float8_e4m3fn),
               "model.layers.0.mlp.experts.gate_up_proj_scale_inv": torch.ones(E, 2, 2),
               "model.layers.0.mlp.experts.down_proj":
                   torch.zeros(E, H, 32).to(torch.float8_e4m3fn),
               "model.layers.0.mlp.experts.down_proj_scale_inv": torch.ones(E, 2, 1)}
    assert {k.rsplit(".", 1)[1]: tuple(v.shape) for k, v in tensors.items()
            if ".experts." in k} == _fp8_experts_shapes(32)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "qwen3_moe", "num_experts": E, "hidden_size": H,
         "moe_intermediate_size": 32, "num_hidden_layers": 1}))
    assert main(["convert", str(folder), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "intermediate size of 32, not a multiple of 128" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["hf", "nemo"])
def test_dequantize_matches_the_reference_to_the_bit(fp8, layout, tmp_path):
    assert main(["convert", str(fp8), str(tmp_path / "bf16"), "--to", layout,
                 "--dequantize"]) == 0
    hf, out = load_all(fp8), load_all(tmp_path / "bf16")
    assert not any(k.endswith("_scale_inv") for k in out)
    block = "model.layers.0.mlp.experts"
    for e in range(E):
        gate, up, down = (reference_dequantize(hf[f"{block}.{e}.{p}_proj.weight"],
                                               hf[f"{block}.{e}.{p}_proj.weight_scale_inv"])
                          for p in ("gate", "up", "down"))
        if layout == "hf":
            assert same_bytes(out[f"{block}.{e}.gate_proj.weight"], gate)
            assert same_bytes(out[f"{block}.{e}.down_proj.weight"], down)
        else:
            assert same_bytes(out[f"{block}.gate_and_up_projs"][e],
                              torch.cat([gate.T, up.T], -1))
            assert same_bytes(out[f"{block}.down_projs"][e], down.T)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert same_bytes(out[q], reference_dequantize(hf[q], hf[q + "_scale_inv"]))


def test_inspect_reports_fp8_block_scales(fp8):
    info = inspect(fp8)
    assert info.quantization == "fp8 e4m3, 128x128 block scales"
    assert "gate_scale" in info.expert_pieces


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory) -> Path:
    """A tiny GPT-OSS checkpoint whose experts are stored as the Hub stores them: MXFP4
    ``*_blocks`` [E, out, in/32, 16] and ``*_scales`` [E, out, in/32] (random codes and
    exponents around 2^0: every byte is a valid pair of FP4 codes)."""
    from moekit import samples

    folder = samples.save_model(samples.build_model("gpt_oss", intermediate_size=32),
                                tmp_path_factory.mktemp("mxfp4") / "gpt_oss")
    generator = torch.Generator().manual_seed(1)
    for file in folder.glob("*.safetensors"):
        tensors = load_all_file(file)
        pack_mxfp4(tensors, generator)
        save_file(tensors, file)
    index = folder / "model.safetensors.index.json"
    weight_map = {k: f.name for f in folder.glob("*.safetensors") for k in load_all_file(f)}
    index.write_text(json.dumps({"weight_map": weight_map}))
    return folder


def load_all_file(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(file)


def test_mxfp4_passes_through_and_dequantizes_like_transformers(mxfp4, tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    assert inspect(mxfp4).quantization.startswith("mxfp4")
    convert(mxfp4, tmp_path / "hf", to="hf")
    convert(tmp_path / "hf", tmp_path / "back", to="transformers")
    original, back = load_all(mxfp4), load_all(tmp_path / "back")
    assert original.keys() == back.keys()
    assert all(same_bytes(original[k], back[k]) for k in original)

    # nemo has no place for packed MXFP4 experts (NeMo dequantizes them on load).
    assert main(["convert", str(mxfp4), str(tmp_path / "nemo"), "--to", "nemo"]) == 2
    assert main(["convert", str(mxfp4), str(tmp_path / "bf16"), "--to", "transformers",
                 "--dequantize"]) == 0
    out = load_all(tmp_path / "bf16")
    for layer in range(3):
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.experts.{name}"
            expected = convert_moe_packed_tensors(original[key + "_blocks"],
                                                  original[key + "_scales"])
            assert same_bytes(out[key], expected), key
    convert(mxfp4, tmp_path / "vllm-bf16", to="vllm", dequantize=True)
    vllm = load_all(tmp_path / "vllm-bf16")
    key = "model.layers.1.mlp.experts"
    assert torch.equal(vllm[f"{key}.routed_experts.w13_weight"], out[f"{key}.gate_up_proj"].mT)


def _damaged(fp8: Path, folder: Path, change) -> Path:
    """A copy of the FP8 checkpoint with ``change(tensors)`` applied to its tensors."""
    tensors = load_all(fp8)
    change(tensors)
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text((fp8 / "config.json").read_text())
    return folder


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int32, torch.uint8])
def test_block_scales_that_are_not_floats_are_refused(fp8, tmp_path, capsys, dtype):
    def cast(tensors):
        for key in [k for k in tensors if k.endswith("_scale_inv")]:
            tensors[key] = tensors[key].to(dtype)

    src = _damaged(fp8, tmp_path / "src", cast)
    for extra in ([], ["--dequantize"]):
        assert main(["convert", str(src), str(tmp_path / "out"), "--to", "nemo", *extra]) == 2
        err = capsys.readouterr().err
        assert "FP8 block scales are floats of 16 bits or more" in err
        assert "self_attn.q_proj.weight_scale_inv" in err
    assert not (tmp_path / "out").exists()


def test_bf16_block_scales_are_read(fp8, tmp_path):
    def cast(tensors):
        for key in [k for k in tensors if k.endswith("_scale_inv")]:
            tensors[key] = tensors[key].bfloat16()

    src = _damaged(fp8, tmp_path / "src", cast)
    convert(src, tmp_path / "bf16", to="vllm", dequantize=True)
    hf, out = load_all(src), load_all(tmp_path / "bf16")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert same_bytes(out[q], reference_dequantize(hf[q], hf[q + "_scale_inv"].float()))


def test_dequantize_refuses_scales_beside_weights_that_are_not_float8(fp8, tmp_path, capsys):
    """Weights already in BF16 with their scales left beside them: dequantising would
    multiply them again."""
    def widen(tensors):
        for key in [k for k in tensors if k + "_scale_inv" in tensors]:
            tensors[key] = tensors[key].bfloat16()

    src = _damaged(fp8, tmp_path / "src", widen)
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "nemo",
                 "--dequantize"]) == 2
    err = capsys.readouterr().err
    assert "cannot dequantize" in err and "layer 0: gate_proj is BF16 beside block scales" in err
    assert "model.layers.0.self_attn.q_proj.weight is BF16" in err
    assert not (tmp_path / "out").exists()
    convert(src, tmp_path / "kept", to="vllm")           # without --dequantize: bytes moved
    assert verify(src, tmp_path / "kept").equal


@pytest.mark.parametrize("damage", ["blocks_float", "scales_signed", "blocks_shape"])
def test_mxfp4_tensors_must_be_bytes_of_the_format_shape(mxfp4, tmp_path, capsys, damage):
    folder = tmp_path / "src"
    folder.mkdir()
    for file in mxfp4.glob("*"):
        tensors = load_all_file(file) if file.suffix == ".safetensors" else None
        if tensors is None:
            (folder / file.name).write_bytes(file.read_bytes())
            continue
        for key in list(tensors):
            if damage == "blocks_float" and key.endswith("_blocks"):
                tensors[key] = tensors[key].float()
            elif damage == "scales_signed" and key.endswith("proj_scales"):
                tensors[key] = tensors[key].view(torch.int8)
            elif damage == "blocks_shape" and key.endswith("_blocks"):
                tensors[key] = tensors[key].reshape(*tensors[key].shape[:2], -1, 8)
        save_file(tensors, folder / file.name)
    for extra in ([], ["--dequantize"]):
        assert main(["convert", str(folder), str(tmp_path / "out"), "--to", "transformers",
                     *extra]) == 2
        err = capsys.readouterr().err
        assert "MXFP4 blocks" in err and "Traceback" not in err


def test_a_block_size_larger_than_the_weights_dequantizes_as_one_block(fp8, tmp_path):
    """weight_block_size [10**12, 10**12]: every weight is one block with a [1, 1] scale;
    the work is bounded by the weight, not by the block size the config declares."""
    def one_scale(tensors):
        for key in [k for k in tensors if k.endswith("_scale_inv")]:
            tensors[key] = tensors[key][:1, :1].clone()

    src = _damaged(fp8, tmp_path / "src", one_scale)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"weight_block_size": [10**12, 10**12]}
    (src / "config.json").write_text(json.dumps(config))
    convert(src, tmp_path / "out", to="hf", dequantize=True)
    hf, out = load_all(src), load_all(tmp_path / "out")
    key = "model.layers.1.mlp.experts.2.down_proj.weight"
    expected = (hf[key].float() * hf[key + "_scale_inv"][0, 0]).to(torch.bfloat16)
    assert same_bytes(out[key], expected)
