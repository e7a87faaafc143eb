"""Hub checkpoint -> every layout -> its own layout again is byte-identical for every
family (HF as save_pretrained writes it: per expert for most, grouped for Llama 4 and
GPT-OSS), and the results load in transformers with identical logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from moekit import convert, inspect, samples, verify
from moekit.checkpoint import INDEX_NAME

from .conftest import load_all, same_bytes

FAMILIES = list(samples.MOE_FAMILIES)
LAYOUTS = ["hf", "nemo", "transformers", "vllm"]
CASES = [(family, layout) for family in FAMILIES for layout in LAYOUTS if layout != "hf"]


@pytest.mark.parametrize("family,layout", CASES)
def test_round_trip_is_byte_identical_and_loads(family, layout, family_checkpoints, tmp_path):
    src = family_checkpoints[family]
    assert len(list(src.glob("*.safetensors"))) > 1, "the sample must span several shards"
    own = inspect(src).layout
    assert own == "hf"
    converted, back = tmp_path / layout, tmp_path / "back"
    convert(src, converted, to=layout, max_shard_size="40KB")
    convert(converted, back, to=own, max_shard_size="40KB")

    original, restored = load_all(src), load_all(back)
    assert original.keys() == restored.keys()
    assert all(same_bytes(original[k], restored[k]) for k in original)
    ids = samples.sample_input(96)
    assert torch.equal(samples.logits(back, ids), samples.logits(src, ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_layout_equals_the_models_state_dict(family, family_checkpoints,
                                                          family_models, tmp_path):
    """The oracle: what transformers itself builds in memory from the source."""
    out = tmp_path / "fused"
    convert(family_checkpoints[family], out, to="transformers")
    written = load_all(out)
    expected = family_models[family].state_dict()
    assert written.keys() == expected.keys()
    for key, tensor in expected.items():
        assert same_bytes(written[key], tensor), key


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_transformers_loads_grouped_transformers_layout(family, family_checkpoints, tmp_path):
    out = tmp_path / "fused"
    convert(family_checkpoints[family], out, to="transformers")
    ids = samples.sample_input(96)
    assert torch.equal(samples.logits(out, ids), samples.logits(family_checkpoints[family], ids))


def test_grouped_layouts_convert_into_each_other(family_checkpoints, tmp_path):
    src = family_checkpoints["deepseek_v3"]
    previous = src
    for layout in ["nemo", "vllm", "transformers", "nemo", "hf"]:
        out = tmp_path / f"step-{layout}-{len(list(tmp_path.iterdir()))}"
        convert(previous, out, to=layout)
        previous = out
    assert verify(src, previous).equal


def test_llama4_grouped_experts_match_the_documented_layout(family_checkpoints, tmp_path):
    """Llama 4's own gate_up_proj is [E, H, 2I] = cat(gate.T, up.T), down_proj [E, I, H]:
    the transposes of vLLM's w13_weight [E, 2I, H] = cat(w1, w3) and w2_weight [E, H, I]."""
    src = family_checkpoints["llama4_text"]
    assert inspect(src).layout == "hf"
    convert(src, tmp_path / "vllm", to="vllm")
    grouped, vllm = load_all(src), load_all(tmp_path / "vllm")
    block = "model.layers.1.feed_forward.experts"
    assert grouped[f"{block}.gate_up_proj"].shape == (6, 32, 48)
    for e in range(6):
        w13, w2 = (vllm[f"{block}.routed_experts.{name}"][e]
                   for name in ("w13_weight", "w2_weight"))
        assert torch.equal(grouped[f"{block}.gate_up_proj"][e], w13.T)
        assert torch.equal(grouped[f"{block}.down_proj"][e], w2.T)


def test_gpt_oss_interleaved_experts_and_biases_match_the_documented_layout(
        family_checkpoints, tmp_path):
    """GPT-OSS's files hold gate_up_proj [E,H,2I] (gate at [..., 0::2], up at [..., 1::2]),
    gate_up_proj_bias [E,2I] interleaved the same way, down_proj [E,I,H] and down_proj_bias
    [E,H]: moekit reads them as its hf layout, and vllm keeps gate and up interleaved
    (w13_weight [E,2I,H] is gate_up_proj transposed, w13_bias is gate_up_proj_bias)."""
    src = family_checkpoints["gpt_oss"]
    assert inspect(src).layout == "hf"
    convert(src, tmp_path / "vllm", to="vllm")
    grouped, vllm = load_all(src), load_all(tmp_path / "vllm")
    block = "model.layers.1.mlp.experts"
    assert grouped[f"{block}.gate_up_proj"].shape == (6, 32, 48)
    for e in range(6):
        assert torch.equal(vllm[f"{block}.routed_experts.w13_weight"][e],
                           grouped[f"{block}.gate_up_proj"][e].T)
        assert torch.equal(vllm[f"{block}.routed_experts.w13_bias"][e],
                           grouped[f"{block}.gate_up_proj_bias"][e])
        assert torch.equal(vllm[f"{block}.routed_experts.w2_weight"][e],
                           grouped[f"{block}.down_proj"][e].T)
        assert torch.equal(vllm[f"{block}.routed_experts.w2_bias"][e],
                           grouped[f"{block}.down_proj_bias"][e])
    assert inspect(src).expert_pieces == ["gate", "up", "down", "gate_bias", "up_bias",
                                          "down_bias"]


def test_non_gated_experts_match_the_documented_layouts(family_checkpoints, tmp_path):
    """Nemotron-H's ReLU² experts have no gate: nemo holds up alone, [E, H, I] = up.T,
    under model.* as NeMo AutoModel does, and transformers names it up_proj [E, I, H] under
    model.* (= the model's state_dict)."""
    src = family_checkpoints["nemotron_h"]
    convert(src, tmp_path / "nemo", to="nemo")
    convert(src, tmp_path / "fused", to="transformers")
    hf, nemo, fused = load_all(src), load_all(tmp_path / "nemo"), load_all(tmp_path / "fused")
    block = "layers.2.mixer.experts"
    for e in range(6):
        up, down = (hf[f"backbone.{block}.{e}.{p}_proj.weight"] for p in ("up", "down"))
        assert torch.equal(nemo[f"model.{block}.gate_and_up_projs"][e], up.T)
        assert torch.equal(nemo[f"model.{block}.down_projs"][e], down.T)
        assert torch.equal(fused[f"model.{block}.up_proj"][e], up)
    assert nemo[f"model.{block}.gate_and_up_projs"].shape == (6, 32, 16)
    assert inspect(src).expert_pieces == ["up", "down"]


def test_nemo_tensors_match_the_documented_layout(family_checkpoints, tmp_path):
    src = family_checkpoints["qwen3_moe"]
    out = tmp_path / "nemo"
    convert(src, out, to="nemo")
    hf, nemo = load_all(src), load_all(out)
    block = "model.layers.1.mlp.experts"
    for e in range(6):
        gate, up, down = (hf[f"{block}.{e}.{p}_proj.weight"] for p in ("gate", "up", "down"))
        assert torch.equal(nemo[f"{block}.gate_and_up_projs"][e], torch.cat([gate.T, up.T], -1))
        assert torch.equal(nemo[f"{block}.down_projs"][e], down.T)
    assert nemo[f"{block}.gate_and_up_projs"].shape == (6, 32, 32)


def test_output_is_sharded_with_a_correct_index_and_records_its_layout(family_checkpoints,
                                                                         tmp_path):
    out = tmp_path / "vllm"
    convert(family_checkpoints["mixtral"], out, to="vllm", max_shard_size="30KB")
    index = json.loads((out / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(p.name for p in out.glob("*.safetensors"))
    total = 0
    for file in files:
        with safe_open(out / file, "pt") as f:
            assert f.metadata()["moekit.layout"] == "vllm"
            assert f.metadata()["moekit.family"] == "mixtral"
            for key in f.keys():
                assert index["weight_map"][key] == file
                total += f.get_tensor(key).nbytes
    assert index["metadata"]["total_size"] == total
    assert (out / "config.json").read_text() == (family_checkpoints["mixtral"] /
                                                 "config.json").read_text()
    assert ("model.layers.0.block_sparse_moe.experts.routed_experts.w13_weight"
            in index["weight_map"])


def test_bf16_round_trip(tmp_path):
    model = samples.build_model("qwen3_moe").to(torch.bfloat16)
    src = samples.save_model(model, tmp_path / "bf16")
    convert(src, tmp_path / "nemo", to="nemo")
    convert(tmp_path / "nemo", tmp_path / "back", to="hf")
    original, restored = load_all(src), load_all(tmp_path / "back")
    assert all(t.dtype == torch.bfloat16 for t in restored.values())
    assert all(same_bytes(original[k], restored[k]) for k in original)


@pytest.mark.parametrize("layout", ["vllm", "transformers"])
def test_byte_range_layouts_are_copied_by_the_kernel(layout, family_checkpoints, tmp_path,
                                                     monkeypatch):
    """HF <-> vllm/transformers (Qwen naming) are concatenations of whole source regions:
    every tensor goes through copy_file_range, none through user memory."""
    from moekit.safetensors_writer import ShardWriter

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was built in user memory")

    monkeypatch.setattr(ShardWriter, "write", refuse)
    src = family_checkpoints["qwen3_moe"]
    convert(src, tmp_path / layout, to=layout, max_shard_size="40KB")
    convert(tmp_path / layout, tmp_path / "back", to="hf", max_shard_size="40KB")
    original, restored = load_all(src), load_all(tmp_path / "back")
    assert original.keys() == restored.keys()
    assert all(same_bytes(original[k], restored[k]) for k in original)


@pytest.mark.parametrize("shape", [(0, 0), (0, 8), (4, 0)])
def test_an_empty_tensor_passes_through_both_ways(shape, family_checkpoints, tmp_path):
    """A tensor with a zero in its shape has no bytes: it is written with its shape and
    dtype, in either direction, beside converted experts."""
    import shutil

    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(family_checkpoints["qwen3_moe"] / "config.json", src)
    tensors = {**load_all(family_checkpoints["qwen3_moe"]),
               "lm_head.weight": torch.empty(shape, dtype=torch.bfloat16)}
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    convert(src, tmp_path / "nemo", to="nemo")
    convert(tmp_path / "nemo", tmp_path / "back", to="hf")
    restored = load_all(tmp_path / "back")
    assert restored["lm_head.weight"].shape == shape
    assert restored["lm_head.weight"].dtype == torch.bfloat16
    assert restored.keys() == tensors.keys()
    assert all(same_bytes(tensors[k], restored[k]) for k in tensors)
