"""Output safety: the final move never replaces what was not checked, --overwrite replaces
only a checkpoint holding no byte of the source, outputs are durable and get the umask's
mode, signals clean up as Ctrl-C does, leftovers of killed runs are handled, and every file
system works (another file system, full, read-only, busy, too large) with one message and
nothing left behind. convert, upcycle and save_experts share these guarantees."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from moekit import MoekitError, conversion, convert, output, samples, verify
from moekit.cli import main

from . import ep_workers
from .conftest import tree_digest

REPO = Path(__file__).resolve().parents[1]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def run_cli(capsys, *args: object) -> tuple[int, str]:
    """The CLI's exit code and stderr; never a traceback."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture
def mount(tmp_path):
    """``mount(name, *arguments)``: ``mount ARGUMENTS`` at ``tmp_path / name`` for the test
    (skipped where this machine does not allow it)."""
    mounted: list[Path] = []

    def run(name: str, *arguments: str) -> Path:
        if shutil.which("mount") is None:
            pytest.skip("no mount command here")
        point = tmp_path / name
        point.mkdir(exist_ok=True)
        done = subprocess.run(["mount", *arguments, str(point)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield run
    for point in reversed(mounted):
        subprocess.run(["umount", str(point)], check=True)


@pytest.fixture
def tmpfs(mount):
    """``tmpfs(name, options)``: a fresh tmpfs mounted at ``tmp_path / name`` for the test."""
    return lambda name="tmpfs", options="size=64m": mount(name, "-t", "tmpfs", "-o", options,
                                                           "tmpfs")


@pytest.fixture
def bind(mount):
    """``bind(folder, name)``: ``folder`` bind-mounted at ``tmp_path / name`` for the test."""
    return lambda folder, name: mount(name, "--bind", str(folder))


@pytest.fixture(params=["renameat2", "without renameat2 flags"])
def move(request, monkeypatch) -> str:
    """Each test runs with renameat2's flags, and as on a file system without them (NFS),
    where an exclusive mkdir and a rename aside take their place."""
    if request.param != "renameat2":
        def unsupported(src, dst, flags):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(src), None, str(dst))

        monkeypatch.setattr(output, "_renameat2", unsupported)
    return request.param


# -- the final move -------------------------------------------------------------------------

def test_a_destination_that_appears_while_writing_is_kept(qwen3, tmp_path, capsys, monkeypatch,
                                                          move):
    out = tmp_path / "out"
    write_plan = conversion.write_plan

    def then_someone_makes_it(*args, **kwargs):
        write_plan(*args, **kwargs)
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")

    monkeypatch.setattr(conversion, "write_plan", then_someone_makes_it)
    code, err = run_cli(capsys, "convert", qwen3, out, "--to", "nemo")
    assert code == 2 and "appeared" in err and str(out) in err
    assert names(out) == ["theirs.txt"] and names(tmp_path) == ["out", "qwen3"]


def test_two_runs_to_one_destination_exactly_one_succeeds(qwen3, tmp_path, monkeypatch, move):
    out = tmp_path / "out"
    both_written = threading.Barrier(2, timeout=60)
    write_plan = conversion.write_plan

    def write_then_wait(*args, **kwargs):
        write_plan(*args, **kwargs)
        both_written.wait()

    def run(results: list[str]) -> None:
        try:
            convert(qwen3, out, to="nemo")
            results.append("ok")
        except MoekitError as err:
            results.append(str(err))

    monkeypatch.setattr(conversion, "write_plan", write_then_wait)
    results: list[str] = []
    threads = [threading.Thread(target=run, args=(results,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results)[0].startswith("destination") and "appeared" in sorted(results)[0]
    assert sorted(results)[1] == "ok"
    assert verify(qwen3, out).equal and names(tmp_path) == ["out", "qwen3"]


def test_without_renameat2_the_claimed_destination_is_kept_if_filled_meanwhile(
        qwen3, tmp_path, capsys, monkeypatch):
    """The fallback claims the destination with mkdir and renames onto the empty claim:
    a file put there in between makes the rename fail, and the folder is kept."""
    out = tmp_path / "out"
    mkdir = os.mkdir

    def unsupported(src, dst, flags):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(src), None, str(dst))

    def claimed_then_filled(path, *args, **kwargs):
        mkdir(path, *args, **kwargs)
        if Path(path) == out:
            (out / "theirs.txt").write_text("theirs")

    monkeypatch.setattr(output, "_renameat2", unsupported)
    monkeypatch.setattr(output.os, "mkdir", claimed_then_filled)
    code, err = run_cli(capsys, "convert", qwen3, out, "--to", "nemo")
    assert code == 2 and "appeared" in one_error(err)
    assert names(out) == ["theirs.txt"] and names(tmp_path) == ["out", "qwen3"]


# -- --overwrite ----------------------------------------------------------------------------

OVERWRITTEN_WITH_MORE = [(("--to", "nemo"), extra) for extra in
                         ("notes.txt", "thesis.pdf", "other-model/")] + [
    (("--to", "megatron"), extra)
    for extra in ("iter_0000000/notes.txt", "iter_0000000/optimizer/", "iter_12/")]
"""(how the folder at DST is written, a file or folder more in it): an HF checkpoint
folder, then a Megatron-Core folder holding more than its iterations."""


@pytest.mark.parametrize("written_as,extra", OVERWRITTEN_WITH_MORE)
def test_overwrite_refuses_a_folder_holding_more_than_a_checkpoint(qwen3, tmp_path, capsys,
                                                                  written_as, extra):
    out = tmp_path / "out"
    if written_as == ("--to", "megatron"):
        assert run_cli(capsys, "convert", qwen3, out, *written_as)[0] == 0
    else:
        shutil.copytree(qwen3, out)
    if extra == "other-model/":
        shutil.copytree(qwen3, out / extra)
    elif extra.endswith("/"):
        (out / extra).mkdir()
        (out / extra / "state.pt").write_text("precious")
    else:
        (out / extra).write_text("precious")
    before = tree_digest(out)
    code, err = run_cli(capsys, "convert", qwen3, out, *written_as, "--overwrite")
    assert code == 2 and extra in err and "only a folder holding a checkpoint" in err
    assert tree_digest(out) == before and names(tmp_path) == ["out", "qwen3"]


@pytest.mark.parametrize("files,said", [
    ({"README.md": "notes", "LICENSE.txt": "x", "modeling_mine.py": "print(1)",
      "config.json": "{}"}, "holds no weights"),
    ({"thesis.safetensors": "not a tensor file", "config.json": "{}"},
     "thesis.safetensors, which is not a safetensors file"),
    ({".metadata": "my notes", "README.md": "notes"},
     ".metadata, which is not a torch.distributed.checkpoint .metadata"),
    ({"pytorch_model.bin": "not pickled", "config.json": "{}"},
     "pytorch_model.bin, which is not a torch.save file"),
    ({"__0_0.distcp": "data", "config.json": "{}"}, "holds .distcp files without their "
     ".metadata (an unfinished torch.distributed.checkpoint save)"),
])
def test_overwrite_refuses_a_folder_of_checkpoint_names_without_weights(qwen3, tmp_path, capsys,
                                                                       files, said):
    """Names alone do not make a checkpoint: a project folder of a README, a licence and
    modeling code, or a file named .safetensors that is none, is not replaced."""
    out = tmp_path / "out"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    before = tree_digest(out)
    code, err = run_cli(capsys, "convert", qwen3, out, "--to", "nemo", "--overwrite")
    assert code == 2 and said in one_error(err)
    assert tree_digest(out) == before and names(tmp_path) == ["out", "qwen3"]


@pytest.mark.parametrize("command,role", [
    (("convert", "{src}", "", "--to", "nemo", "--overwrite"), "destination"),
    (("convert", "", "out", "--to", "nemo"), "checkpoint"),
    (("upcycle", "{dense}", "", "--experts", "4", "--top-k", "2", "--overwrite"),
     "destination"),
    (("verify", "{src}", ""), "checkpoint"),
    (("demo", "--out", ""), "--out"),
])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(qwen3, tmp_path, capsys,
                                                                  monkeypatch, command, role):
    """An empty argument (an unset variable in a script) is never the current folder,
    which ``--overwrite`` would replace."""
    work = Path(shutil.copytree(qwen3, tmp_path / "work"))
    before = tree_digest(work)
    monkeypatch.chdir(work)
    dense = samples.save_model(samples.build_model("llama"), tmp_path / "llama")
    code, err = run_cli(capsys, *(part.format(src=qwen3, dense=dense) for part in command))
    assert code == 2 and f"error: the {role} path is empty" in one_error(err)
    assert tree_digest(work) == before


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_overwrite_replaces_a_pytorch_model_bin_checkpoint(qwen3, tmp_path, capsys, legacy):
    import torch

    out = tmp_path / "out"
    out.mkdir()
    torch.save({"w": torch.ones(2)}, out / "pytorch_model.bin",
               _use_new_zipfile_serialization=not legacy)
    (out / "config.json").write_text("{}")
    code, _ = run_cli(capsys, "convert", qwen3, out, "--to", "nemo", "--overwrite")
    assert code == 0 and verify(qwen3, out).equal


def test_overwrite_replaces_an_empty_folder(qwen3, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    code, _ = run_cli(capsys, "convert", qwen3, tmp_path / "out", "--to", "nemo", "--overwrite")
    assert code == 0 and verify(qwen3, tmp_path / "out").equal


def test_overwrite_replaces_a_checkpoint_and_its_sidecar_files(qwen3, tmp_path, capsys, move):
    out = Path(shutil.copytree(qwen3, tmp_path / "out"))
    for sidecar in ("tokenizer.json", "README.md", "chat_template.jinja", "merges.txt"):
        (out / sidecar).write_text("old")
    code, _ = run_cli(capsys, "convert", qwen3, out, "--to", "nemo", "--overwrite")
    assert code == 0 and verify(qwen3, out).equal and output.MARKER not in names(out)
    assert not (out / "tokenizer.json").exists() and names(tmp_path) == ["out", "qwen3"]


def test_a_file_written_into_the_destination_as_it_is_replaced_is_kept(
        qwen3, tmp_path, capsys, monkeypatch, caplog, move):
    """What comes into the destination between the last check and the swap is not
    deleted with the checkpoint it held: that folder is kept beside, holding it alone."""
    out = Path(shutil.copytree(qwen3, tmp_path / "out"))
    checked_files = output._checked_files

    def then_someone_writes_there(folder):
        checked = checked_files(folder)
        (out / "notes.txt").write_text("mine")
        return checked

    monkeypatch.setattr(output, "_checked_files", then_someone_writes_there)
    with caplog.at_level(logging.WARNING, logger="moekit"):
        code, _ = run_cli(capsys, "convert", qwen3, out, "--to", "nemo", "--overwrite")
    assert code == 0 and verify(qwen3, out).equal and "notes.txt" not in names(out)
    [kept] = [p for p in tmp_path.iterdir() if p.name.startswith(".out.moekit-")]
    assert names(kept) == ["notes.txt"] and (kept / "notes.txt").read_text() == "mine"
    assert f"kept {kept}" in caplog.text and "notes.txt" in caplog.text


def test_a_parent_that_cannot_be_synced_after_the_swap_still_keeps_what_came_in(
        qwen3, tmp_path, capsys, monkeypatch, move):
    """A failed fsync of the destination's parent once the new checkpoint is in place is
    reported, and the replaced checkpoint is still removed file by checked file: what
    came into the destination meanwhile is kept."""
    out = Path(shutil.copytree(qwen3, tmp_path / "out"))
    checked_files, fsync_dir = output._checked_files, output._fsync_dir

    def then_someone_writes_there(folder):
        checked = checked_files(folder)
        (out / "notes.txt").write_text("mine")
        return checked

    def failing_for_the_parent(folder):
        if Path(folder) == tmp_path:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        fsync_dir(folder)

    monkeypatch.setattr(output, "_checked_files", then_someone_writes_there)
    monkeypatch.setattr(output, "_fsync_dir", failing_for_the_parent)
    code, err = run_cli(capsys, "convert", qwen3, out, "--to", "nemo", "--overwrite")
    assert code == 2 and f"wrote {out}, but {tmp_path} could not be synced (Input/output error)" \
        in err and verify(qwen3, out).equal
    [kept] = [p for p in tmp_path.iterdir() if p.name not in ("out", "qwen3")]
    assert names(kept) == ["notes.txt"] and (kept / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where,said", [("view/src/out", "is inside the source"),
                                        ("view/src", "is the source"),
                                        ("view", "contains the source")])
def test_the_source_reached_through_a_bind_mount_is_never_written(qwen3, tmp_path, capsys,
                                                                   bind, where, said):
    source = Path(shutil.copytree(qwen3, tmp_path / "outer" / "src"))
    bind(tmp_path / "outer", "view")
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    for overwrite in ((), ("--overwrite",)):
        code, err = run_cli(capsys, "convert", source, tmp_path / where, "--to", "nemo",
                            *overwrite)
        assert code == 2 and said in one_error(err) and "bind mount" in err
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


@pytest.mark.parametrize("written_as", [("--to", "megatron"),
                                        ("--to", "nemo", "--format", "dcp")])
def test_overwrite_replaces_a_megatron_or_dcp_checkpoint(qwen3, tmp_path, capsys, written_as):
    out = tmp_path / "out"
    assert run_cli(capsys, "convert", qwen3, out, *written_as)[0] == 0
    (out / "config.json").write_text("{}")
    code, _ = run_cli(capsys, "convert", qwen3, out, *written_as, "--overwrite")
    assert code == 0 and verify(qwen3, out).equal and names(tmp_path) == ["out", "qwen3"]
    assert (out / "config.json").read_bytes() == (qwen3 / "config.json").read_bytes()



def test_overwrite_never_replaces_an_iteration_folder_holding_a_hard_link_of_the_source(
        qwen3, tmp_path, capsys):
    source, out = tmp_path / "megatron", tmp_path / "out"
    assert run_cli(capsys, "convert", qwen3, source, "--to", "megatron")[0] == 0
    assert run_cli(capsys, "convert", source, out, "--to", "megatron")[0] == 0
    for file in (out / "iter_0000000").glob("*.distcp"):
        file.unlink()
        os.link(source / "iter_0000000" / file.name, file)
    before = tree_digest(out)
    code, err = run_cli(capsys, "convert", source, out, "--to", "megatron", "--overwrite")
    assert code == 2 and "iter_0000000/" in err and "same file as the source's" in err
    assert tree_digest(out) == before


def test_an_overwrite_that_fails_at_the_move_keeps_the_old_checkpoint(qwen3, tmp_path, capsys,
                                                                     monkeypatch):
    out = Path(shutil.copytree(qwen3, tmp_path / "out"))
    before = tree_digest(out)

    def unsupported(src, dst, flags):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    def fail(folder, target, appeared):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(target))

    monkeypatch.setattr(output, "_renameat2", unsupported)
    monkeypatch.setattr(output, "_move_into_claimed_folder", fail)
    code, err = run_cli(capsys, "convert", qwen3, out, "--to", "nemo", "--overwrite")
    assert code == 2 and "I/O error" in err
    assert tree_digest(out) == before and names(tmp_path) == ["out", "qwen3"]


def hf_cache(src: Path, root: Path) -> Path:
    """``src`` laid out as the Hugging Face cache keeps a model: its files in ``blobs/``
    under their hashes, a snapshot folder of symlinks to them; return the snapshot."""
    repo = root / "models--org--qwen3"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in src.iterdir():
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / blob)
        (snapshot / file.name).symlink_to(f"../../blobs/{blob}")
    return snapshot


@pytest.mark.parametrize("dst,found", [
    ("models--org--qwen3/blobs", "holds"), ("models--org--qwen3/snapshots/0123abcd", "is the source"),
    ("models--org--qwen3/snapshots", "contains"), ("models--org--qwen3", "contains")])
def test_overwrite_never_replaces_a_folder_holding_bytes_of_the_source(qwen3, tmp_path, capsys,
                                                                      dst, found):
    snapshot = hf_cache(qwen3, tmp_path / "hub")
    before = tree_digest(tmp_path / "hub")
    code, err = run_cli(capsys, "convert", snapshot, tmp_path / "hub" / dst, "--to", "nemo",
                        "--overwrite")
    assert code == 2 and found in err and "source" in err
    assert tree_digest(tmp_path / "hub") == before and names(tmp_path) == ["hub", "qwen3"]


def test_overwrite_never_replaces_a_folder_holding_a_hard_link_of_the_source(qwen3, tmp_path,
                                                                            capsys):
    out = tmp_path / "out"
    out.mkdir()
    for file in qwen3.iterdir():
        os.link(file, out / file.name)
    code, err = run_cli(capsys, "convert", qwen3, out, "--to", "nemo", "--overwrite")
    assert code == 2 and "same file as the source" in err
    assert tree_digest(out) == tree_digest(qwen3)


def test_a_checkpoint_in_the_hf_cache_converts(qwen3, tmp_path):
    snapshot = hf_cache(qwen3, tmp_path / "hub")
    convert(snapshot, tmp_path / "out", to="nemo")
    assert verify(qwen3, tmp_path / "out").equal


def test_a_symlinked_destination_keeps_its_link_and_its_folder_is_replaced(qwen3, tmp_path,
                                                                          capsys, move):
    folder = Path(shutil.copytree(qwen3, tmp_path / "disk" / "old"))
    link = tmp_path / "link"
    link.symlink_to(folder)
    code, err = run_cli(capsys, "convert", qwen3, link, "--to", "nemo")
    assert code == 2 and "already exists" in err
    code, _ = run_cli(capsys, "convert", qwen3, link, "--to", "nemo", "--overwrite")
    assert code == 0 and link.is_symlink() and link.resolve() == folder
    assert verify(qwen3, folder).equal and names(folder) == names(qwen3_as_nemo(qwen3, tmp_path))
    assert names(tmp_path) == ["disk", "link", "qwen3", "reference"]
    assert names(tmp_path / "disk") == ["old"]


def qwen3_as_nemo(qwen3: Path, tmp_path: Path) -> Path:
    """What ``convert --to nemo`` writes for the sample (to compare file names with)."""
    reference = tmp_path / "reference"
    convert(qwen3, reference, to="nemo")
    return reference


def test_a_dangling_symlink_destination_is_refused(qwen3, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    code, err = run_cli(capsys, "convert", qwen3, link, "--to", "nemo", "--overwrite")
    assert code == 2 and "not a folder" in err
    assert link.is_symlink() and names(tmp_path) == ["link", "qwen3"]


def one_error(err: str) -> str:
    """The one ``moekit: error:`` line of ``err``."""
    assert err.count("moekit: error:") == 1 and err.endswith("\n") and err.count("\n") == 1, err
    return err


def make_loop(tmp_path: Path) -> Path:
    (tmp_path / "loop").symlink_to("loop")
    return tmp_path / "loop"


def make_loop_above(tmp_path: Path) -> Path:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    return tmp_path / "a" / "out"


def make_dangling(tmp_path: Path) -> Path:
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    return tmp_path / "link"


def make_below_a_file(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("a file")
    return tmp_path / "file" / "sub" / "out"


def make_below_a_dangling_link(tmp_path: Path) -> Path:
    """``out -> elsewhere/dir``, neither of which exists: ``mkdir -p out/x/model`` would
    make ``elsewhere/dir/x``, folders the user never named."""
    (tmp_path / "out").symlink_to(tmp_path / "elsewhere" / "dir")
    return tmp_path / "out" / "x" / "model"


@pytest.mark.parametrize("make,expected", [
    (make_loop, "loop of symbolic links"), (make_loop_above, "loop of symbolic links"),
    (make_dangling, "which does not exist"), (make_below_a_file, "file is a file, not a folder"),
    (make_below_a_dangling_link, "out is a symbolic link to "),
    (lambda tmp_path: tmp_path / ("n" * 256), "at most 255 bytes")])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_destination_that_cannot_be_made_is_one_message(qwen3, tmp_path, capsys, make,
                                                          expected, overwrite):
    dst = make(tmp_path)
    before = names(tmp_path)
    code, err = run_cli(capsys, "convert", qwen3, dst, "--to", "nemo", *overwrite)
    assert code == 2 and expected in one_error(err)
    with pytest.raises(MoekitError, match=expected):
        convert(qwen3, dst, to="nemo", overwrite=bool(overwrite))
    assert names(tmp_path) == before


def test_a_destination_below_a_symlinked_folder_is_written_there(qwen3, tmp_path, capsys):
    """A link to a folder that exists is followed, as ``mkdir -p`` follows it: the folders
    missing below it are made in the folder it leads to."""
    (tmp_path / "disk").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "disk")
    code, _ = run_cli(capsys, "convert", qwen3, tmp_path / "out" / "x" / "model", "--to", "nemo")
    assert code == 0 and verify(qwen3, tmp_path / "disk" / "x" / "model").equal
    assert names(tmp_path) == ["disk", "out", "qwen3"] and (tmp_path / "out").is_symlink()


@pytest.mark.parametrize("name", ["x" * 255, "é" * 127, "model \u202e\x1b[2J"])
def test_a_long_or_odd_destination_name_converts_and_leaves_nothing_beside(qwen3, tmp_path,
                                                                         capsys, name):
    """A temporary folder's name adds ``.`` and ``.moekit-XXXXXXXX`` to the destination's;
    where that would pass 255 bytes it is shortened (with a digest of the name)."""
    code, _ = run_cli(capsys, "convert", qwen3, tmp_path / name, "--to", "nemo")
    assert code == 0 and verify(qwen3, tmp_path / name).equal
    assert names(tmp_path) == sorted([name, "qwen3"])
    assert output.MARKER not in names(tmp_path / name)
    prefix = output._temp_prefix(tmp_path / name)
    assert len(os.fsencode(prefix)) + len("old-") + 8 <= 255


def test_a_leftover_beside_a_long_destination_name_is_found(qwen3, tmp_path, caplog):
    out = tmp_path / ("x" * 250)
    running = output.OutputFolder(out)  # a run of this (live) process
    with caplog.at_level(logging.WARNING, logger="moekit"):
        convert(qwen3, out, to="nemo")
    assert f"found {running.folder}" in caplog.text and "still running" in caplog.text
    running.discard()
    assert names(tmp_path) == sorted([out.name, "qwen3"])


@pytest.mark.parametrize("dst", [".", "..", "/"])
def test_dot_dotdot_and_root_are_refused_as_holding_the_source(qwen3, capsys, monkeypatch, dst):
    monkeypatch.chdir(qwen3)
    code, err = run_cli(capsys, "convert", ".", dst, "--to", "nemo", "--overwrite")
    assert code == 2 and ("is the source itself" in err or "contains the source" in err)


def test_relative_paths_and_trailing_slashes(qwen3, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _ = run_cli(capsys, "convert", "qwen3/", "out/", "--to", "nemo")
    assert code == 0 and verify(qwen3, tmp_path / "out").equal
    code, _ = run_cli(capsys, "convert", "./qwen3", "./out/", "--to", "hf", "--overwrite")
    assert code == 0 and names(tmp_path) == ["out", "qwen3"]
    shutil.copytree(qwen3, "my model")
    code, _ = run_cli(capsys, "convert", "my model", "a folder/my model nemo", "--to", "nemo")
    assert code == 0 and verify(qwen3, tmp_path / "a folder" / "my model nemo").equal


def test_a_failure_writing_the_marker_leaves_no_folder(qwen3, tmp_path, capsys, monkeypatch):
    """A file system with room for a folder but not for a file in it (ENOSPC, EDQUOT)."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(output, "_owner", full)
    code, err = run_cli(capsys, "convert", qwen3, tmp_path / "new" / "out", "--to", "nemo")
    assert code == 2 and "full" in one_error(err) and names(tmp_path) == ["qwen3"]


# -- durability and modes -------------------------------------------------------------------

def test_files_and_folder_are_synced_before_the_move_and_the_parent_after(qwen3, tmp_path,
                                                                         monkeypatch):
    events: list[tuple[str, str]] = []
    fsync, rename = os.fsync, output._renameat2

    def record_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def record_move(src, dst, flags) -> None:
        events.append(("move", str(dst)))
        rename(src, dst, flags)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(output, "_renameat2", record_move)
    out = tmp_path.resolve() / "out"
    convert(qwen3, out, to="nemo")
    moved = events.index(("move", str(out)))
    before = [Path(p) for kind, p in events[:moved] if kind == "fsync"]
    temporary = [p for p in before if p.name.startswith(".out.moekit-")]
    assert len(temporary) == 1, "the folder itself is synced before the move"
    assert {p.name for p in before if p.parent == temporary[0]} == set(names(out))
    assert ("fsync", str(out.parent)) in events[moved + 1:]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def fsync_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("moekit-fsync")]


def test_a_finished_shard_is_synced_while_the_next_is_written(qwen3, tmp_path, monkeypatch):
    """The first shard's fsync runs in the background: the last shard's write can wait for
    it to begin (were the files synced after the last is written, it would wait in vain)."""
    from moekit.executors import streaming

    first_syncing, overlapped = threading.Event(), []
    fsync, write_shard = os.fsync, streaming.write_shard

    def note_the_first(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("model-00001-of-00004.safetensors"):
            first_syncing.set()
        fsync(fd)

    def wait_for_it(path, *args, **kwargs):
        if path.name.startswith("model-00004-"):
            overlapped.append(first_syncing.wait(timeout=60))
        write_shard(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", note_the_first)
    monkeypatch.setattr(streaming, "write_shard", wait_for_it)
    convert(qwen3, tmp_path / "out", to="vllm", max_shard_size="60KB")
    assert overlapped == [True] and verify(qwen3, tmp_path / "out").equal


@pytest.mark.parametrize("code,advice", [(errno.ENOSPC, "full"), (errno.EIO, "I/O error")])
@pytest.mark.parametrize("which", ["00001", "00004"])
def test_a_background_fsync_error_is_one_message_and_leaves_nothing(
        qwen3, tmp_path, capsys, monkeypatch, code, advice, which):
    """A shard whose fsync fails (the first: met while later shards are written; the last:
    met at the commit) fails the run with one message; no file or thread is left open."""
    fsync = os.fsync

    def fail(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(f"model-{which}-of-00004.safetensors"):
            raise OSError(code, os.strerror(code))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", fail)
    fds = open_fds()
    out = tmp_path / "out"
    exit_code, err = run_cli(capsys, "convert", qwen3, out, "--to", "vllm",
                             "--max-shard-size", "60KB")
    assert exit_code == 2 and f"cannot write {out}" in one_error(err) and advice in err
    assert "nothing was left behind" in err and names(tmp_path) == ["qwen3"]
    assert open_fds() == fds and not fsync_threads()


def test_an_interrupt_during_a_background_fsync_cleans_up(qwen3, tmp_path, monkeypatch):
    """Ctrl-C while the first shard is being synced: the fsync under way ends (its file
    closed) before the folder is removed, and nothing is left."""
    from moekit.executors import streaming

    fsync, write_shard = os.fsync, streaming.write_shard
    syncing, synced = threading.Event(), threading.Event()

    def slow(fd: int) -> None:
        syncing.set()
        fsync(fd)
        threading.Event().wait(0.3)
        synced.set()

    def interrupt_the_second(path, *args, **kwargs):
        if path.name.startswith("model-00002-"):
            assert syncing.wait(timeout=60)
            raise KeyboardInterrupt
        write_shard(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", slow)
    monkeypatch.setattr(streaming, "write_shard", interrupt_the_second)
    fds = open_fds()
    with pytest.raises(KeyboardInterrupt):
        convert(qwen3, tmp_path / "out", to="vllm", max_shard_size="60KB")
    assert synced.is_set() and names(tmp_path) == ["qwen3"]
    assert open_fds() == fds and not fsync_threads()


class _InterruptedStream:
    """A file stream whose ``at``-th write raises KeyboardInterrupt, as a signal's handler
    does while the file is written."""

    def __init__(self, stream, at: int) -> None:
        self._stream, self._left = stream, at

    def write(self, data) -> int:
        self._left -= 1
        if self._left == 0:
            raise KeyboardInterrupt
        return self._stream.write(data)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def test_an_interrupt_while_torch_save_writes_a_dcp_file_is_raised_as_itself(qwen3, tmp_path,
                                                                             monkeypatch):
    """torch.save turns what a write raised into its own RuntimeError ("unexpected pos"):
    the interrupt is raised as itself, for the CLI to report the signal, and nothing is
    left behind."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    create_stream = FileSystem.create_stream

    @contextmanager
    def interrupting(self, path, mode):
        with create_stream(self, path, mode) as stream:
            yield _InterruptedStream(stream, at=3)

    monkeypatch.setattr(FileSystem, "create_stream", interrupting)
    with pytest.raises(KeyboardInterrupt):
        convert(qwen3, tmp_path / "out", to="nemo", format="dcp")
    assert names(tmp_path) == ["qwen3"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_mode_the_umask_allows(qwen3, tmp_path, umask):
    previous = os.umask(umask)
    try:
        convert(qwen3, tmp_path / "nemo", to="nemo")  # written with direct I/O
        convert(tmp_path / "nemo", tmp_path / "hf", to="hf")  # copied by the kernel
    finally:
        os.umask(previous)
    for folder in (tmp_path / "nemo", tmp_path / "hf"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
        for shard in folder.glob("*.safetensors"):
            assert stat.S_IMODE(shard.stat().st_mode) == 0o666 & ~umask


# -- signals and leftovers ------------------------------------------------------------------

SLOW_CONVERT = """
import signal, sys, time
signal.signal(signal.SIGHUP, signal.SIG_DFL)
from moekit.cli import main
from moekit.executors import streaming

write_shard = streaming.write_shard

def write_then_wait(*args, **kwargs):
    write_shard(*args, **kwargs)
    print("writing", flush=True)
    time.sleep(120)

streaming.write_shard = write_then_wait
sys.exit(main(sys.argv[1:]))
"""


def start_slow_converts(src: Path, outs: list[Path]) -> list[subprocess.Popen]:
    """CLI converts (started together) that stop after their first shard; returned once
    each is writing."""
    children = [subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERT, "convert", str(src), str(out), "--to", "nemo",
         "--max-shard-size", "20KB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}) for out in outs]
    for child, out in zip(children, outs):
        assert child.stdout.readline() == "writing\n", child.communicate()[1]
        assert any(p.name.startswith(f".{out.name}.moekit-") for p in out.parent.iterdir())
    return children


def test_sigterm_and_sighup_clean_up_as_ctrl_c_does(qwen3, tmp_path):
    signals = [signal.SIGTERM, signal.SIGHUP]
    children = start_slow_converts(qwen3, [tmp_path / s.name for s in signals])
    for child, signum in zip(children, signals):
        child.send_signal(signum)
        _, err = child.communicate(timeout=60)
        assert child.returncode == 128 + signum
        assert f"interrupted by {signum.name}" in err and "Traceback" not in err
    assert names(tmp_path) == ["qwen3"]


def test_an_interrupt_while_the_result_is_printed_says_the_output_is_in_place(
        qwen3, tmp_path, capsys, monkeypatch):
    """A paused terminal or a slow pipe can hold the last lines, and a signal then: the
    output was complete and in place before them, and the message says so."""
    from moekit import cli

    printable = cli.printable

    def interrupted_at_the_last_line(text: str) -> str:
        if text.startswith("wrote "):
            raise KeyboardInterrupt
        return printable(text)

    monkeypatch.setattr(cli, "printable", interrupted_at_the_last_line)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "convert", qwen3, out, "--to", "nemo")
    assert code == 130 and f"after {out} was written in full and put in place" in err
    assert verify(qwen3, out).equal


def test_a_full_standard_output_after_the_output_is_in_place_says_so(qwen3, tmp_path):
    out = tmp_path / "out"
    with open("/dev/full", "w") as full:
        child = subprocess.run([sys.executable, "-m", "moekit.cli", "convert", str(qwen3),
                                str(out), "--to", "nemo"], stdout=full, stderr=subprocess.PIPE,
                               text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.returncode == 2 and "Traceback" not in child.stderr
    assert f"wrote {out} in full and put it in place, then: No space left" in child.stderr
    assert verify(qwen3, out).equal


SIGNAL_AT_THE_MOVE = """
import os, signal, sys
from moekit import output
from moekit.cli import main

signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal gives it

rename = output._renameat2

def rename_then_signal(src, dst, flags):
    os.kill(os.getpid(), signal.SIGNUM)  # held until the move is complete
    rename(src, dst, flags)

output._renameat2 = rename_then_signal
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_at_the_final_move_waits_for_it_and_says_so(qwen3, tmp_path, signum):
    out = tmp_path / "out"
    child = subprocess.run(
        [sys.executable, "-c", SIGNAL_AT_THE_MOVE.replace("SIGNUM", signum.name), "convert",
         str(qwen3), str(out), "--to", "nemo"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.returncode == 128 + signum, child.stderr
    assert f"after {out} was written in full and put in place" in child.stderr
    assert "Traceback" not in child.stderr
    assert verify(qwen3, out).equal and names(tmp_path) == ["out", "qwen3"]


def test_ctrl_c_during_an_overwrite_keeps_one_whole_checkpoint(qwen3, tmp_path, monkeypatch):
    """Interrupted at the exchange: the new checkpoint is in place, the old one removed, and
    the caller learns of the interrupt (``in_place`` names the output)."""
    out = Path(shutil.copytree(qwen3, tmp_path / "out"))
    reference = qwen3_as_nemo(qwen3, tmp_path)
    rename = output._renameat2

    def rename_then_interrupt(src, dst, flags):
        os.kill(os.getpid(), signal.SIGINT)
        rename(src, dst, flags)

    monkeypatch.setattr(output, "_renameat2", rename_then_interrupt)
    with pytest.raises(KeyboardInterrupt) as caught:
        convert(qwen3, out, to="nemo", overwrite=True)
    assert output.in_place(caught.value) == out
    assert verify(qwen3, out).equal and names(out) == names(reference)
    assert names(tmp_path) == ["out", "qwen3", "reference"]


def test_ctrl_c_during_the_clean_up_does_not_cut_it_short(qwen3, tmp_path, monkeypatch):
    rmtree = shutil.rmtree

    def fail(*args, **kwargs):
        raise MoekitError("bad input found while writing")

    def interrupted_rmtree(path, *args, **kwargs):
        if Path(path).name.startswith(".out.moekit-"):
            os.kill(os.getpid(), signal.SIGINT)
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(conversion, "write_plan", fail)
    monkeypatch.setattr(output.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt) as caught:
        convert(qwen3, tmp_path / "new" / "out", to="nemo")
    assert output.in_place(caught.value) is None
    assert names(tmp_path) == ["qwen3"]


def test_the_cli_keeps_ignored_signals_ignored_and_restores_handlers(qwen3, tmp_path, capsys,
                                                                    monkeypatch):
    """``nohup moekit ...`` stays immune to SIGHUP; a caller's handlers come back after."""
    during = {}
    write_plan = conversion.write_plan

    def record_handlers(*args, **kwargs):
        during.update({s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)})
        write_plan(*args, **kwargs)

    def callers_handler(signum, frame):
        raise AssertionError("not called")

    monkeypatch.setattr(conversion, "write_plan", record_handlers)
    term = signal.signal(signal.SIGTERM, callers_handler)
    hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        code, _ = run_cli(capsys, "convert", qwen3, tmp_path / "out", "--to", "nemo")
        after = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    finally:
        signal.signal(signal.SIGTERM, term)
        signal.signal(signal.SIGHUP, hup)
    assert code == 0 and during[signal.SIGHUP] is signal.SIG_IGN
    assert during[signal.SIGTERM] not in (callers_handler, signal.SIG_DFL)
    assert after == {signal.SIGTERM: callers_handler, signal.SIGHUP: signal.SIG_IGN}


def test_a_folder_left_by_a_killed_run_is_removed_by_the_next_run(qwen3, tmp_path, caplog):
    [child] = start_slow_converts(qwen3, [tmp_path / "out"])
    child.kill()
    child.communicate(timeout=60)
    [left] = [p for p in tmp_path.iterdir() if p.name.startswith(".out.moekit-")]
    with caplog.at_level(logging.WARNING, logger="moekit"):
        convert(qwen3, tmp_path / "out", to="nemo")
    assert f"removed {left}" in caplog.text
    assert names(tmp_path) == ["out", "qwen3"]


def test_an_interrupt_while_a_leftover_is_removed_leaves_it_marked(qwen3, tmp_path,
                                                                    monkeypatch):
    """The marker naming the dead run is removed last, with interrupts held: a leftover
    whose removal is cut short is still known as that run's, and removed by the next."""
    [child] = start_slow_converts(qwen3, [tmp_path / "out"])
    child.kill()
    child.communicate(timeout=60)
    [left] = [p for p in tmp_path.iterdir() if p.name.startswith(".out.moekit-")]
    unlink, removed = os.unlink, []

    def noting(path, *args, **kwargs):
        removed.append(Path(path).name)
        if len(removed) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # held until the removal is done
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", noting)
    with pytest.raises(KeyboardInterrupt):
        output.remove_if_abandoned(left)
    monkeypatch.undo()
    assert removed[-1] == output.MARKER and not left.exists()


def test_a_leftover_not_provably_abandoned_is_kept_and_reported(qwen3, tmp_path, caplog):
    unmarked = tmp_path / ".out.moekit-old-0123abcd"
    shutil.copytree(qwen3, unmarked)
    running = output.OutputFolder(tmp_path / "out")  # a run of this (live) process
    with caplog.at_level(logging.WARNING, logger="moekit"):
        convert(qwen3, tmp_path / "out", to="nemo")
    assert f"found {unmarked}" in caplog.text and "no moekit marker" in caplog.text
    assert f"found {running.folder}" in caplog.text and "still running" in caplog.text
    assert unmarked.is_dir() and running.folder.is_dir()
    running.discard()


HERE = "0123456789abcdef0123456789abcdef"
"""The machine id the leftover tests give this machine."""
OTHER = "fedcba9876543210fedcba9876543210"


@pytest.fixture
def machine_id(tmp_path, monkeypatch) -> Path:
    """This machine's id read from a file of the test (``HERE``, until a test rewrites it),
    never from the real /etc/machine-id; the second place moekit looks is missing."""
    file = tmp_path / "machine-id"
    file.write_text(HERE + "\n")
    monkeypatch.setattr(output, "MACHINE_ID_FILES", (str(file), str(tmp_path / "no-dbus-id")))
    return file


def dead_pid() -> int:
    """The pid of a process that has ended (and been waited for)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def marked_leftover(tmp_path: Path, **marker: object) -> Path:
    """A temporary folder of ``tmp_path / "out"`` holding a file and a marker naming an
    ended process of this host, boot and PID namespace, with the entries of ``marker``
    changed (None: left out, as a marker of an older moekit leaves out ``machine``)."""
    folder = tmp_path / ".out.moekit-0123abcd"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"part of a checkpoint")
    owner = {**output._owner(), "pid": dead_pid(), "machine": HERE, **marker}
    (folder / output.MARKER).write_text(json.dumps({k: v for k, v in owner.items()
                                                    if v is not None}))
    return folder


def test_a_leftover_of_another_machine_of_the_same_host_name_is_kept(qwen3, tmp_path, caplog,
                                                                     machine_id):
    """Two machines (pods, clones of one image) named alike that share the file system: a
    boot id unlike this one's proves nothing about the other machine's run, which may
    still be writing. The report names the folder, to remove by hand."""
    left = marked_leftover(tmp_path, machine=OTHER, boot="another boot")
    with caplog.at_level(logging.WARNING, logger="moekit"):
        convert(qwen3, tmp_path / "out", to="nemo")
    assert f"found {left}" in caplog.text and f"machine id {OTHER}" in caplog.text
    assert f"remove it by hand (rm -r {left})" in caplog.text
    assert names(left) == [output.MARKER, "model.safetensors"]


BEFORE_BOOT = 1.0
"""A marker's modification time before any boot: written before this machine booted."""


@pytest.mark.parametrize("marker,this_machine,written,kept", [
    ({"boot": "an earlier boot"}, HERE, BEFORE_BOOT, None),
    ({"boot": "an earlier boot"}, HERE, None, "a copy of this machine's image"),
    ({}, HERE, None, None),
    ({"machine": OTHER}, HERE, None, None),
    ({"machine": OTHER, "boot": "an earlier boot"}, HERE, BEFORE_BOOT, "another machine"),
    ({"boot": "an earlier boot"}, "", BEFORE_BOOT, "this machine has no machine id"),
    ({"boot": "an earlier boot"}, "uninitialized", BEFORE_BOOT,
     "this machine has no machine id"),
    ({"boot": "an earlier boot", "machine": None}, HERE, BEFORE_BOOT, "names no machine id"),
    ({"machine": None}, HERE, None, None),
    ({"machine": None}, "", None, None),
    ({"machine": None, "host": "elsewhere"}, HERE, None, "made on elsewhere"),
], ids=["this machine, rebooted since", "this machine's id, written since this boot",
        "this boot, process ended", "this boot, another machine id (the same kernel)",
        "another machine", "no machine id here", "machine id not made yet",
        "older marker, another boot", "older marker, this boot", "no machine ids, this boot",
        "another host name"])
def test_a_leftover_is_removed_only_when_its_writer_is_provably_gone(
        tmp_path, machine_id, marker, this_machine, written, kept):
    """Its writer is gone when its marker names this boot (the same kernel, whatever the
    machine ids say) and an ended process, or this machine (by machine id) and a time
    before this machine booted: a machine cloned from one image may share the id."""
    left = marked_leftover(tmp_path, **marker)
    if written is not None:
        os.utime(left / output.MARKER, (written, written))
    machine_id.write_text(this_machine)
    reason = output.remove_if_abandoned(left)
    if kept is None:
        assert reason is None and not left.exists()
    else:
        assert kept in reason and names(left) == [output.MARKER, "model.safetensors"]


@pytest.mark.parametrize("marker", ["pipe", "large", "link"])
def test_a_marker_that_is_no_marker_keeps_its_folder_at_once(tmp_path, marker):
    """A pipe would hang the read, a large file fill memory, a link lead anywhere: the
    folder is kept (reported as holding no marker) without waiting or reading much."""
    left = marked_leftover(tmp_path)  # of an ended process of this machine: removable
    text = (left / output.MARKER).read_text()
    (left / output.MARKER).unlink()
    if marker == "pipe":
        os.mkfifo(left / output.MARKER)
    elif marker == "large":
        (left / output.MARKER).write_text(text + " " * output.MAX_MARKER_BYTES)
    else:
        (tmp_path / "elsewhere").write_text(text)
        (left / output.MARKER).symlink_to(tmp_path / "elsewhere")
    found = []
    judge = threading.Thread(target=lambda: found.append(output.remove_if_abandoned(left)),
                             daemon=True)
    judge.start()
    judge.join(30)
    assert found and "holds no moekit marker" in found[0]
    assert output.MARKER in names(left)


# -- file systems ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nemo", "hf"])
def test_a_destination_on_another_file_system(qwen3, tmp_path, tmpfs, layout):
    """hf is copied byte range by byte range (copy_file_range refuses EXDEV across file
    systems), nemo is built and written with direct I/O where tmpfs allows it."""
    other = tmpfs()
    assert other.stat().st_dev != tmp_path.stat().st_dev
    convert(qwen3, tmp_path / "disk", to=layout)
    convert(qwen3, other / "out", to=layout)
    assert tree_digest(other / "out") == tree_digest(tmp_path / "disk")
    assert names(other) == ["out"]


def test_an_upcycle_onto_another_file_system(tmp_path, tmpfs, capsys):
    dense = samples.save_model(samples.build_model("llama"), tmp_path / "llama")
    other = tmpfs()
    for out in (tmp_path / "disk", other / "out"):
        code, _ = run_cli(capsys, "upcycle", dense, out, "--experts", "4", "--top-k", "2")
        assert code == 0
    assert tree_digest(other / "out") == tree_digest(tmp_path / "disk")


def test_a_full_disk(qwen3, tmp_path, tmpfs, capsys):
    small = tmpfs("small", "size=64k")
    out = small / "new" / "out"  # its parent is made, and removed again
    code, err = run_cli(capsys, "convert", qwen3, out, "--to", "nemo")
    assert code == 2 and str(out) in err and "full" in err
    assert names(small) == []


@pytest.mark.parametrize("options", [["--to", "torchtitan"], ["--to", "megatron"],
                                     ["--to", "nemo", "--format", "dcp"]])
def test_a_full_disk_under_a_dcp_output(qwen3, tmp_path, tmpfs, capsys, options):
    """torch.save inside DCP's writer meets the full disk (and reports it as a RuntimeError
    of its own); the CLI gives the message a safetensors output gives."""
    small = tmpfs("small", "size=64k")
    out = small / "new" / "out"
    code, err = run_cli(capsys, "convert", qwen3, out, *options)
    assert code == 2 and f"cannot write {out}: No space left on device" in one_error(err)
    assert "the file system is full" in err and "nothing was left behind" in err
    assert names(small) == []


def test_a_disk_filled_before_megatron_writes_its_common_file(qwen3, tmp_path, tmpfs, capsys,
                                                             monkeypatch):
    """The DCP files fit; the disk fills (another program's file) just before the
    Megatron-Core folder's common.pt is written."""
    from moekit.dcp import DcpFolder

    small = tmpfs("small", "size=1m")
    write = DcpFolder.write

    def write_then_fill_the_disk(self, plan, source, folder, *args, **kwargs):
        write(self, plan, source, folder, *args, **kwargs)
        theirs = os.open(small / "theirs", os.O_WRONLY | os.O_CREAT)
        with suppress(OSError):
            while True:
                os.write(theirs, bytes(4096))
        os.close(theirs)

    monkeypatch.setattr(DcpFolder, "write", write_then_fill_the_disk)
    out = small / "out"
    code, err = run_cli(capsys, "convert", qwen3, out, "--to", "megatron")
    assert code == 2 and f"cannot write {out}: No space left on device" in one_error(err)
    assert names(small) == ["theirs"]


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """RLIMIT_FSIZE set to ``limit`` bytes (SIGXFSZ ignored): a write past it fails with
    EFBIG, as a file system with a file-size limit makes it fail."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, xfsz)


def test_a_dcp_file_larger_than_the_file_system_allows(qwen3, tmp_path, capsys):
    """As above where no tmpfs can be mounted: RLIMIT_FSIZE fails DCP's writes (EFBIG)."""
    with file_size_limit(16 * 1024):
        code, err = run_cli(capsys, "convert", qwen3, tmp_path / "out", "--to", "torchtitan")
    assert code == 2 and f"cannot write {tmp_path / 'out'}: File too large" in one_error(err)
    assert "--max-shard-size" in err and names(tmp_path) == ["qwen3"]


def test_a_read_only_destination(qwen3, tmp_path, tmpfs, capsys):
    read_only = tmpfs("ro", "ro,size=1m")
    code, err = run_cli(capsys, "convert", qwen3, read_only / "out", "--to", "nemo")
    assert code == 2 and str(read_only / "out") in err and "read-only" in err


def test_a_mount_point_is_refused_before_anything_is_written(qwen3, tmp_path, tmpfs, capsys,
                                                             monkeypatch):
    mount_point = tmpfs("out")
    (mount_point / "config.json").write_text("{}")
    monkeypatch.setattr(conversion, "write_plan", None)  # never reached
    code, err = run_cli(capsys, "convert", qwen3, mount_point, "--to", "nemo", "--overwrite")
    assert code == 2 and f"{mount_point} is a mount point" in err
    assert names(mount_point) == ["config.json"] and names(tmp_path) == ["out", "qwen3"]


def test_a_busy_destination(qwen3, tmp_path, capsys, monkeypatch):
    """EBUSY at the final move (a folder in use on some network file systems)."""
    def busy(src, dst, flags):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src), None, str(dst))

    monkeypatch.setattr(output, "_renameat2", busy)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "convert", qwen3, out, "--to", "nemo")
    assert code == 2 and f"cannot write {out}: Device or resource busy" in err
    assert names(tmp_path) == ["qwen3"]


def test_a_file_larger_than_the_file_system_allows(qwen3, tmp_path, capsys):
    """Writes past the file-size limit fail with EFBIG, as on a FAT32 disk."""
    with file_size_limit(64 * 1024):
        code, err = run_cli(capsys, "convert", qwen3, tmp_path / "out", "--to", "nemo")
    assert code == 2 and "--max-shard-size" in err and names(tmp_path) == ["qwen3"]


@pytest.mark.parametrize("code,advice", [(errno.EDQUOT, "quota"), (errno.EACCES, "permission"),
                                         (errno.ENOSPC, "full"), (errno.EIO, "I/O error")])
def test_each_destination_error_is_one_message(qwen3, tmp_path, capsys, monkeypatch, code,
                                               advice):
    def fail(plan, source, folder, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(folder / "model.safetensors"))

    monkeypatch.setattr(conversion, "write_plan", fail)
    exit_code, err = run_cli(capsys, "convert", qwen3, tmp_path / "out", "--to", "nemo")
    assert exit_code == 2 and f"cannot write {tmp_path / 'out'}" in err and advice in err
    assert names(tmp_path) == ["qwen3"]


@pytest.mark.parametrize("phase", ["shard", "index", "sidecar", "folder sync"])
def test_a_full_disk_in_each_phase_is_one_message(qwen3, tmp_path, capsys, monkeypatch, phase):
    """ENOSPC as a write reports it (no file name): writing a shard, the index, a sidecar
    file, or syncing the folder before the move."""
    from moekit.executors import streaming

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    module, name = {"shard": (streaming, "write_shard"), "index": (streaming, "write_index"),
                    "sidecar": (output, "copy_file"), "folder sync": (output, "_sync_folder")
                    }[phase]
    monkeypatch.setattr(module, name, full)
    out = tmp_path / "new" / "out"
    code, err = run_cli(capsys, "convert", qwen3, out, "--to", "nemo", "--max-shard-size",
                        "20KB")
    assert code == 2 and f"cannot write {out}" in one_error(err) and "full" in err
    assert "nothing was left behind" in err and names(tmp_path) == ["qwen3"]


def test_the_folders_made_for_the_destination_are_synced_with_it(qwen3, tmp_path, monkeypatch):
    """A folder ``mkdir -p`` made is an entry of the folder it was made in: each must be
    synced, or a power loss can take the whole output with it."""
    synced = []
    fsync_dir = output._fsync_dir

    def recording(folder):
        synced.append(Path(folder))
        fsync_dir(folder)

    monkeypatch.setattr(output, "_fsync_dir", recording)
    convert(qwen3, tmp_path / "a" / "b" / "out", to="nemo")
    assert {tmp_path / "a" / "b", tmp_path / "a", tmp_path} <= set(synced)


def test_a_folder_that_cannot_be_made_is_a_moekit_error_and_parents_are_removed(
        qwen3, tmp_path, monkeypatch):
    """Any error making the destination's parents or its temporary folder (here EMLINK, a
    folder with too many subfolders) is the destination's: one MoekitError, and the
    parents made so far are removed again."""
    mkdir = os.mkdir

    def too_many_links(path, *args, **kwargs):
        if Path(path).name == "c":
            raise OSError(errno.EMLINK, os.strerror(errno.EMLINK), str(path))
        mkdir(path, *args, **kwargs)

    monkeypatch.setattr(output.os, "mkdir", too_many_links)
    with pytest.raises(MoekitError, match="cannot make a folder for .*Too many links"):
        convert(qwen3, tmp_path / "a" / "b" / "c" / "out", to="nemo")
    assert names(tmp_path) == ["qwen3"]


def test_an_error_reading_the_source_is_not_blamed_on_the_destination(qwen3, tmp_path, capsys,
                                                                     monkeypatch):
    def fail(plan, source, folder, *args, **kwargs):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(qwen3 / "model.safetensors"))

    monkeypatch.setattr(conversion, "write_plan", fail)
    with pytest.raises(PermissionError):
        convert(qwen3, tmp_path / "out", to="nemo")
    code, err = run_cli(capsys, "convert", qwen3, tmp_path / "out", "--to", "nemo")
    assert code == 2 and "cannot write" not in err and str(qwen3) in err
    assert names(tmp_path) == ["qwen3"]


def test_other_platforms_are_refused_before_writing(qwen3, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    code, err = run_cli(capsys, "convert", qwen3, tmp_path / "out", "--to", "nemo")
    assert code == 2 and "Linux" in err and names(tmp_path) == ["qwen3"]


def test_the_package_declares_linux():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "Operating System :: POSIX :: Linux" in project["classifiers"]


# -- save_experts ---------------------------------------------------------------------------

def test_save_experts_has_the_same_guarantees(qwen3, tmp_path, tmpfs, monkeypatch):
    """On a group of one rank (the hand-over between ranks is tested in
    test_expert_parallel): onto another file system; refusing a folder that is not a
    checkpoint and the source's folder; keeping a destination that appears meanwhile."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import moekit.expert_parallel.save as save_module
    from moekit import load_experts, save_experts

    other = tmpfs()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("precious")
    before = tree_digest(qwen3)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("ep",))
        state = load_experts(qwen3, mesh)
        save_experts(state, other / "saved", mesh, config_from=qwen3)
        with pytest.raises(MoekitError, match="notes.txt"):
            save_experts(state, notes, mesh, config_from=qwen3, overwrite=True)
        with pytest.raises(MoekitError, match="is the source itself"):
            save_experts(state, qwen3, mesh, config_from=qwen3, overwrite=True)
        write_shard = save_module.write_shard

        def write_then_someone_makes_it(path, *args, **kwargs):
            write_shard(path, *args, **kwargs)
            (other / "appearing").mkdir()

        monkeypatch.setattr(save_module, "write_shard", write_then_someone_makes_it)
        with pytest.raises(MoekitError, match="appeared"):
            save_experts(state, other / "appearing", mesh, config_from=qwen3)
    finally:
        dist.destroy_process_group()
    assert verify(qwen3, other / "saved").equal
    assert names(other) == ["appearing", "saved"] and names(other / "appearing") == []
    assert names(notes) == ["notes.txt"] and tree_digest(qwen3) == before


def _one_rank_save(qwen3: Path, save: str) -> tuple:
    """(mesh, state dict, save function) of an expert-parallel save on a group of one rank:
    ``save_experts`` of ``load_experts`` on an ep mesh, or ``save_sharded`` of
    ``load_sharded`` on a (dp, ep) mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    from moekit import load_experts, load_sharded, save_experts, save_sharded

    if save == "experts":
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("ep",))
        return mesh, load_experts(qwen3, mesh), save_experts
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "ep"))
    return mesh, load_sharded(qwen3, mesh), save_sharded


@pytest.mark.parametrize("save", ["experts", "sharded"])
def test_an_expert_parallel_save_refuses_a_config_from_that_is_no_checkpoint_up_front(
        qwen3, tmp_path, monkeypatch, save):
    """``config_from`` is opened as a checkpoint before anything is written: a folder
    holding a config.json but no weights is refused, naming it, before the destination's
    folder is made."""
    import torch.distributed as dist

    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_bytes((qwen3 / "config.json").read_bytes())
    written, make_folder = [], output.OutputFolder.__init__

    def recorded(self, *args, **kwargs):
        written.append(args[0])
        make_folder(self, *args, **kwargs)

    monkeypatch.setattr(output.OutputFolder, "__init__", recorded)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        mesh, state, run = _one_rank_save(qwen3, save)
        with pytest.raises(MoekitError, match=str(config_only)):
            run(state, tmp_path / "out", mesh, config_from=config_only)
    finally:
        dist.destroy_process_group()
    assert written == [] and names(tmp_path) == ["config-only", "qwen3", "store"]


@pytest.mark.parametrize("save", ["experts", "sharded"])
@pytest.mark.parametrize("format", ["safetensors", "dcp"])
def test_an_expert_parallel_save_refuses_a_config_changed_since_it_was_planned(
        qwen3, tmp_path, monkeypatch, save, format):
    """The save is planned from ``config_from``'s config.json (the family, the experts): one
    rewritten before it is copied beside the weights is refused, naming it, and nothing is
    put in place (on a group of one rank)."""
    import torch.distributed as dist

    config, make_folder = qwen3 / "config.json", output.OutputFolder.__init__

    def rewritten_once_writing_begins(self, *args, **kwargs):
        make_folder(self, *args, **kwargs)
        config.write_text(config.read_text() + "\n")

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        mesh, state, run = _one_rank_save(qwen3, save)
        monkeypatch.setattr(output.OutputFolder, "__init__", rewritten_once_writing_begins)
        with pytest.raises(MoekitError, match=f"{config} changed since .*size went from"):
            run(state, tmp_path / "out", mesh, config_from=qwen3, format=format)
    finally:
        dist.destroy_process_group()
    assert names(tmp_path) == ["qwen3", "store"]


@pytest.mark.parametrize("save", ["experts", "sharded"])
def test_a_full_disk_under_an_expert_parallel_dcp_save(qwen3, tmp_path, tmpfs, save):
    small = tmpfs("small", "size=64k")
    out = small / "out"
    ep_workers.spawn(ep_workers.save_to, 2, tmp_path, str(qwen3), str(out), str(tmp_path),
                     save, "dcp")
    for rank in range(2):
        message = (tmp_path / f"{rank}.txt").read_text()
        assert message.startswith(f"save_{save} failed, nothing was written: rank"), message
        assert (f"cannot write {out}: No space left on device; the file system is full"
                in message), message
        assert message.count("No space left") == 1, message  # ranks with one message together
    assert names(small) == []


STOPPED_SAVES = [  # save, format, the rank signalled, the signal, handled as the CLI does
    ("experts", "safetensors", 0, signal.SIGTERM, True),
    ("sharded", "safetensors", 1, signal.SIGINT, True),
    ("experts", "dcp", 1, signal.SIGTERM, False),
    ("sharded", "dcp", 0, signal.SIGHUP, True),
]


@pytest.mark.parametrize("save,format,victim,signum,handled", STOPPED_SAVES)
def test_a_signal_to_one_rank_of_an_expert_parallel_save(qwen3, tmp_path, save, format, victim,
                                                         signum, handled):
    """The signalled rank stops writing and says so to the others; the temporary folder is
    removed, the checkpoint that --overwrite would have replaced stays as it was, every
    other rank raises a MoekitError naming the rank, and the signal then reaches the
    signalled rank's handler (the default SIGTERM ends it)."""
    out = Path(shutil.copytree(qwen3, tmp_path / "out"))
    before = tree_digest(out)
    codes = ep_workers.spawn(ep_workers.save_stopped, 2, tmp_path, str(qwen3), str(out),
                             str(tmp_path), save, format, victim, signum, handled, join=False)
    survivor = 1 - victim
    assert (tmp_path / f"{survivor}.txt").read_text() == (
        f"save_{save} failed, nothing was written: rank {victim}: interrupted by {signum.name}")
    if handled:
        assert (tmp_path / f"{victim}.txt").read_text() == "interrupted" and codes == [0, 0]
    else:
        assert codes[victim] == -signum and codes[survivor] == 0
    assert tree_digest(out) == before
    assert names(tmp_path) == sorted(["out", "qwen3", f"{survivor}.txt",
                                      *([f"{victim}.txt"] if handled else [])])


@pytest.mark.parametrize("save,format,victim", [("experts", "safetensors", 0),
                                                ("sharded", "dcp", 1)])
def test_a_rank_killed_during_an_expert_parallel_save(qwen3, tmp_path, save, format, victim):
    """SIGKILL gives the rank no time to say anything: the other learns it from the broken
    collective, names the rank that ended, and the temporary folder is removed (by rank 0,
    or, when rank 0 is the one killed, by the rank of its machine that outlives it)."""
    out = tmp_path / "out"
    codes = ep_workers.spawn(ep_workers.save_stopped, 2, tmp_path, str(qwen3), str(out),
                             str(tmp_path), save, format, victim, signal.SIGKILL, False,
                             join=False)
    survivor = 1 - victim
    message = (tmp_path / f"{survivor}.txt").read_text()
    assert codes[victim] == -signal.SIGKILL and codes[survivor] == 0
    assert message.startswith(f"save_{save} failed, nothing was written: rank {victim} (pid ")
    assert "ended during the save" in message
    assert names(tmp_path) == [f"{survivor}.txt", "qwen3"]


@pytest.mark.parametrize("save", ["experts", "sharded"])
def test_a_rank_killed_before_an_expert_parallel_save_writes(qwen3, tmp_path, save):
    """Killed while the ranks plan: the others' collective fails, and each says so."""
    codes = ep_workers.spawn(ep_workers.save_killed, 2, tmp_path, str(qwen3),
                             str(tmp_path / "out"), str(tmp_path), save, 1, "planning",
                             join=False)
    message = (tmp_path / "0.txt").read_text()
    assert codes == [0, -signal.SIGKILL]
    assert message.startswith(f"save_{save} failed, nothing was written: a rank stopped "
                              "answering before writing began (torch.distributed: "), message
    assert names(tmp_path) == ["0.txt", "qwen3"]


def test_rank_0_killed_once_the_output_is_in_place(qwen3, tmp_path):
    """The others cannot learn the outcome from rank 0; they say where to look."""
    out = tmp_path / "out"
    codes = ep_workers.spawn(ep_workers.save_killed, 2, tmp_path, str(qwen3), str(out),
                             str(tmp_path), "sharded", 0, "commit", join=False)
    message = (tmp_path / "1.txt").read_text()
    assert codes == [-signal.SIGKILL, 0]
    assert message.startswith("save_sharded: rank 0 (pid ") and message.endswith(
        f"after rank 0 had put {out} in place or removed its temporary folder: check {out}")
    assert verify(qwen3, out).equal and names(tmp_path) == ["1.txt", "out", "qwen3"]


# -- moekit demo --out ----------------------------------------------------------------------

def test_demo_writes_only_into_a_new_empty_or_earlier_demo_folder(qwen3, tmp_path, capsys):
    """The demo writes and replaces sample checkpoints in --out: a folder holding anything
    else (a user's models, the source checkpoint) or a file there is refused."""
    from moekit import demo

    before = tree_digest(qwen3)
    (tmp_path / "file").write_text("a file")
    for out, expected in ((qwen3, "already holds files"), (tmp_path / "file", "not a folder"),
                          (tmp_path / "file" / "sub", "Not a directory")):
        code, err = run_cli(capsys, "demo", "--out", out)
        assert code == 2 and expected in one_error(err)
    assert tree_digest(qwen3) == before and names(tmp_path) == ["file", "qwen3"]
    demo._prepare(tmp_path / "new" / "samples")
    demo._prepare(tmp_path / "new" / "samples")  # a rerun reuses it
    assert names(tmp_path / "new" / "samples") == [demo.DEMO_MARKER]
