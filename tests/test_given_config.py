"""``--config`` (``config=``): the model's config.json named for a checkpoint that has none,
or read instead of its own, without writing anything into the checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import moekit
from moekit.cli import main

from .conftest import load_all, same_bytes
from .test_input_trust import replace_by_a_copy, rewrite_in_place


def _files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def without_config(family_checkpoints, tmp_path) -> tuple[Path, Path]:
    """A copy of the Qwen3-MoE checkpoint without its config.json, and that config.json
    under another name, elsewhere."""
    folder = tmp_path / "step-1000"
    shutil.copytree(family_checkpoints["qwen3_moe"], folder)
    config = tmp_path / "qwen3-moe.json"
    (folder / "config.json").rename(config)
    return folder, config


def test_a_checkpoint_without_config_is_read_by_the_config_named(without_config, tmp_path):
    folder, config = without_config
    before = _files(folder)
    assert main(["convert", str(folder), str(tmp_path / "bare"), "--to", "nemo"]) == 0
    assert not (tmp_path / "bare" / "config.json").exists()  # (its keys name its family)
    out = tmp_path / "out"
    assert main(["convert", str(folder), str(out), "--to", "nemo", "--config", str(config)]) == 0
    back = tmp_path / "back"
    assert main(["convert", str(out), str(back), "--to", "hf"]) == 0
    assert (out / "config.json").read_bytes() == config.read_bytes()
    original, returned = load_all(folder), load_all(back)
    assert original.keys() == returned.keys()
    assert all(same_bytes(original[k], returned[k]) for k in original)
    assert _files(folder) == before


def test_a_config_named_replaces_the_checkpoints_own_in_the_output(family_checkpoints,
                                                                   tmp_path):
    src = family_checkpoints["qwen3_moe"]
    own = json.loads((src / "config.json").read_text())
    given = tmp_path / "config.json"
    given.write_text(json.dumps({**own, "rope_theta": 12345.0}))
    moekit.convert(src, tmp_path / "out", to="nemo", config=given)
    assert (tmp_path / "out" / "config.json").read_bytes() == given.read_bytes()
    untyped = tmp_path / "untyped.json"
    untyped.write_text(json.dumps({k: v for k, v in own.items() if k != "model_type"}))
    assert moekit.inspect(src).model_type == "qwen3_moe"
    assert moekit.inspect(src, config=untyped).model_type is None  # (its keys name it)


@pytest.mark.parametrize("own", ["a link to nothing", "a link out of the folder"])
def test_a_config_named_replaces_a_broken_own_config(own, without_config, tmp_path):
    # The checkpoint's own config.json is not read, so it cannot stand in the way.
    folder, config = without_config
    target = tmp_path / ("gone.json" if own == "a link to nothing" else "elsewhere.json")
    if own != "a link to nothing":
        target.write_text("{}")
    (folder / "config.json").symlink_to(target)
    moekit.convert(folder, tmp_path / "out", to="nemo", config=config)
    assert (tmp_path / "out" / "config.json").read_bytes() == config.read_bytes()


def test_a_config_folder_gives_its_tokenizer_where_the_checkpoint_has_none(without_config,
                                                                           tmp_path):
    folder, config = without_config
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(config, model / "config.json")
    (model / "tokenizer.json").write_text('{"model": "tokenizer"}')
    (model / "generation_config.json").write_text('{"model": "defaults"}')
    (model / "LICENSE").write_text("the model's licence")
    (model / "README.md").write_text("the model's card")
    (folder / "generation_config.json").write_text('{"checkpoint": "defaults"}')
    moekit.convert(folder, tmp_path / "out", to="nemo", config=model)
    out = tmp_path / "out"
    assert (out / "config.json").read_bytes() == config.read_bytes()
    assert (out / "tokenizer.json").read_text() == '{"model": "tokenizer"}'
    assert (out / "LICENSE").read_text() == "the model's licence"
    assert (out / "generation_config.json").read_text() == '{"checkpoint": "defaults"}'
    assert not (out / "README.md").exists()  # (it describes the model, not this checkpoint)
    assert not (folder / "tokenizer.json").exists()


def test_load_reads_by_the_config_named(without_config, family_checkpoints):
    folder, config = without_config
    loaded = moekit.load(folder, "nemo", config=config)
    expected = moekit.load(family_checkpoints["qwen3_moe"], "nemo")
    assert loaded.keys() == expected.keys()
    assert all(same_bytes(loaded[k], expected[k]) for k in expected)


@pytest.mark.parametrize("given, message", [
    ("absent.json", "absent.json does not exist"),
    ("qwen3.jsn", "qwen3.jsn does not exist"),
    ("", "the config named is an empty path"),
    ("empty-folder", "holds no config.json"),
    ("broken.json", "broken.json"),
    ("list.json", "list.json"),
])
def test_a_bad_config_is_refused_naming_it(given, message, without_config, tmp_path, capsys):
    folder, _ = without_config
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "broken.json").write_text('{"model_type": ')
    (tmp_path / "list.json").write_text("[1, 2]")
    out = tmp_path / "out"
    assert main(["convert", str(folder), str(out), "--to", "nemo",
                 "--config", str(tmp_path / given) if given else ""]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("download", [False, True])
def test_a_json_name_is_a_path_never_a_hub_repo(download, without_config, tmp_path,
                                                monkeypatch, capsys):
    # "configs/qwen3.json" reads as ORG/NAME: a typo in it must not go to the Hub.
    import moekit.hub

    folder, _ = without_config
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(moekit.hub, "_snapshot", lambda *args: pytest.fail("asked the Hub"))
    assert main(["convert", str(folder), "out", "--to", "nemo", "--config",
                 "configs/qwen3.json", *(["--download"] if download else [])]) == 2
    assert "configs/qwen3.json does not exist" in capsys.readouterr().err


def test_a_destination_holding_the_config_named_is_not_replaced(without_config, tmp_path,
                                                                capsys):
    # The config named is a source file like the weights: --overwrite never deletes it.
    folder, config = without_config
    dst = tmp_path / "old-export"
    shutil.copytree(folder, dst)
    kept = dst / "config.json"
    shutil.copy(config, kept)
    assert main(["convert", str(folder), str(dst), "--to", "nemo", "--overwrite",
                 "--config", str(kept)]) == 2
    assert "the data of the source's config.json" in capsys.readouterr().err
    assert kept.read_bytes() == config.read_bytes() and (dst / "model.safetensors.index.json"
                                                         ).exists()


def test_plan_reads_a_training_checkpoint_by_the_config_named(family_checkpoints, tmp_path,
                                                              capsys):
    # A torchtitan folder is planned from its headers, which its names need a config for.
    src = family_checkpoints["qwen3_moe"]
    titan = tmp_path / "titan"
    moekit.convert(src, titan, to="torchtitan")
    assert main(["plan", str(titan), "--ep", "2", "--dp", "2", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    (titan / "config.json").unlink()
    assert main(["plan", str(titan), "--ep", "2"]) == 2
    assert "--config" in capsys.readouterr().err
    assert main(["plan", str(titan), "--ep", "2", "--dp", "2", "--json",
                 "--config", str(src / "config.json")]) == 0
    assert json.loads(capsys.readouterr().out) == expected
    assert main(["plan", str(src), "--ep", "2", "--dp", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == expected  # (the same tensors)


@pytest.mark.parametrize("name", ["qwen3-moe.json", "model/tokenizer.json"])
@pytest.mark.parametrize("change, expected", [
    (rewrite_in_place, "it was modified"), (replace_by_a_copy, "replaced by another file")])
def test_a_config_named_that_changes_during_a_conversion_is_refused(
        name, change, expected, without_config, tmp_path, monkeypatch, capsys):
    # The output is planned from the config as it was read: one changed by the copy is
    # refused as a checkpoint's own sidecar is, not copied beside weights planned without it.
    from moekit import conversion

    folder, config = without_config
    (tmp_path / "model").mkdir()
    shutil.copy(config, tmp_path / "model" / "config.json")
    (tmp_path / "model" / "tokenizer.json").write_text('{"version": "1.0"}')
    given = config if name == "qwen3-moe.json" else tmp_path / "model"
    write_plan = conversion.write_plan

    def changed_then_written(*args, **kwargs):
        change(tmp_path / name)
        write_plan(*args, **kwargs)

    monkeypatch.setattr(conversion, "write_plan", changed_then_written)
    assert main(["convert", str(folder), str(tmp_path / "out"), "--to", "nemo",
                 "--config", str(given)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / name} changed since moekit opened the checkpoint" in err, err
    assert expected in err and not (tmp_path / "out").exists()
