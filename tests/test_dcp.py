"""torch.distributed.checkpoint output: the folder moekit writes is read with DCP's own
reader (``FileSystemReader``, ``dcp.load``) into the state dict transformers' model has."""

from __future__ import annotations

import json
import pickle
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

import moekit
from moekit import dcp as moekit_dcp
from moekit import samples
from moekit.checkpoint import Checkpoint
from moekit.cli import main
from moekit.errors import MoekitError
from moekit.executors.evaluate import materialize
from moekit.plan import Read
from moekit.sources import FileSource
from moekit.upcycling import UpcycleSpec, upcycle

from .conftest import answered_at_once, load_all, same_bytes

SHARD = 60 * 1024
"""The --max-shard-size of these tests: several .distcp files for the tiny models."""

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning")  # dcp.load on one process says so


def dcp_state_dict(folder: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``like``'s keys loaded from the DCP folder with DCP's reader, strictly: the folder
    holds exactly these keys with these shapes and dtypes."""
    metadata = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    assert metadata.keys() == like.keys()
    for key, value in like.items():
        assert (tuple(metadata[key].size), metadata[key].properties.dtype) == \
            (tuple(value.shape), value.dtype), key
    loaded = {key: torch.full_like(value, 7) for key, value in like.items()}
    dcp.load(loaded, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
    return loaded


def test_a_dcp_folder_holds_the_transformers_models_state_dict(family_checkpoints,
                                                               family_models, tmp_path):
    out = tmp_path / "dcp"
    assert main(["convert", str(family_checkpoints["qwen3_moe"]), str(out), "--to",
                 "transformers", "--format", "dcp", "--max-shard-size", str(SHARD)]) == 0
    data_files = sorted(out.glob("*.distcp"))
    assert len(data_files) > 1 and (out / ".metadata").is_file()
    assert (out / "config.json").is_file()
    expected = family_models["qwen3_moe"].state_dict()
    loaded = dcp_state_dict(out, expected)
    assert all(same_bytes(loaded[key], expected[key]) for key in expected)


def test_tensors_are_built_as_dcp_writes_them(family_checkpoints, tmp_path, dcp_built):
    """Memory holds the tensors of one .distcp file at a time (DCP keeps a file's tensors
    until the file is closed), never the whole model."""
    shard = 20 * 1024
    assert main(["convert", str(family_checkpoints["qwen3_moe"]), str(tmp_path / "dcp"),
                 "--to", "nemo", "--format", "dcp", "--max-shard-size", str(shard)]) == 0
    assert dcp_built["total"] > 4 * shard
    assert dcp_built["live_peak"] <= shard + dcp_built["largest"]


def test_an_upcycled_model_written_to_dcp_holds_the_shards_tensors(tmp_path):
    dense = samples.save_model(samples.build_model("qwen3", seed=3), tmp_path / "dense")
    spec = UpcycleSpec(experts=4, top_k=2, method="drop", drop_ratio=0.5)
    upcycle(dense, tmp_path / "shards", spec, max_shard_size=SHARD)
    upcycle(dense, tmp_path / "dcp", spec, max_shard_size=SHARD, format="dcp")
    expected = load_all(tmp_path / "shards")
    loaded = dcp_state_dict(tmp_path / "dcp", expected)
    assert all(same_bytes(loaded[key], expected[key]) for key in expected)
    assert (tmp_path / "dcp" / "config.json").read_bytes() == \
        (tmp_path / "shards" / "config.json").read_bytes()


def test_an_unknown_format_is_refused_before_anything_is_written(qwen3, tmp_path):
    with pytest.raises(MoekitError, match="unknown output format 'zarr'"):
        moekit.convert(qwen3, tmp_path / "out", to="nemo", format="zarr")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["hf", "transformers", "nemo", "vllm"])
def test_hf_to_dcp_and_back_is_byte_identical(family_checkpoints, tmp_path, capsys, layout):
    """The DCP folder is recognised without --from (inspect, verify, convert) and read
    back as the bytes transformers saved."""
    src = family_checkpoints["qwen3_moe"]
    out, back = tmp_path / "dcp", tmp_path / "back"
    assert main(["convert", str(src), str(out), "--to", layout, "--format", "dcp",
                 "--max-shard-size", str(SHARD)]) == 0
    assert main(["inspect", str(out), "--json"]) == 0
    assert f'"layout": "{layout}"' in capsys.readouterr().out
    assert main(["verify", str(src), str(out)]) == 0
    assert main(["convert", str(out), str(back), "--to", "hf"]) == 0
    original, restored = load_all(src), load_all(back)
    assert original.keys() == restored.keys()
    assert all(same_bytes(original[k], restored[k]) for k in original)


def test_a_dcp_folder_saved_by_torch_is_read_as_saved(tmp_path):
    """Tensors that ``dcp.save`` wrote (several dtypes, one process) are read, as byte
    ranges of the .distcp files, as they were saved."""
    saved = {"a.weight": torch.randn(5, 3).to(torch.bfloat16),
             "b.bias": torch.arange(7, dtype=torch.int64),
             "c.mask": torch.tensor([True, False, True]),
             "d.scale": torch.randn(4, 2).to(torch.float8_e4m3fn)}
    dcp.save(saved, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    checkpoint = Checkpoint.open(tmp_path / "ckpt")
    assert list(checkpoint.tensors) == list(saved)
    with FileSource(checkpoint) as source:
        for key, tensor in saved.items():
            assert same_bytes(source.read(Read.whole(key, checkpoint.tensors[key])), tensor)


def test_training_state_beside_the_model_is_passed_over(tmp_path):
    """What a training checkpoint saves beside the model (torchtitan's optimizer,
    lr_scheduler, dataloader and train_state, flattened by DCP: tensors and other values)
    is not read, and is counted by root; a model key that merely starts alike is read."""
    saved = {"w": torch.randn(4, 6), "optimizers.w": torch.randn(2),
             "optimizer": {"state": {"w": {"exp_avg": torch.randn(4, 6), "step": torch.ones(())}},
                           "param_groups": {"w": {"lr": 0.1}}},
             "lr_scheduler": {"last_epoch": 3}, "dataloader": b"\0", "train_state": {"step": 3}}
    dcp.save(saved, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    checkpoint = Checkpoint.open(tmp_path / "ckpt")
    assert list(checkpoint.tensors) == ["w", "optimizers.w"]
    assert checkpoint.training_state == {"optimizer": 3, "lr_scheduler": 1, "dataloader": 1,
                                         "train_state": 1}


@pytest.mark.parametrize("saved,refusal", [
    ({"w": torch.randn(4, 6).t()}, "strides"),
    ({"w": torch.randn(4, 6), "step": 3}, "step is not a tensor"),
    ({"w": torch.randn(4, 6), "model": {"step": 3}}, "model.step is not a tensor"),
    ({"w": (-torch.randn(4, 6))._neg_view()}, "neg bit set: its values are not its bytes"),
])
def test_what_moekit_cannot_read_as_saved_is_refused(tmp_path, capsys, saved, refusal):
    dcp.save(saved, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    code = main(["inspect", str(tmp_path / "ckpt")])
    err = capsys.readouterr().err
    assert code == 2 and refusal in err and "Traceback" not in err


@pytest.mark.parametrize("member", ["data.pkl", "byteorder"])
def test_a_member_that_unpacks_large_is_refused_unread(tmp_path, capsys, member):
    """A tensor's archive whose pickle or byte order is compressed (torch.save stores
    them) and unpacks to megabytes is refused from its size, not unpacked."""
    folder = _saved(tmp_path)
    _replace_member(folder, member, lambda data: data + b"\0" * (8 * 2**20))
    code = main(["inspect", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and "unpack to more than" in err and "Traceback" not in err


def test_a_folder_saved_under_python_3_13_is_read(tmp_path, monkeypatch):
    # Python 3.13 pickles pathlib.PosixPath (DCP's StorageMeta.checkpoint_id) as
    # pathlib._local.PosixPath; 3.12 and 3.14 as pathlib.PosixPath.
    import pathlib
    import pickle
    import sys
    import types

    class PosixPath(pathlib.PosixPath):
        __module__ = "pathlib._local"
        __qualname__ = "PosixPath"

        def __reduce__(self):
            return type(self), self.parts

    local = types.ModuleType("pathlib._local")
    local.PosixPath = PosixPath
    monkeypatch.setitem(sys.modules, "pathlib._local", local)
    folder = _saved(tmp_path)
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    metadata.storage_meta.checkpoint_id = PosixPath(folder)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    assert b"pathlib._local" in (folder / ".metadata").read_bytes()
    assert main(["inspect", str(folder)]) == 0


def _saved(tmp_path: Path) -> Path:
    """A DCP folder of one tensor, as ``dcp.save`` writes it."""
    folder = tmp_path / "ckpt"
    dcp.save({"w": torch.randn(2, 2)}, checkpoint_id=folder, no_dist=True)
    return folder


def _replace_member(folder: Path, member: str, new: Callable[[bytes], bytes]) -> None:
    """Store the tensor of the one-tensor DCP ``folder`` again, in a new data file whose
    archive holds ``new(data)`` (deflated) for ``member``'s ``data``."""
    import io
    import zipfile

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    metadata = FileSystemReader(str(folder)).read_metadata()
    [(index, info)] = metadata.storage_data.items()
    raw = (folder / info.relative_path).read_bytes()[info.offset:info.offset + info.length]
    packed = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as archive, zipfile.ZipFile(packed, "w") as bomb:
        for entry in archive.infolist():
            if entry.filename.endswith("/" + member):
                bomb.writestr(entry.filename, new(archive.read(entry)),
                              compress_type=zipfile.ZIP_DEFLATED)
            else:
                bomb.writestr(entry, archive.read(entry))
    (folder / "bomb.distcp").write_bytes(packed.getvalue())
    metadata.storage_data[index] = _StorageInfo("bomb.distcp", 0, len(packed.getvalue()))
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_metadata_pickled_at_any_protocol_reads_as_saved(tmp_path, protocol):
    """DCP pickles its ``.metadata`` at pickle's default protocol (4; 5 from Python 3.14)
    and ``torch.save`` a tensor's ``data.pkl`` at 2: what moekit checks before unpickling
    admits each."""
    from torch.distributed.checkpoint import FileSystemReader

    folder = tmp_path / "ckpt"
    saved = {"a": torch.randn(3, 2).to(torch.bfloat16), "b": torch.arange(4),
             "c.mask": torch.tensor([True]), "d": torch.zeros(2, 2, dtype=torch.float8_e5m2)}
    dcp.save(saved, checkpoint_id=folder, no_dist=True)
    headers = moekit_dcp.read_tensors(folder)
    tensors = headers.tensors
    metadata = FileSystemReader(str(folder)).read_metadata()
    (folder / ".metadata").write_bytes(pickle.dumps(metadata, protocol=protocol))
    assert moekit_dcp.read_tensors(folder) == headers and headers.made == {}
    assert list(tensors) == list(saved)


def _hashed_tuples(depth: int) -> bytes:
    """A pickle of six bytes a level: a tuple of two references to the tuple a level down,
    ``depth`` levels, the last a dict's key, so that unpickling it hashes 2**depth
    tuples."""
    levels = b"".join(b"h%ch%c\x86\x94" % (level, level) for level in range(depth))
    return b"\x80\x04K\x01\x85\x94" + levels + b"}h%cNs." % depth


def _hashed_instances(depth: int) -> bytes:
    """DCP's own ``MetadataIndex``, ``depth`` times, each holding the one below as its fqn
    and offset, the last a dict's key: unpickling it hashes 2**depth instances."""
    module = b"torch.distributed.checkpoint.metadata"
    pickled = b"\x80\x04\x8c%c%s\x94\x8c\x0dMetadataIndex\x94\x93\x94\x8c\x01a\x94" % (
        len(module), module)
    below = 3
    for level in range(depth):
        pickled += b"h\x02)\x81\x94}\x94(\x8c\x03fqnh%c\x8c\x06offseth%cub" % (below, below)
        below = 4 + 2 * level
    return pickled + b"}h%cNs." % below


@pytest.mark.parametrize("pickled,refusal", [
    (b"\x80\x04" + b"\x8f" * 2**20 + b".", "pickle opcode EMPTY_SET"),
    (b"\x80\x04" + b"}" * 2**20 + b".", "more than 32 times its size in memory"),
    (b"\x80\x02Nr\xff\xff\xff\xff.", "memo slot 4294967295 where pickle writes 0"),
    (_hashed_tuples(30), "refers again to a tuple, list or dict"),
    (_hashed_instances(24), "reaches more than"),
], ids=["sets", "dicts", "memo", "tuples", "instances"])
def test_a_metadata_that_unpickles_to_gigabytes_or_for_hours_is_refused_at_once(
        tmp_path, capsys, pickled, refusal):
    """A megabyte of empty sets or dicts (hundreds of megabytes unpickled), a memo slot of
    2**32 (a memo of 64 GiB), tuples or instances each holding the one below twice (hashing
    the last walks 2**30 or 2**24 of them): refused from the opcodes, before anything is
    built, naming the file."""
    folder = _saved(tmp_path)
    (folder / ".metadata").write_bytes(pickled)
    with answered_at_once():
        code = main(["inspect", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and refusal in err and err.count("\n") == 1
    assert f"{folder / '.metadata'} is not a torch.distributed.checkpoint .metadata" in err
    tracemalloc.start()
    try:
        with pytest.raises(MoekitError, match=refusal):
            moekit_dcp.read_tensors(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


def test_a_tensors_pickle_that_hashes_for_hours_is_refused_at_once(tmp_path, capsys):
    """A tensor's ``data.pkl`` of 200 bytes whose unpickling hashes 2**30 tuples: refused
    from its opcodes, naming the tensor."""
    folder = _saved(tmp_path)
    _replace_member(folder, "data.pkl", lambda data: _hashed_tuples(30))
    with answered_at_once():
        code = main(["inspect", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and "w (bomb.distcp) is not a tensor saved by torch.save" in err
    assert "refers again to a tuple" in err and err.count("\n") == 1


@pytest.mark.parametrize("paths,refusal", [
    ([Path(f"/checkpoints/{n}") for n in range(17)], "more than 16 paths"),
    ([Path("/" + "x" * 5000)], "longer than 4096 characters"),
])
def test_a_metadata_holding_many_or_long_paths_is_refused(tmp_path, capsys, paths, refusal):
    """Building a path joins its parts, which a pickle can repeat: DCP keeps one path (the
    checkpoint id); more, or a longer one than a path can be, is refused."""
    from torch.distributed.checkpoint import FileSystemReader

    folder = _saved(tmp_path)
    metadata = FileSystemReader(str(folder)).read_metadata()
    metadata.planner_data = paths
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    code = main(["inspect", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and refusal in err and ".metadata" in err and "Traceback" not in err


def test_tensor_properties_of_an_unknown_memory_format_are_one_message(tmp_path, capsys,
                                                                        monkeypatch):
    """DCP's ``TensorProperties`` raises a RuntimeError for a memory format it does not
    know: one message naming the .metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorProperties

    folder = _saved(tmp_path)
    metadata = FileSystemReader(str(folder)).read_metadata()
    monkeypatch.setattr(TensorProperties, "__getstate__",
                        lambda self: (self.dtype, self.layout, False, 7, False))
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    monkeypatch.undo()
    code = main(["inspect", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and "Invalid torch.memory_format encoding: 7" in err
    assert ".metadata" in err and "Traceback" not in err


def _key(metadata) -> str:
    """The key of the first tensor of ``metadata``."""
    return next(k for k, v in metadata.state_dict_metadata.items() if hasattr(v, "chunks"))


def _entry(metadata):
    return metadata.state_dict_metadata[_key(metadata)]


@pytest.mark.parametrize("edit", [
    lambda m: setattr(_entry(m), "size", None),
    lambda m: setattr(_entry(m), "properties", None),
    lambda m: setattr(_entry(m), "chunks", [None]),
    lambda m: setattr(m, "storage_data", []),
    lambda m: m.state_dict_metadata.__setitem__(7, m.state_dict_metadata.pop(_key(m))),
    lambda m: [m],
])
@pytest.mark.parametrize("saved_by", ["dcp", "megatron"])
def test_metadata_of_dcps_classes_holding_what_dcp_never_writes_is_one_message(
        tmp_path, capsys, edit, saved_by):
    """DCP's own classes with a None size, an int key, a list for a mapping, ...: one
    message naming the .metadata, in a DCP folder and in a Megatron-Core one."""
    from torch.distributed.checkpoint import FileSystemReader

    if saved_by == "megatron":
        qwen3 = samples.save_model(samples.build_model("qwen3_moe"), tmp_path / "qwen3")
        moekit.convert(qwen3, tmp_path / "ckpt", to="megatron")
        folder = tmp_path / "ckpt" / "iter_0000000"
    else:
        folder = tmp_path / "ckpt"
        dcp.save({"w": torch.randn(2, 2)}, checkpoint_id=folder, no_dist=True)
    metadata = FileSystemReader(str(folder)).read_metadata()
    changed = edit(metadata)
    (folder / ".metadata").write_bytes(pickle.dumps(changed if isinstance(changed, list)
                                                    else metadata))
    code = main(["inspect", str(tmp_path / "ckpt")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert ".metadata" in err


def test_a_metadata_pickle_is_never_run(tmp_path, capsys):
    """``.metadata`` is a pickle: one that refers to anything but DCP's own classes is
    refused before it can run code."""
    folder = tmp_path / "ckpt"
    dcp.save({"w": torch.randn(2, 2)}, checkpoint_id=folder, no_dist=True)
    witness = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(str(witness))))
    code = main(["inspect", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and ".metadata" in err
    assert not witness.exists()


class _Payload:
    """Unpickling this touches a file (what a malicious .metadata could do instead)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return Path.touch, (Path(self.path),)


def test_a_failure_while_writing_is_one_message_and_leaves_nothing(qwen3, tmp_path, capsys,
                                                                   monkeypatch):
    """DCP wraps a step's failure in a CheckpointException (a BaseException); moekit
    reports the failure itself, exit code 2, and removes the temporary folder."""
    def fail(recipe, source):
        raise MoekitError("qwen3 shard changed")

    monkeypatch.setattr(moekit_dcp, "materialize", fail)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["convert", str(qwen3), str(tmp_path / "out"), "--to", "nemo", "--format", "dcp"])
    err = capsys.readouterr().err
    assert code == 2 and "qwen3 shard changed" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_load_of_a_dcp_folder_is_the_models_state_dict(family_checkpoints, family_models,
                                                       tmp_path):
    out = tmp_path / "dcp"
    moekit.convert(family_checkpoints["qwen3_moe"], out, to="nemo", format="dcp",
                   max_shard_size=SHARD)
    loaded = moekit.load(out, layout="transformers")
    expected = family_models["qwen3_moe"].state_dict()
    assert loaded.keys() == expected.keys()
    assert all(same_bytes(loaded[key], expected[key]) for key in expected)


@pytest.mark.parametrize("damage,named", [
    (lambda folder: (folder / "__0_1.distcp").write_bytes(b""), "__0_1.distcp"),
    (lambda folder: (folder / ".metadata").write_bytes(b"\x80\x04garbage"), ".metadata"),
    (lambda folder: (folder / "__0_0.distcp").unlink(), "__0_0.distcp"),
])
def test_a_damaged_dcp_folder_is_named(family_checkpoints, tmp_path, capsys, damage, named):
    out = tmp_path / "dcp"
    moekit.convert(family_checkpoints["qwen3_moe"], out, to="nemo", format="dcp",
                   max_shard_size=SHARD)
    damage(out)
    code = main(["convert", str(out), str(tmp_path / "back"), "--to", "hf"])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err
    assert not (tmp_path / "back").exists()


def test_a_torch_without_the_writer_moekit_extends_is_refused_before_writing(
        qwen3, tmp_path, monkeypatch):
    from torch.distributed.checkpoint.filesystem import _FileSystemWriter

    monkeypatch.delattr(_FileSystemWriter, "_write_data")
    with pytest.raises(MoekitError, match="torch 2.13's DCP file-system writer"):
        moekit.convert(qwen3, tmp_path / "out", to="nemo", format="dcp", dry_run=True)
    assert not (tmp_path / "out").exists()


def write_sharded(folder: Path, files: list[dict[str, tuple[torch.Tensor, object]]],
                  info: Callable[[dict], str] = json.dumps) -> Path:
    """Safetensors files as DCP's HuggingFaceStorageWriter saves them one a rank: each of
    ``files`` maps a tensor's name to its chunk and the chunk's offsets (``info`` writes
    them to the file's metadata)."""
    folder.mkdir()
    for rank, chunks in enumerate(files, 1):
        sharding = {key: {"saved_offsets": offsets} for key, (_, offsets) in chunks.items()}
        save_file({key: chunk.contiguous() for key, (chunk, _) in chunks.items()},
                  folder / f"shard-{rank:05d}-model-00001-of-00001.safetensors",
                  metadata={"DCP_SHARDING_INFO": info(sharding), "format": "pt"})
    return folder


def test_safetensors_files_of_ranks_are_read_as_the_tensors_they_hold(tmp_path):
    """Rows of one tensor over two files, columns of another (uneven), and a tensor of
    one file: each is read as the whole tensor, as DCP's HuggingFaceStorageReader does."""
    rows, columns, one = torch.randn(5, 3), torch.randn(2, 7), torch.randn(4)
    folder = write_sharded(tmp_path / "ranks", [
        {"rows": (rows[:3], [0, 0]), "columns": (columns[:, :4], [0, 0]), "one": (one, [0])},
        {"rows": (rows[3:], [3, 0]), "columns": (columns[:, 4:], [0, 4])}])
    checkpoint = Checkpoint.open(folder)
    whole = {"rows": rows, "columns": columns, "one": one}
    theirs = {key: torch.empty_like(value) for key, value in whole.items()}
    dcp.load(theirs, storage_reader=dcp.HuggingFaceStorageReader(str(folder)), no_dist=True)
    with FileSource(checkpoint) as source:
        for key, value in whole.items():
            read = materialize(checkpoint.made[key] if key in checkpoint.made else
                               Read.whole(key, checkpoint.tensors[key]), source)
            assert same_bytes(read, value) and same_bytes(theirs[key], value), key


def test_safetensors_files_without_an_index_or_sharding_metadata_are_refused(tmp_path, capsys):
    folder = tmp_path / "parts"
    folder.mkdir()
    for part in range(2):
        save_file({f"w{part}": torch.ones(2)}, folder / f"part-{part}.safetensors")
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{folder} holds 2 .safetensors files but no model.safetensors.index.json" in err


@pytest.mark.parametrize("files,refusal", [
    ([{"w": (torch.ones(2), [0])}, {"w": (torch.ones(2), [0])}], "w at [0] is saved in"),
    ([{"w": (torch.ones(2), [0])}, {"w": (torch.ones(2), [3])}], "w is saved in 2 row chunks "
                                                                   "that leave a gap"),
    ([{"w": (torch.ones(2, 2), [0, 0])}, {"w": (torch.ones(2, 2), [0, 3])}],
     "its chunks do not tile it"),
    ([{"w": (torch.ones(2), [0])}, {"w": (torch.ones(2).half(), [2])}],
     "w is saved in chunks of different dtypes"),
    ([{"w": (torch.ones(2), [0])}, {"w": (torch.ones(2), [-2])}], "gives no saved_offsets for w"),
    ([{"w": (torch.ones(2), [0])}, {"w": (torch.ones(2), [2, 0])}], "gives no saved_offsets for w"),
    ([{"w": (torch.ones(2), [0])}, {"w": (torch.ones(2), [2.0])}], "gives no saved_offsets for w"),
])
def test_safetensors_files_of_ranks_that_do_not_make_a_model_are_refused(tmp_path, capsys,
                                                                          files, refusal):
    folder = write_sharded(tmp_path / "ranks", files)
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert refusal in err and err.count("\n") == 1 and "Traceback" not in err


def test_sharding_metadata_that_is_not_json_is_refused_naming_the_file(tmp_path, capsys):
    folder = write_sharded(tmp_path / "ranks", [{"w": (torch.ones(2), [0])},
                                                {"w": (torch.ones(2), [2])}],
                           info=lambda sharding: "{not json")
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "shard-00001-model-00001-of-00001.safetensors: its DCP_SHARDING_INFO metadata is " \
           "not JSON moekit reads" in err and "Traceback" not in err


@pytest.mark.parametrize("linked", [False, True])
def test_the_config_of_sharded_files_is_read_from_hf_metadata_unless_linked(tmp_path, linked):
    """NeMo AutoModel keeps the config.json of its sharded files in ``.hf_metadata``; one
    that is a link (which may lead anywhere) is not followed."""
    folder = write_sharded(tmp_path / "model", [{"w": (torch.ones(2), [0])},
                                                {"w": (torch.ones(2), [2])}])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text('{"model_type": "llama"}')
    if linked:
        (folder / ".hf_metadata").symlink_to(elsewhere)
    else:
        elsewhere.rename(folder / ".hf_metadata")
    checkpoint = Checkpoint.open(folder)
    assert checkpoint.model_type == (None if linked else "llama")
    assert [sidecar.path.name for sidecar in checkpoint.sidecars] == ([] if linked else
                                                                      ["config.json"])


def test_one_rank_s_file_alone_is_refused_not_read_as_whole_tensors(tmp_path, capsys):
    """A file of one rank's chunks, named alone or alone in its folder, is not a checkpoint
    of whole tensors; a file that one rank saved (every tensor at 0) is."""
    folder = write_sharded(tmp_path / "ranks", [{"w": (torch.ones(2), [0])},
                                                {"w": (torch.ones(2), [2])}])
    first, second = sorted(folder.iterdir())
    alone = tmp_path / "alone"
    alone.mkdir()
    second.rename(alone / second.name)
    for named in (alone, alone / second.name):
        assert main(["inspect", str(named)]) == 2
        err = capsys.readouterr().err
        assert "holds one rank's chunks of its tensors, not whole tensors (w starts at [2]" in err
    assert list(Checkpoint.open(first).tensors) == ["w"]


def test_a_deeply_nested_sharding_metadata_is_refused(tmp_path, capsys):
    folder = write_sharded(tmp_path / "ranks", [{"w": (torch.ones(2), [0])},
                                                {"w": (torch.ones(2), [2])}],
                           info=lambda sharding: "[" * 100_000 + "]" * 100_000)
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "its DCP_SHARDING_INFO metadata is not JSON moekit reads" in err
    assert err.count("\n") == 1


def test_files_of_two_kinds_without_an_index_are_refused_naming_one(tmp_path, capsys):
    folder = write_sharded(tmp_path / "ranks", [{"w": (torch.ones(2), [0])}])
    save_file({"v": torch.ones(2)}, folder / "stray.safetensors")
    assert main(["inspect", str(folder)]) == 2
    assert ("holds 2 .safetensors files but no model.safetensors.index.json saying which "
            "tensors each holds (stray.safetensors has no DCP_SHARDING_INFO metadata, which "
            "the others have" in capsys.readouterr().err)
