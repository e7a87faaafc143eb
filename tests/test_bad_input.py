"""Bad input: a clear message naming file/layer/expert, exit != 0, no output, no temporary
folder, and the input left byte-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit import samples
from moekit.checkpoint import INDEX_NAME
from moekit.cli import main

from .conftest import tree_digest


def edit_checkpoint(path: Path, edit) -> None:
    """Rewrite every shard through ``edit(tensors) -> tensors`` and fix up the index."""
    index_file = path / INDEX_NAME
    index = json.loads(index_file.read_text())
    weight_map = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors = edit(load_file(file))
        save_file(tensors, file, metadata={"format": "pt"})
        weight_map.update({k: file.name for k in tensors})
    index["weight_map"] = weight_map
    index_file.write_text(json.dumps(index))


def run_failing(capsys, args: list[str], workdir: Path, src: Path) -> str:
    """Run the CLI expecting failure; check nothing was written and src is untouched."""
    before_src = tree_digest(src) if src.exists() else None
    before = sorted(p.name for p in workdir.iterdir())
    code = main(args)
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    assert sorted(p.name for p in workdir.iterdir()) == before, "output or temp folder left behind"
    if before_src is not None:
        assert tree_digest(src) == before_src
    return err


def test_missing_experts_are_listed_by_layer_with_ranges(qwen3, tmp_path, capsys):
    def drop(tensors):
        return {k: v for k, v in tensors.items()
                if not any(f"layers.1.mlp.experts.{e}.down_proj" in k for e in (3, 4, 5))
                and "layers.2.mlp.experts.0." not in k}

    edit_checkpoint(qwen3, drop)
    err = run_failing(capsys, ["convert", str(qwen3), str(tmp_path / "out"), "--to", "nemo"],
                      tmp_path, qwen3)
    assert "layer 1: experts 3-5 lack down_proj" in err
    assert "layer 2: expert 0 lacks gate_proj, up_proj, down_proj" in err
    assert "model-0000" in err  # the file the layer is stored in


def test_wrong_shaped_expert_is_named_with_its_file(qwen3, tmp_path, capsys):
    key = "model.layers.2.mlp.experts.4.up_proj.weight"

    def reshape(tensors):
        if key in tensors:
            tensors[key] = tensors[key][:8].clone()
        return tensors

    edit_checkpoint(qwen3, reshape)
    err = run_failing(capsys, ["convert", str(qwen3), str(tmp_path / "out"), "--to", "vllm"],
                      tmp_path, qwen3)
    file = json.loads((qwen3 / INDEX_NAME).read_text())["weight_map"][key]
    assert "layer 2: expert 4 up_proj is [8, 32] F32, the other experts [16, 32] F32" in err
    assert file in err


def test_a_missing_router_is_named(qwen3, tmp_path, capsys):
    """A model loaded without its router would route by random weights."""
    edit_checkpoint(qwen3, lambda tensors: {k: v for k, v in tensors.items()
                                            if k != "model.layers.1.mlp.gate.weight"})
    err = run_failing(capsys, ["convert", str(qwen3), str(tmp_path / "out"), "--to", "nemo"],
                      tmp_path, qwen3)
    assert "layer 1: the router model.layers.1.mlp.gate.weight is missing" in err


def test_an_index_naming_a_shard_as_dot_slash_name_reads_it_as_that_file(qwen3, tmp_path,
                                                                         capsys):
    """``./model-00001-of-00002.safetensors`` and ``model-00001-of-00002.safetensors`` are
    one file, as transformers reads them."""
    index = json.loads((qwen3 / INDEX_NAME).read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "./" + index["weight_map"][key]
    (qwen3 / INDEX_NAME).write_text(json.dumps(index))
    assert main(["convert", str(qwen3), str(tmp_path / "out"), "--to", "nemo"]) == 0
    assert main(["verify", str(qwen3), str(tmp_path / "out")]) == 0


def test_a_refusal_of_one_shard_named_names_that_shard_not_its_folder(qwen3, tmp_path,
                                                                      capsys):
    shard = sorted(qwen3.glob("*.safetensors"))[0]
    err = run_failing(capsys, ["inspect", str(shard)], tmp_path, qwen3)
    assert f"{shard} (qwen3_moe, layout hf) is not a valid checkpoint" in err


def test_from_megatron_is_refused_for_files_that_are_not_a_megatron_checkpoint(qwen3, tmp_path,
                                                                               capsys):
    """Megatron-Core's layout is told apart by its folder, not by its keys: HF files named
    --from megatron would be read as theirs and reported as megatron."""
    err = run_failing(capsys, ["inspect", str(qwen3), "--from", "megatron"], tmp_path, qwen3)
    assert f"the megatron source layout is a Megatron-Core checkpoint folder's, which {qwen3} " \
           "is not" in err


def test_truncated_shard(qwen3, tmp_path, capsys):
    shard = sorted(qwen3.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    err = run_failing(capsys, ["convert", str(qwen3), str(tmp_path / "out"), "--to", "nemo"],
                      tmp_path, qwen3)
    assert shard.name in err and "truncated or corrupt" in err


def test_corrupt_header(qwen3, tmp_path, capsys):
    shard = sorted(qwen3.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json!!!!"
    shard.write_bytes(bytes(data))
    err = run_failing(capsys, ["inspect", str(qwen3)], tmp_path, qwen3)
    assert shard.name in err


def test_a_dtype_moekit_does_not_handle_is_named(qwen3, tmp_path, capsys):
    edit_checkpoint(qwen3, lambda t: {**t, "model.extra_scales": torch.zeros(
        4, dtype=torch.float8_e8m0fnu)} if "model.embed_tokens.weight" in t else t)
    err = run_failing(capsys, ["inspect", str(qwen3)], tmp_path, qwen3)
    assert "model.extra_scales" in err and "F8_E8M0" in err


def test_index_naming_a_missing_file(qwen3, tmp_path, capsys):
    shard = sorted(qwen3.glob("*.safetensors"))[-1]
    shard.unlink()
    err = run_failing(capsys, ["convert", str(qwen3), str(tmp_path / "out"), "--to", "nemo"],
                      tmp_path, qwen3)
    assert shard.name in err and INDEX_NAME in err


def test_missing_path(tmp_path, capsys):
    missing = tmp_path / "nope"
    err = run_failing(capsys, ["convert", str(missing), str(tmp_path / "out"), "--to", "nemo"],
                      tmp_path, missing)
    assert str(missing) in err and "does not exist" in err


def test_dense_model_asked_for_a_grouped_layout(tmp_path, capsys):
    dense = samples.save_model(samples.build_model("llama"), tmp_path / "llama")
    err = run_failing(capsys, ["convert", str(dense), str(tmp_path / "out"), "--to", "nemo"],
                      tmp_path, dense)
    assert "dense" in err and "upcycle" in err


def test_existing_destination_is_refused_unless_overwrite(qwen3, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("precious")
    err = run_failing(capsys, ["convert", str(qwen3), str(out), "--to", "nemo"], tmp_path, qwen3)
    assert "already exists" in err and "--overwrite" in err
    err = run_failing(capsys, ["convert", str(qwen3), str(out), "--to", "nemo", "--overwrite"],
                      tmp_path, qwen3)
    assert "holds no weights" in err  # a tokenizer alone is no checkpoint
    assert (out / "tokenizer.json").read_text() == "precious"
    save_file({"w": torch.zeros(2)}, out / "model.safetensors")
    assert main(["convert", str(qwen3), str(out), "--to", "nemo", "--overwrite"]) == 0
    assert not (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "qwen3"]


@pytest.mark.parametrize("inside", ["sub", "."])
def test_destination_inside_the_source(qwen3, tmp_path, capsys, inside):
    dst = qwen3 / inside
    err = run_failing(capsys, ["convert", str(qwen3), str(dst), "--to", "nemo", "--overwrite"],
                      qwen3, qwen3)
    assert "inside the source" in err


def test_destination_holding_the_source_is_refused(qwen3, tmp_path, capsys):
    err = run_failing(capsys, ["convert", str(qwen3), str(tmp_path), "--to", "nemo",
                               "--overwrite"], tmp_path, qwen3)
    assert "contains the source" in err


def test_failure_while_writing_leaves_nothing(qwen3, tmp_path, monkeypatch):
    from moekit.executors import streaming

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(streaming, "fill", explode)
    before = tree_digest(qwen3)
    with pytest.raises(OSError):
        from moekit import convert

        convert(qwen3, tmp_path / "out", to="nemo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen3"]
    assert tree_digest(qwen3) == before


def test_undetectable_layout_names_the_tensor(qwen3, tmp_path, capsys):
    def rename(tensors):
        return {k.replace("experts.1.up_proj", "experts.1.upper_proj"): v
                for k, v in tensors.items()}

    edit_checkpoint(qwen3, rename)
    err = run_failing(capsys, ["inspect", str(qwen3)], tmp_path, qwen3)
    assert "model.layers.0.mlp.experts.1.upper_proj.weight" in err


def test_unknown_expert_count_mismatch_with_config(qwen3, tmp_path, capsys):
    config = json.loads((qwen3 / "config.json").read_text())
    config["num_experts"] = config["num_local_experts"] = 8  # both names transformers reads
    (qwen3 / "config.json").write_text(json.dumps(config))
    err = run_failing(capsys, ["convert", str(qwen3), str(tmp_path / "o"), "--to", "nemo"],
                      tmp_path, qwen3)
    assert "layer 0: experts 6-7 lack gate_proj, up_proj, down_proj" in err


@pytest.mark.parametrize("command", ["convert", "upcycle"])
def test_a_bad_shard_size_is_refused_by_a_dry_run_too(qwen3, tmp_path, capsys, command):
    """convert and upcycle validate their output options in one pipeline, so that a dry run
    refuses what the write would."""
    if command == "convert":
        src, args = qwen3, ["--to", "nemo"]
    else:
        src = samples.save_model(samples.build_model("llama"), tmp_path / "llama")
        args = ["--experts", "4", "--top-k", "2"]
    for dry_run in ([], ["--dry-run"]):
        code = main([command, str(src), str(tmp_path / "out"), *args,
                     "--max-shard-size", "banana", *dry_run])
        err = capsys.readouterr().err
        assert code == 2 and "banana" in err and "Traceback" not in err
        assert not (tmp_path / "out").exists()


def test_a_whole_model_folder_without_its_config_is_refused_not_read_as_dense(
        family_checkpoints, tmp_path, capsys):
    """torchtitan's names are read back through the family's rules: without the config.json
    that names the family, the folder is refused (detected or named with --from), instead
    of passing as a dense model under torchtitan's names."""
    folder = tmp_path / "torchtitan"
    assert main(["convert", str(family_checkpoints["qwen3_moe"]), str(folder),
                 "--to", "torchtitan"]) == 0
    (folder / "config.json").unlink()
    capsys.readouterr()
    for extra, expected in (([], "holds torchtitan's names (layers.0.moe.routed_experts"),
                            (["--from", "torchtitan"], "no config.json beside it names")):
        assert main(["convert", str(folder), str(tmp_path / "back"), "--to", "hf",
                     *extra]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err
        assert not (tmp_path / "back").exists()
