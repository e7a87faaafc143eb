"""Hugging Face repo ids as checkpoint paths, read from a Hub cache built by hand (nothing
is downloaded): snapshots link into ``../../blobs`` as huggingface_hub lays them out."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants

import moekit
from moekit.cli import main

REPO = "tiny-org/tiny-moe"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, checkpoint: Path, repo: str = REPO, commit: str = COMMIT,
              refs: tuple[str, ...] = ("main",)) -> Path:
    """Put ``checkpoint``'s files into the Hub cache ``root`` as ``repo`` at ``commit``,
    with each of ``refs`` naming that commit: ``models--ORG--NAME/refs/REF`` holds the
    commit, ``snapshots/COMMIT/FILE`` links to ``../../blobs/SHA256``."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)
    for file in sorted(checkpoint.iterdir()):
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo_dir / "blobs" / blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache that huggingface_hub (already imported by transformers) and any
    child process use."""
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return root


def test_the_hand_built_cache_is_what_huggingface_hub_reads(cache, family_checkpoints):
    snapshot = hub_cache(cache, family_checkpoints["qwen3_moe"])
    found = huggingface_hub.try_to_load_from_cache(REPO, "config.json")
    assert found == str(snapshot / "config.json")


@pytest.mark.parametrize("tamper,said", [
    (lambda ref: ref.write_bytes(b"\xff\xfe"), "holds no commit hash"),
    (lambda ref: ref.write_text("../../../../outside"), "holds no commit hash"),
    (lambda ref: (ref.unlink(), os.mkfifo(ref)), "is not a plain file"),
])
def test_a_refs_file_that_names_no_commit_is_one_message(cache, family_checkpoints, capsys,
                                                         tamper, said):
    """huggingface_hub reads refs/main to find the snapshot: bytes that are not text, a
    path out of the cache or a pipe (which it would wait on forever) are refused first."""
    hub_cache(cache, family_checkpoints["qwen3_moe"])
    tamper(cache / f"models--{REPO.replace('/', '--')}" / "refs" / "main")
    assert main(["inspect", REPO]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err and "refs/main" in err and "Traceback" not in err


def test_every_command_reads_a_cached_repo_id(cache, family_checkpoints, tmp_path, capsys):
    local = family_checkpoints["qwen3_moe"]
    hub_cache(cache, local)
    for command in (["inspect", "--json"], ["plan", "--ep", "2", "--json"]):
        assert main([command[0], str(local), *command[1:]]) == 0
        expected = json.loads(capsys.readouterr().out)
        assert main([command[0], REPO, *command[1:]]) == 0
        got = json.loads(capsys.readouterr().out)
        if command[0] == "inspect":
            assert got.pop("path") != expected.pop("path")
        assert got == expected
    assert main(["verify", REPO, str(local)]) == 0
    assert main(["convert", REPO, str(tmp_path / "nemo"), "--to", "nemo"]) == 0
    assert main(["verify", str(tmp_path / "nemo"), str(local)]) == 0
    assert (tmp_path / "nemo" / "config.json").read_bytes() == (local / "config.json").read_bytes()
    assert moekit.inspect(REPO).n_experts == moekit.inspect(local).n_experts


def test_a_revision_is_a_branch_tag_or_commit(cache, family_checkpoints, capsys):
    hub_cache(cache, family_checkpoints["qwen3_moe"], refs=("main", "v1"))
    hub_cache(cache, family_checkpoints["olmoe"], commit="f" * 40, refs=("v2",))
    for name, family in ((REPO, "qwen3_moe"), (f"{REPO}@v1", "qwen3_moe"),
                         (f"{REPO}@{COMMIT}", "qwen3_moe"), (f"{REPO}@v2", "olmoe"),
                         (f"{REPO}@{'f' * 40}", "olmoe")):
        assert main(["inspect", name, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["family"] == family, name
    assert main(["inspect", f"{REPO}@v3"]) == 2
    assert "not (or not completely) in the local cache" in capsys.readouterr().err


def test_a_cached_config_alone_is_planned(cache, family_checkpoints, tmp_path, capsys):
    """``hf download ORG/NAME config.json`` is enough for ``moekit plan ORG/NAME``."""
    (tmp_path / "config-only").mkdir()
    config = family_checkpoints["qwen3_moe"] / "config.json"
    (tmp_path / "config-only" / "config.json").write_bytes(config.read_bytes())
    hub_cache(cache, tmp_path / "config-only")
    planned = []
    for name in (str(config), REPO):
        assert main(["plan", name, "--ep", "2", "--json"]) == 0
        planned.append(json.loads(capsys.readouterr().out))
    assert planned[0] == planned[1]


def test_an_expert_parallel_save_plans_from_a_cached_repo_ids_config(
        cache, family_checkpoints, tmp_path, monkeypatch):
    """``save_experts(config_from=ORG/NAME)`` plans from the cached snapshot's config.json,
    copies its files, and keeps the snapshot as a source no save may replace."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import moekit.expert_parallel.save as save_module

    source = family_checkpoints["qwen3_moe"]
    snapshot = hub_cache(cache, source)
    planned, plan = [], save_module.local_hf_plan

    def recorded(state_dict, mesh, layout, family=None, config=None):
        planned.append(config)
        return plan(state_dict, mesh, layout, family, config)

    monkeypatch.setattr(save_module, "local_hf_plan", recorded)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("ep",))
        state = moekit.load_experts(source, mesh)
        moekit.save_experts(state, tmp_path / "saved", mesh, config_from=REPO)
        with pytest.raises(moekit.MoekitError, match="is the source itself"):
            moekit.save_experts(state, snapshot, mesh, config_from=REPO, overwrite=True)
    finally:
        dist.destroy_process_group()
    assert planned[0] == json.loads((source / "config.json").read_text())
    assert (tmp_path / "saved" / "config.json").read_bytes() == (
        source / "config.json").read_bytes()
    assert moekit.verify(source, tmp_path / "saved").equal


def test_a_local_path_wins_over_a_repo_id(cache, family_checkpoints, tmp_path, monkeypatch,
                                          capsys):
    hub_cache(cache, family_checkpoints["qwen3_moe"])
    monkeypatch.chdir(tmp_path)
    shutil.copytree(family_checkpoints["olmoe"], tmp_path / REPO)
    assert main(["inspect", REPO, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "olmoe"
    assert moekit.inspect(Path("tiny-org") / "tiny-moe").family == "olmoe"


def test_a_repo_id_not_cached_is_one_message_saying_how_to_download_it(cache, capsys, tmp_path,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the relative "out" would be written
    for command in (["inspect", REPO], ["verify", REPO, REPO], ["plan", REPO, "--ep", "2"],
                    ["convert", f"{REPO}@v1", "out", "--to", "nemo", "--dry-run"],
                    ["upcycle", REPO, "out", "--experts", "4", "--top-k", "2", "--dry-run"]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert f"Hugging Face repository {command[1]} is not (or not completely) in the " \
               f"local cache {cache}" in err
        assert "pass --download" in err and f"hf download {REPO}" in err
    assert main(["convert", f"{REPO}@v1", "out", "--to", "nemo"]) == 2
    assert "hf download tiny-org/tiny-moe --revision v1" in capsys.readouterr().err
    assert not os.path.exists("out")



def test_a_repo_id_cached_in_part_says_how_to_download_the_rest(cache, family_checkpoints,
                                                               tmp_path, capsys):
    """A snapshot holding config.json alone (``plan --download``), or an index whose shard
    is missing or links to a blob that is gone, is the repository not yet cached, not a
    broken checkpoint to re-save."""
    snapshot = hub_cache(cache, family_checkpoints["qwen3_moe"])
    shard = snapshot / "model-00002-of-00005.safetensors"
    blob = shard.resolve()
    for damage, lacking in ((lambda: blob.rename(blob.with_suffix(".incomplete")),
                             "model-00002-of-00005.safetensors"),
                            (shard.unlink, "model-00002-of-00005.safetensors")):
        damage()
        for command in (["inspect", REPO], ["convert", REPO, str(tmp_path / "out"), "--to",
                                            "nemo"], ["verify", REPO, REPO]):
            assert main(command) == 2, command
            err = capsys.readouterr().err
            assert f"repository {REPO} is not (or not completely) in the local cache" in err
            assert f"its snapshot lacks {lacking}" in err and "pass --download" in err
            assert err.count("\n") == 1
    (tmp_path / "config-only").mkdir()
    config = family_checkpoints["olmoe"] / "config.json"
    (tmp_path / "config-only" / "config.json").write_bytes(config.read_bytes())
    hub_cache(cache, tmp_path / "config-only", repo="tiny-org/config-only")
    assert main(["inspect", "tiny-org/config-only"]) == 2
    assert "its snapshot lacks model.safetensors" in capsys.readouterr().err
    assert main(["plan", "tiny-org/config-only", "--ep", "2"]) == 0
    (snapshot / "model.safetensors.index.json").resolve().unlink()
    assert main(["inspect", REPO]) == 2
    assert "its snapshot lacks model.safetensors.index.json" in capsys.readouterr().err



@pytest.mark.parametrize("sharded", [True, False])
def test_download_fetches_only_the_weight_files_moekit_reads(cache, family_checkpoints,
                                                             tmp_path, monkeypatch, sharded):
    """What --download asks the Hub for: the index's files, or without an index the one
    file moekit reads then (``model.safetensors``), never every ``*.safetensors`` of the
    repository (consolidated copies, subfolders)."""
    import fnmatch

    from moekit import hub

    local = family_checkpoints["qwen3_moe"]
    repo_files = ["config.json", "consolidated.safetensors", "original/model.safetensors",
                  "model.safetensors" if not sharded else "model.safetensors.index.json",
                  *(p.name for p in local.glob("*.safetensors") if sharded)]
    fetched: list[str] = []

    def snapshot_download(repo, revision, local_files_only, allow_patterns):
        wanted = [f for f in repo_files if any(fnmatch.fnmatch(f, p) for p in allow_patterns)]
        fetched.extend(f for f in wanted if f not in fetched)
        folder = tmp_path / "snapshot"
        folder.mkdir(exist_ok=True)
        for name in wanted:
            if (local / name).exists():
                shutil.copyfile(local / name, folder / name)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    hub.download(REPO)
    assert "consolidated.safetensors" not in fetched
    assert "original/model.safetensors" not in fetched
    assert ("model.safetensors" in fetched) is not sharded


def test_hf_hub_offline_forbids_download(cache, family_checkpoints, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["inspect", REPO, "--download"]) == 2
    assert "HF_HUB_OFFLINE is set, so nothing is downloaded" in capsys.readouterr().err
    hub_cache(cache, family_checkpoints["qwen3_moe"])
    assert main(["inspect", REPO, "--download"]) == 0


def test_what_is_neither_a_path_nor_a_repo_id_is_a_missing_path(cache, capsys):
    for name in ("no/such/folder", "./tiny-moe", "a--b/c", "/abs/x", f"{REPO}@../../x",
                 f"{REPO}@", f"{REPO}@.", f"{REPO}@./main", f"{REPO}@main/", f"{REPO}@a//b",
                 f"{REPO}@.hidden", f"{REPO}@ma in", f"{REPO}@v1\n", f"{REPO}@a:b"):
        assert main(["inspect", name]) == 2
        assert "the path does not exist" in capsys.readouterr().err, name


def test_the_command_line_honours_hf_hub_cache_and_imports_no_hub_for_a_path(
        cache, family_checkpoints, tmp_path):
    hub_cache(cache, family_checkpoints["qwen3_moe"])
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    moekit_cli = Path(sys.executable).with_name("moekit")
    out = subprocess.run([moekit_cli, "inspect", REPO, "--json"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["family"] == "qwen3_moe"
    probe = ("import sys; from moekit.cli import main; main(['inspect', sys.argv[1]]); "
             "print('huggingface_hub' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe, str(family_checkpoints["olmoe"])],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "False"
