"""verify, inspect, --dry-run, the in-memory API and the adapter."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit import ExpertAdapter, PlanError, convert_state_dict, planner, samples
from moekit.cli import main
from moekit.errors import compress_ranges
from moekit.gc_pauses import without_gc_pauses
from moekit.layouts import layout_named

from .conftest import load_all, same_bytes, tree_digest


def test_verify_equal_across_layouts_and_names_a_changed_tensor(family_checkpoints, tmp_path,
                                                                capsys):
    src = family_checkpoints["qwen2_moe"]
    assert main(["convert", str(src), str(tmp_path / "nemo"), "--to", "nemo"]) == 0
    capsys.readouterr()
    assert main(["verify", str(src), str(tmp_path / "nemo")]) == 0
    assert "bit-identical" in capsys.readouterr().out

    nemo = tmp_path / "nemo" / "model.safetensors"
    tensors = load_file(nemo)
    tensors["model.layers.2.mlp.experts.down_projs"][3, 0, 0] += 1.0
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] += 1.0
    save_file(tensors, nemo, metadata={"format": "pt", "moekit.layout": "nemo"})
    assert main(["verify", str(src), str(tmp_path / "nemo"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["equal"]
    assert sorted(d.split(":")[0] for d in report["differences"]) == [
        "model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.experts.3.down_proj.weight"]
    assert "1 of" in report["differences"][0]


def test_inspect_reports_the_checkpoint(family_checkpoints, capsys):
    assert main(["inspect", str(family_checkpoints["deepseek_v3"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "deepseek_v3" and info["layout"] == "hf"
    assert info["moe_layers"] == [1, 2] and info["dense_layers"] == [0]
    assert (info["n_experts"], info["hidden_size"], info["expert_intermediate_size"]) == (6, 32, 16)
    assert info["shared_expert_intermediate_size"] == 16
    assert info["dtypes"] == {"F32": info["total_bytes"]}
    assert sum(info["layer_bytes"].values()) < info["total_bytes"]

    assert main(["inspect", str(family_checkpoints["qwen2_moe"])]) == 0
    text = capsys.readouterr().out
    assert "E=6, I=16, H=32" in text and "shared expert     I=48" in text
    assert "dense layers      1" in text


def test_inspect_detects_grouped_layouts(family_checkpoints, tmp_path, capsys):
    for layout in ("nemo", "vllm", "transformers"):
        out = tmp_path / layout
        main(["convert", str(family_checkpoints["phimoe"]), str(out), "--to", layout])
        for meta in (True, False):
            if not meta:  # without moekit's metadata, detection relies on the keys
                tensors = load_all(out)
                (out / "model.safetensors").unlink()
                save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
            capsys.readouterr()
            assert main(["inspect", str(out), "--json"]) == 0
            info = json.loads(capsys.readouterr().out)
            assert (info["layout"], info["family"], info["n_experts"]) == (layout, "phimoe", 6)


def test_dry_run_validates_and_writes_nothing(family_checkpoints, tmp_path, capsys):
    src = family_checkpoints["olmoe"]
    before = tree_digest(src)
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "nemo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.experts.gate_and_up_projs [6, 32, 48] F32" in out
    assert "stack(cat(T(model.layers.0.mlp.experts.0.gate_proj.weight)" in out
    assert list(tmp_path.iterdir()) == [] and tree_digest(src) == before


@pytest.mark.parametrize("command", [["inspect"], ["convert", "DST", "--to", "nemo", "--dry-run"],
                                     ["plan", "--ep", "3"]],
                         ids=["inspect", "convert --dry-run", "plan"])
def test_header_only_commands_import_no_torch(command, family_checkpoints, tmp_path):
    """Reading headers and planning need no torch: these commands answer in a fraction of
    a second."""
    argv = [command[0], str(family_checkpoints["qwen3_moe"]),
            *[str(tmp_path / "out") if a == "DST" else a for a in command[1:]]]
    script = ("import sys; from moekit.cli import main; "
              f"assert main({argv!r}) == 0; "
              "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_planning_runs_without_gc_pauses(family_checkpoints, monkeypatch):
    seen = []
    for name in ("analyse", "select_experts"):
        real = getattr(planner, name)
        monkeypatch.setattr(planner, name, lambda *a, real=real, **k: seen.append(
            (real.__name__, gc.isenabled())) or real(*a, **k))
    checkpoint, analysis = planner.analyse_checkpoint(family_checkpoints["qwen3_moe"])
    planner.build_plan(analysis, layout_named("nemo"))
    assert set(seen) == {("analyse", False), ("select_experts", False)} and gc.isenabled()


def test_the_collector_is_back_on_after_an_error():
    @without_gc_pauses
    def fail() -> None:
        raise ValueError

    with pytest.raises(ValueError):
        fail()
    assert gc.isenabled()


def test_help_everywhere(capsys):
    for command in ([], ["inspect"], ["convert"], ["verify"], ["demo"]):
        with pytest.raises(SystemExit) as done:
            main([*command, "--help"])
        assert done.value.code == 0
        assert "usage: moekit" in capsys.readouterr().out


@pytest.mark.parametrize("layout", ["nemo", "transformers", "vllm"])
def test_convert_state_dict_round_trip(layout, family_models):
    model = family_models["mixtral"]
    hf = load_all_from_model(model)
    grouped = convert_state_dict(hf, "hf", layout, family="mixtral")
    back = convert_state_dict(grouped, layout, "hf", family="mixtral")
    assert back.keys() == hf.keys()
    assert all(same_bytes(back[k], hf[k]) for k in hf)
    assert back["model.norm.weight"] is hf["model.norm.weight"], "non-experts pass through"
    if layout == "transformers":
        expected = model.state_dict()
        assert grouped.keys() == expected.keys()
        assert all(torch.equal(grouped[k], expected[k]) for k in expected)


def test_adapter_validates_everything_at_once(family_models):
    hf = load_all_from_model(family_models["qwen3_moe"])
    adapter = ExpertAdapter("nemo", family="qwen3_moe", n_experts=6)
    grouped = adapter.from_hf(hf)
    assert grouped["model.layers.0.mlp.experts.gate_and_up_projs"].shape == (6, 32, 32)
    assert adapter.to_hf(grouped).keys() == hf.keys()
    broken = {k: v for k, v in hf.items() if ".experts.2.up" not in k and ".experts.5." not in k}
    with pytest.raises(PlanError) as err:
        adapter.from_hf(broken)
    for layer in range(3):
        assert f"layer {layer}: expert 2 lacks up_proj" in str(err.value)
        assert f"layer {layer}: expert 5 lacks gate_proj, up_proj, down_proj" in str(err.value)


def test_adapter_refuses_a_grouped_tensor_with_too_few_experts(family_models):
    hf = load_all_from_model(family_models["qwen3_moe"])
    adapter = ExpertAdapter("nemo", family="qwen3_moe", n_experts=6)
    grouped = adapter.from_hf(hf)
    key = "model.layers.1.mlp.experts.down_projs"
    grouped[key] = grouped[key][:4]
    with pytest.raises(PlanError) as err:
        adapter.to_hf(grouped)
    assert "layer 1: experts 4-5 lack down" in str(err.value)
    assert "disagree on the expert count" in str(err.value)


def test_compress_ranges():
    assert compress_ranges([7, 0, 1, 2, 5, 8]) == "0-2, 5, 7-8"
    assert compress_ranges([]) == ""


def load_all_from_model(model) -> dict[str, torch.Tensor]:
    """The HF per-expert state dict transformers writes for ``model``, read back."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return load_all(samples.save_model(model, tmp))
