"""What moekit reads: only the checkpoint's own files, through links that stay inside it;
index, config.json and headers checked; layer and expert numbers canonical; every name it
prints escaped. Every bad input ends in one message naming the file, exit 2, no traceback,
nothing written and the input unchanged.

Checkpoints here are written byte by byte (headers with ``struct`` and ``json``), so that
malformed ones can be made and no model is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import moekit
from moekit.checkpoint import INDEX_NAME, Checkpoint
from moekit.cli import main
from moekit.errors import MoekitError, printable
from moekit.plan import Read
from moekit.sources import FileSource

ITEMSIZE = {"F32": 4, "BF16": 2, "U8": 1, "F8_E8M0": 1}
CONFIG = {"model_type": "qwen3_moe", "num_experts": 2}
SHARD = "model-00001-of-00001.safetensors"
Tensors = dict[str, tuple[str, tuple[int, ...]]]


# ---------------------------------------------------------------- writing checkpoints

def write_safetensors(path: Path, tensors: Tensors, metadata: dict | None = None,
                      header: bytes | None = None) -> None:
    """A safetensors file holding ``tensors`` (dtype, shape), each filled with a byte
    pattern; ``header`` replaces the JSON header that would describe them."""
    described: dict = {"__metadata__": metadata} if metadata is not None else {}
    data = bytearray()
    for key, (dtype, shape) in tensors.items():
        size = ITEMSIZE[dtype]
        for dim in shape:
            size *= dim
        described[key] = {"dtype": dtype, "shape": list(shape),
                          "data_offsets": [len(data), len(data) + size]}
        data += bytes((len(data) + i) % 251 for i in range(size))
    raw = json.dumps(described).encode() if header is None else header
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data))


def moe_tensors(experts: tuple[str, ...] = ("0", "1"), layers: tuple[str, ...] = ("0",)
                ) -> Tensors:
    """A Qwen3-MoE state dict in the HF layout, H=2, I=4; layer and expert numbers are
    written as given."""
    tensors: Tensors = {"model.embed_tokens.weight": ("F32", (8, 2))}
    for layer in layers:
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = ("F32", (2, 2))
        for e in experts:
            prefix = f"model.layers.{layer}.mlp.experts.{e}."
            tensors[prefix + "gate_proj.weight"] = ("F32", (4, 2))
            tensors[prefix + "up_proj.weight"] = ("F32", (4, 2))
            tensors[prefix + "down_proj.weight"] = ("F32", (2, 4))
    return tensors


def nemo_tensors(layer: str = "0") -> Tensors:
    """The same model in the nemo layout (grouped experts), the layer numbered as given."""
    return {"model.embed_tokens.weight": ("F32", (8, 2)),
            f"model.layers.{layer}.mlp.gate.weight": ("F32", (2, 2)),
            f"model.layers.{layer}.mlp.experts.gate_and_up_projs": ("F32", (2, 2, 8)),
            f"model.layers.{layer}.mlp.experts.down_projs": ("F32", (2, 4, 2))}


def checkpoint(folder: Path, tensors: Tensors | None = None, config: dict | None = CONFIG,
               index: bool = False, metadata: dict | None = None) -> Path:
    """A checkpoint folder: one shard (with an index when ``index``) and config.json."""
    folder.mkdir(parents=True)
    tensors = moe_tensors() if tensors is None else tensors
    write_safetensors(folder / (SHARD if index else "model.safetensors"), tensors, metadata)
    if index:
        (folder / INDEX_NAME).write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: SHARD for k in tensors}}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def snapshot(tree: Path) -> dict[str, str]:
    """Every entry under ``tree`` (links not followed): a file's sha256, a link's target,
    or its kind."""
    found = {}
    for root, dirs, files in os.walk(tree):
        for name in dirs + files:
            path = Path(root, name)
            key = str(path.relative_to(tree))
            if path.is_symlink():
                found[key] = "-> " + os.readlink(path)
            elif path.is_file():
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[key] = "dir" if path.is_dir() else "special"
    return found


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """Fail, rather than hang, a test whose code waits on a named pipe."""
    def stop(*_: object) -> None:
        raise TimeoutError("moekit blocked (on a named pipe?)")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def good(tmp_path: Path) -> Path:
    """A valid checkpoint, for verify's second argument."""
    return checkpoint(tmp_path / "good")


COMMANDS: dict[str, Callable[[Path, Path, Path], list[str]]] = {
    "inspect": lambda src, out, good: ["inspect", str(src)],
    "dry-run": lambda src, out, good: ["convert", str(src), str(out), "--to", "nemo",
                                       "--dry-run"],
    "convert": lambda src, out, good: ["convert", str(src), str(out), "--to", "vllm"],
    "verify": lambda src, out, good: ["verify", str(src), str(good)],
}


def refused(capsys, tmp_path: Path, args: list[str]) -> str:
    """Run the CLI expecting exit 2 with one message, no traceback, nothing written and
    nothing under ``tmp_path`` changed; return the message."""
    before = snapshot(tmp_path)
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2, captured
    err = captured.err
    assert err.startswith("moekit: error: ") and err.count("moekit: error:") == 1, err
    assert "Traceback" not in err
    assert all(c.isprintable() or c == "\n" for c in err), err
    assert snapshot(tmp_path) == before
    return err


def refused_everywhere(capsys, tmp_path: Path, src: Path, good: Path, *expected: str) -> str:
    """``refused`` for inspect, convert (dry run or not) and verify; each message holds
    every ``expected`` text. Returns the inspect message."""
    messages = {name: refused(capsys, tmp_path, command(src, tmp_path / "out", good))
                for name, command in COMMANDS.items()}
    for name, message in messages.items():
        for text in expected:
            assert text in message, (name, message)
    return messages["inspect"]


def output_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ---------------------------------------------------------------- section 3: sidecars

def test_a_single_file_source_copies_none_of_its_neighbours(tmp_path, capsys):
    src = checkpoint(tmp_path / "downloads")
    for name in ("tokenizer.json", "notes.txt", "generation_config.json"):
        (src / name).write_text("{}")
    file = src / "model.safetensors"
    assert Checkpoint.open(file).extra_files() == []
    assert main(["convert", str(file), str(tmp_path / "out"), "--to", "nemo"]) == 0
    assert output_names(tmp_path / "out") <= {"model.safetensors", INDEX_NAME}
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "out"), str(file)]) == 0


def test_a_folder_copies_only_the_known_sidecar_files(tmp_path):
    src = checkpoint(tmp_path / "model", index=True)
    sidecars = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                "generation_config.json", "LICENSE-MODEL", "modeling_deepseek.py", "README.md"}
    strangers = {"notes.txt", "thesis.pdf", "pytorch_model.bin", "old.safetensors.bak",
                 "run.log"}
    for name in sidecars | strangers:
        (src / name).write_text(name)
    (src / "other_model").mkdir()
    (src / "other_model" / "tokenizer.json").write_text("{}")
    found = Checkpoint.open(src).extra_files()
    assert {p.name for p in found} == sidecars | {"config.json"}
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "nemo"]) == 0
    written = output_names(tmp_path / "out")
    assert sidecars | {"config.json"} <= written and not written & strangers
    assert (tmp_path / "out" / "README.md").read_text() == "README.md"


# ---------------------------------------------------------------- section 3: links

@pytest.mark.parametrize("linked", ["tokenizer.json", "config.json", SHARD, INDEX_NAME])
def test_a_link_leaving_the_checkpoint_is_refused_by_name(linked, tmp_path, capsys, good):
    src = checkpoint(tmp_path / "model", index=True)
    (src / "tokenizer.json").write_text("{}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (src / linked).rename(elsewhere / linked)
    (src / linked).symlink_to(elsewhere / linked)
    refused_everywhere(capsys, tmp_path, src, good, str(src / linked),
                       str(elsewhere / linked), "outside the checkpoint folder")


def test_a_file_under_a_linked_folder_outside_is_refused(tmp_path, capsys, good):
    src = checkpoint(tmp_path / "model", index=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (src / SHARD).rename(elsewhere / SHARD)
    (src / "sub").symlink_to(elsewhere)
    (src / INDEX_NAME).write_text(json.dumps(
        {"weight_map": {k: f"sub/{SHARD}" for k in moe_tensors()}}))
    refused_everywhere(capsys, tmp_path, src, good, f"sub/{SHARD}", str(elsewhere / SHARD))


def test_a_dangling_link_is_named(tmp_path, capsys, good):
    src = checkpoint(tmp_path / "model")
    (src / "tokenizer.json").symlink_to("missing.json")
    refused_everywhere(capsys, tmp_path, src, good, "tokenizer.json", "missing.json",
                       "does not exist")


def test_links_inside_the_checkpoint_are_followed(tmp_path, capsys):
    src = checkpoint(tmp_path / "model", index=True)
    (src / "files").mkdir()
    (src / "files" / "tok.json").write_text('{"tokenizer": 1}')
    (src / "tokenizer.json").symlink_to("files/tok.json")
    (src / SHARD).rename(src / "files" / SHARD)
    (src / SHARD).symlink_to(Path("files", SHARD))
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "nemo"]) == 0
    copied = tmp_path / "out" / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_text() == '{"tokenizer": 1}'


def hf_cache_snapshot(root: Path, repo: str = "models--org--moe") -> Path:
    """A Hugging Face cache repository whose snapshot links each file to ``../../blobs``."""
    built = checkpoint(root / "built", index=True)
    (built / "tokenizer.json").write_text('{"tokenizer": 1}')
    snap = root / repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (root / repo / "blobs").mkdir()
    for file in sorted(built.iterdir()):
        blob = hashlib.sha256(file.name.encode()).hexdigest()
        file.rename(root / repo / "blobs" / blob)
        (snap / file.name).symlink_to(Path("..", "..", "blobs", blob))
    built.rmdir()
    return snap


def test_a_hugging_face_cache_snapshot_is_read_through_its_blobs(tmp_path, capsys):
    snap = hf_cache_snapshot(tmp_path / "hub")
    ckpt = Checkpoint.open(snap)
    blobs = tmp_path / "hub" / "models--org--moe" / "blobs"
    assert all(p.parent == blobs.resolve() for p in ckpt.source_files())
    assert {p.name for p in ckpt.extra_files()} == {"config.json", "tokenizer.json"}
    (tmp_path / "link").symlink_to(snap)
    assert main(["convert", str(tmp_path / "link"), str(tmp_path / "out"), "--to", "nemo"]) == 0
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"tokenizer": 1}'
    assert main(["inspect", str(snap / SHARD)]) == 0


def test_a_snapshot_link_into_another_cache_repository_is_refused(tmp_path, capsys, good):
    snap = hf_cache_snapshot(tmp_path / "hub")
    other = tmp_path / "hub" / "models--someone--else" / "blobs"
    other.mkdir(parents=True)
    (other / "abc").write_text("{}")
    (snap / "generation_config.json").symlink_to(Path("..", "..", "..", "models--someone--else",
                                                      "blobs", "abc"))
    refused_everywhere(capsys, tmp_path, snap, good, "generation_config.json",
                       str(other / "abc"), "Hugging Face cache repository")


@pytest.mark.parametrize("entry", ["../good/model.safetensors", "/etc/passwd",
                                   "a/../../good/model.safetensors", "a/../" + SHARD,
                                   "", "model\0.safetensors"])
def test_index_entries_that_leave_the_folder_are_refused(entry, tmp_path, capsys, good):
    src = checkpoint(tmp_path / "model", index=True)
    weight_map = {k: SHARD for k in moe_tensors()}
    weight_map["model.embed_tokens.weight"] = entry
    (src / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    refused_everywhere(capsys, tmp_path, src, good, INDEX_NAME, printable(repr(entry)),
                       "not a file inside the checkpoint folder")


# ---------------------------------------------------------------- section 5: malformed JSON

MALFORMED_JSON = {
    "not UTF-8": (b'{"model_type": "\xff"}', "is not UTF-8 text (byte 16 is 0xff)"),
    "invalid": (b'{"weight_map": ', "is not valid JSON"),
    "deeply nested": (b"[" * 100_000 + b"]" * 100_000, "nests its JSON values too deeply"),
    "nested objects": (b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
                       "nests its JSON values too deeply"),
    "an array": (b"[1, 2]", "holds an array; expected a JSON object"),
    "a string": (b'"weights"', "holds a string; expected a JSON object"),
    "null": (b"null", "holds null; expected a JSON object"),
    "a huge integer": (b'{"n": ' + b"9" * 5000 + b"}", "is not valid JSON"),
}


@pytest.mark.parametrize("name", [INDEX_NAME, "config.json"])
@pytest.mark.parametrize("defect", MALFORMED_JSON)
def test_malformed_json_is_named(name, defect, tmp_path, capsys, good):
    src = checkpoint(tmp_path / "model", index=True)
    content, expected = MALFORMED_JSON[defect]
    (src / name).write_bytes(content)
    refused_everywhere(capsys, tmp_path, src, good, str(src / name), expected)


@pytest.mark.parametrize("name", [INDEX_NAME, "config.json", SHARD, "tokenizer.json"])
@pytest.mark.parametrize("kind", ["folder", "named pipe"])
def test_a_folder_or_pipe_where_a_file_should_be(name, kind, tmp_path, capsys, good):
    src = checkpoint(tmp_path / "model", index=True)
    (src / name).unlink(missing_ok=True)
    if kind == "folder":
        (src / name).mkdir()
    else:
        os.mkfifo(src / name)
    refused_everywhere(capsys, tmp_path, src, good, str(src / name), f"is a {kind}, not a file")


def test_a_named_pipe_given_as_the_source(tmp_path, capsys, good):
    pipe = tmp_path / "weights.safetensors"
    os.mkfifo(pipe)
    refused_everywhere(capsys, tmp_path, pipe, good, str(pipe), "is a named pipe")


@pytest.mark.parametrize("weight_map, expected", [
    ({"model.embed_tokens.weight": ["a.safetensors"]}, "is an array, not a file name"),
    ({"model.embed_tokens.weight": 3}, "is a number, not a file name"),
    ({"model.embed_tokens.weight": None}, "is null, not a file name"),
    (["model.safetensors"], "'weight_map' is an array"),
    ({}, "'weight_map' lists no tensors"),
])
def test_a_malformed_weight_map_is_named(weight_map, expected, tmp_path, capsys, good):
    src = checkpoint(tmp_path / "model", index=True)
    (src / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    refused_everywhere(capsys, tmp_path, src, good, str(src / INDEX_NAME), expected)


def test_an_index_without_weight_map(tmp_path, capsys, good):
    src = checkpoint(tmp_path / "model", index=True)
    (src / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 1}}))
    refused_everywhere(capsys, tmp_path, src, good, INDEX_NAME, "has no 'weight_map'")


def test_a_model_type_that_is_not_a_string(tmp_path, capsys, good):
    src = checkpoint(tmp_path / "model", config={"model_type": ["qwen3_moe"], "num_experts": 2})
    refused_everywhere(capsys, tmp_path, src, good, "config.json", "model_type is an array")


def test_json_files_beyond_the_size_limit_are_refused_unread(tmp_path, capsys, good,
                                                              monkeypatch):
    from moekit import checkpoint as reading

    src = checkpoint(tmp_path / "model", index=True)
    monkeypatch.setattr(reading, "MAX_INDEX_BYTES", 64)
    refused_everywhere(capsys, tmp_path, src, good, INDEX_NAME,
                       f"moekit reads a {INDEX_NAME} of at most 64 bytes")


def test_a_config_json_larger_than_a_config_is_refused_unparsed(tmp_path, capsys, good):
    """18 MiB of empty objects in config.json, which JSON would parse to 24 times that:
    refused from its size (16 MiB for a config.json), naming the file."""
    src = checkpoint(tmp_path / "model", index=True)
    (src / "config.json").write_text(json.dumps({**CONFIG, "pad": [{}] * (6 * 2**20)},
                                                separators=(",", ":")))
    refused_everywhere(capsys, tmp_path, src, good, "config.json",
                       "moekit reads a config.json of at most 16,777,216 bytes")


def test_json_of_a_million_objects_is_refused_unparsed(tmp_path, capsys, good):
    """An index of 3 MiB holding 2**20 empty objects (each 64 bytes parsed, from two) beside
    its own four: refused from its count of '{' and '[', naming the file."""
    src = checkpoint(tmp_path / "model", index=True)
    index = json.loads((src / INDEX_NAME).read_text())
    (src / INDEX_NAME).write_text(json.dumps({**index, "metadata": {"pad": [{}] * 2**20}}))
    refused_everywhere(capsys, tmp_path, src, good, INDEX_NAME,
                       "holds 1,048,580 '{' and '[' characters, more than the 1,048,576 "
                       "objects and arrays moekit reads in one JSON file")


def test_an_index_the_size_of_deepseek_v3s_is_read(tmp_path):
    """DeepSeek-V3's index names 91,000 tensors in 8.4 MB: read whole."""
    from moekit.checkpoint import index_files

    names = {f"model.layers.{n // 2048}.mlp.experts.{n % 256}.gate_proj.weight_scale_inv.{n}":
             f"model-{n % 163 + 1:05d}-of-000163.safetensors" for n in range(91_000)}
    (tmp_path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": names},
                                                  indent=2))
    assert (tmp_path / INDEX_NAME).stat().st_size > 8_000_000
    assert len(index_files(tmp_path)) == 163


# ---------------------------------------------------------------- section 5: canonical keys

@pytest.mark.parametrize("odd", ["01", "00", "\u0661", "\uff11", "1" * 10, "+1", " 1", "1_0", "x"])
def test_a_non_canonical_expert_number_is_an_error(odd, tmp_path, capsys, good):
    tensors = moe_tensors(experts=("0", "1", odd))
    src = checkpoint(tmp_path / "model", tensors)
    key = f"model.layers.0.mlp.experts.{odd}.gate_proj.weight"
    refused_everywhere(capsys, tmp_path, src, good, printable(key), f"expert number {ascii(odd)}",
                       "and 2 more keys")


@pytest.mark.parametrize("odd", ["01", "\u0660", "\uff10", "+0", "0_0", "x"])
def test_a_non_canonical_layer_number_is_an_error(odd, tmp_path, capsys, good):
    tensors = {**moe_tensors(), **moe_tensors(layers=(odd,))}
    src = checkpoint(tmp_path / "model", tensors)
    refused_everywhere(capsys, tmp_path, src, good,
                       f"model.layers.{odd}.mlp.experts.0.gate_proj.weight",
                       f"layer number {ascii(odd)}")


def test_a_non_canonical_layer_in_a_grouped_layout(tmp_path, capsys, good):
    src = checkpoint(tmp_path / "model", {**nemo_tensors("0"), **nemo_tensors("00")})
    refused_everywhere(capsys, tmp_path, src, good,
                       "model.layers.00.mlp.experts.gate_and_up_projs", "layer number '00'")


def test_verify_never_calls_a_checkpoint_with_odd_keys_identical(tmp_path, capsys, good):
    twin = checkpoint(tmp_path / "twin", moe_tensors(experts=("0", "1", "01")))
    refused(capsys, tmp_path, ["verify", str(good), str(twin)])


def test_thousands_of_odd_keys_give_one_line_a_layer(tmp_path, capsys, good):
    padded = tuple(f"{e:03d}" for e in range(64))
    src = checkpoint(tmp_path / "model", moe_tensors(experts=padded, layers=("0", "1")),
                     config={"model_type": "qwen3_moe", "num_experts": 64})
    message = refused(capsys, tmp_path, ["inspect", str(src)])
    assert message.count("\n  - ") == 2 and "and 191 more keys" in message


def test_a_very_long_layer_number_is_reported(tmp_path, capsys, good):
    tensors = {**moe_tensors(), **moe_tensors(layers=("7" * 5000,))}
    src = checkpoint(tmp_path / "model", tensors)
    refused_everywhere(capsys, tmp_path, src, good, "7" * 400)


def test_an_expert_key_with_a_trailing_newline_is_not_an_expert(tmp_path, capsys, good):
    tensors = moe_tensors()
    tensors["model.layers.0.mlp.experts.1.up_proj.weight\n"] = ("F32", (4, 2))
    src = checkpoint(tmp_path / "model", tensors)
    refused_everywhere(capsys, tmp_path, src, good,
                       "model.layers.0.mlp.experts.1.up_proj.weight\\x0a is not an expert weight")


# ---------------------------------------------------------------- section 5: headers

def corrupt_header(header: dict | list) -> Callable[[Path], None]:
    return lambda file: write_safetensors(file, {}, header=json.dumps(header).encode())


def write_raw_header(file: Path, header: bytes, data_bytes: int) -> None:
    """A safetensors file of ``header`` as given, then ``data_bytes`` zero bytes."""
    header += b" " * (-len(header) % 8)
    file.write_bytes(struct.pack("<Q", len(header)) + header + bytes(data_bytes))


def test_a_key_given_twice_with_the_same_entry_is_read(tmp_path, capsys):
    src = checkpoint(tmp_path / "model", config=None)
    entry = b'"model.x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}'
    write_raw_header(src / "model.safetensors", b"{" + entry + b"," + entry + b"}", 16)
    assert main(["inspect", str(src)]) == 0


@pytest.mark.parametrize("first, refused", [
    ("a", "tensor a has dtype C64, which moekit does not handle"),
    ("q", "tensor q is stored twice: in first.safetensors and in second.safetensors")])
def test_a_shards_entries_are_refused_in_the_order_of_their_bytes(tmp_path, first, refused):
    """A shard whose entries hold a dtype moekit does not handle and a tensor an earlier
    shard holds too: the entry whose bytes come first is the one refused."""
    folder = tmp_path / "model"
    folder.mkdir()
    write_safetensors(folder / "first.safetensors", {"q": ("F32", (2,))})
    entries = {"a": '{"dtype":"C64","shape":[1]', "q": '{"dtype":"F32","shape":[2]'}
    order = [first, *(name for name in entries if name != first)]
    header = ",".join(f'"{name}":{entries[name]},"data_offsets":[{8 * i},{8 * i + 8}]}}'
                      for i, name in enumerate(order))
    write_raw_header(folder / "second.safetensors", ("{" + header + "}").encode(), 16)
    (folder / INDEX_NAME).write_text(json.dumps({"weight_map": {
        "q": "first.safetensors", "a": "second.safetensors"}}))
    with pytest.raises(MoekitError, match=re.escape(refused)):
        Checkpoint.open(folder)


@pytest.mark.parametrize("metadata", [{"format": "pt"}, {"saved": "12:00:00"}])
def test_headers_with_colons_in_names_or_metadata_are_read_as_safetensors_reads_them(
        tmp_path, metadata):
    """A colon inside a string sends the header to the pairwise parse (moekit's JSON parse
    into dicts is trusted only when it finds as many pairs as the header has colons): both
    parses give safetensors' names, shapes and dtypes, in the order of the bytes."""
    from safetensors import safe_open

    tensors = {**moe_tensors(), "model.x:y": ("F32", (3,)), "model.a": ("BF16", (2, 0))}
    src = checkpoint(tmp_path / "model", tensors, metadata=metadata)
    with safe_open(str(src / "model.safetensors"), framework="numpy") as handle:
        expected = {key: (tuple(handle.get_slice(key).get_shape()),
                          handle.get_slice(key).get_dtype()) for key in handle.offset_keys()}
    read = Checkpoint.open(src)
    assert [(key, (info.shape, info.dtype)) for key, info in read.tensors.items()] == \
        list(expected.items())
    assert read.metadata == metadata


def test_colons_in_metadata_alone_keep_the_single_parse(tmp_path, monkeypatch):
    """Metadata strings holding colons (DCP's sharding info is JSON) do not send a header
    to the slower pairwise parse: their colons are counted."""
    from moekit import checkpoint as module

    src = checkpoint(tmp_path / "model", metadata={"info": '{"a": {"b": [0, 0]}}', "t": "1:2"})
    monkeypatch.setattr(module, "_pairwise_entries", None)
    assert Checkpoint.open(src).metadata["t"] == "1:2"


@pytest.mark.parametrize("name", ["model.x", "model.x:y"])
def test_a_null_metadata_is_no_metadata(tmp_path, name):
    """safetensors reads ``"__metadata__": null`` as no metadata; so does moekit, whether
    it parses the header once or pairwise (a colon in a name)."""
    folder = tmp_path / "model"
    folder.mkdir()
    entry = f'"{name}":{{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'.encode()
    write_raw_header(folder / "model.safetensors", b'{"__metadata__":null,' + entry + b"}", 16)
    read = Checkpoint.open(folder)
    assert list(read.tensors) == [name] and read.metadata == {}


@pytest.mark.parametrize("entry", [
    b"1", b'{"dtype":"F32","shape":[4]}', b'{"dtype":"F32","shape":[4],"data_offsets":[]}',
    b'{"dtype":["F32"],"shape":[0],"data_offsets":[0,0]}',
    b'{"dtype":"F32","shape":4,"data_offsets":[0,16]}'])
def test_a_header_rewritten_after_safetensors_checked_it_is_refused(tmp_path, monkeypatch,
                                                                    entry):
    """The header is parsed once more after safetensors checked it: a file rewritten in
    between with a header safetensors would refuse gives one error naming the file."""
    from moekit import checkpoint as module

    src = checkpoint(tmp_path / "model")
    checked = module.safe_open

    def checked_then_rewritten(path, **kwargs):
        handle = checked(path, **kwargs)
        write_raw_header(Path(path), b'{"model.x":' + entry + b"}", 16)
        return handle

    monkeypatch.setattr(module, "safe_open", checked_then_rewritten)
    with pytest.raises(MoekitError, match="model.safetensors changed while its header was read"):
        Checkpoint.open(src)


def set_length(length: int) -> Callable[[Path], None]:
    def edit(file: Path) -> None:
        data = bytearray(file.read_bytes())
        data[:8] = struct.pack("<Q", length)
        file.write_bytes(bytes(data))
    return edit


BAD_HEADERS = {
    "metadata not strings": (lambda f: write_safetensors(f, moe_tensors(), {"format": 1}),
                             "expected a string"),
    "unsupported dtype": (lambda f: write_safetensors(
        f, {**moe_tensors(), "model.scales": ("F8_E8M0", (4,))}), "model.scales has dtype F8_E8M0"),
    "header an array": (corrupt_header([1, 2]), "invalid JSON in header"),
    "negative dimension": (corrupt_header(
        {"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}), "expected usize"),
    "overflowing shape": (corrupt_header(
        {"x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 0]}}), "overflow"),
    "empty, with overflowing strides": (corrupt_header(
        {"x": {"dtype": "F32", "shape": [0, 7, 2**62], "data_offsets": [0, 0]}}),
        "shape [0, 7, 4611686018427387904], whose strides overflow"),
    "offsets leave a gap": (corrupt_header(
        {"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}), "invalid offset"),
    "huge header length": (set_length(2**63), "header too large"),
    "header past the end": (set_length(10_000), "invalid header length"),
    "too short": (lambda f: f.write_bytes(b"\x01\x02"), "header too small"),
    "a key given twice": (lambda f: write_raw_header(f, b'{"model.x":{"dtype":"F32","shape":[4],'
                                                     b'"data_offsets":[0,16]},"model.x":{"dtype"'
                                                     b':"F32","shape":[2,2],"data_offsets":'
                                                     b'[0,16]}}', 16),
                          "gives model.x twice, with different entries"),
    "a key given twice beside metadata with colons": (
        lambda f: write_raw_header(f, b'{"__metadata__":{"a:b":"{\\"c\\":1}"},"model.x":{"dtype"'
                                      b':"F32","shape":[4],"data_offsets":[0,16]},"model.x":{'
                                      b'"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}', 16),
        "gives model.x twice, with different entries"),
    "a key given twice beside an escaped colon": (
        lambda f: write_raw_header(f, b'{"__metadata__":{"a":"' + b"\\u003a" * 4  # 4 hidden
                                   + b'"},"model.x":{"dtype":"F32","shape":[4],"data_offsets":'
                                   b'[0,16]},"model.x":{"dtype":"F32","shape":[2,2],'
                                   b'"data_offsets":[0,16]}}', 16),
        "gives model.x twice, with different entries"),
}


@pytest.mark.parametrize("defect", BAD_HEADERS)
def test_a_bad_header_is_named(defect, tmp_path, capsys, good):
    src = checkpoint(tmp_path / "model")
    edit, expected = BAD_HEADERS[defect]
    edit(src / "model.safetensors")
    refused_everywhere(capsys, tmp_path, src, good, str(src / "model.safetensors"), expected)


def test_zero_size_tensors_are_read(tmp_path, capsys):
    src = checkpoint(tmp_path / "model", {**moe_tensors(), "model.empty": ("F32", (0, 3))})
    assert main(["inspect", str(src)]) == 0
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "nemo"]) == 0
    assert main(["verify", str(src), str(tmp_path / "out")]) == 0


def test_a_shard_gone_after_planning_is_a_moekit_error(tmp_path):
    src = checkpoint(tmp_path / "model")
    ckpt = Checkpoint.open(src)
    (src / "model.safetensors").unlink()
    with FileSource(ckpt) as source, pytest.raises(MoekitError, match="model.safetensors"):
        source.read(Read.whole("model.embed_tokens.weight",
                               ckpt.tensors["model.embed_tokens.weight"]))


# ---------------------------------------------------------------- sources that change

TRUNCATE_THEN_READ = """
import os, sys
from pathlib import Path
from moekit.checkpoint import Checkpoint
from moekit.errors import MoekitError
from moekit.plan import Read
from moekit.sources import FileSource

src = Path(sys.argv[1])
checkpoint = Checkpoint.open(src)
info = checkpoint.tensors["model.layers.0.mlp.experts.1.down_proj.weight"]
with FileSource(checkpoint) as source:
    source.read(Read("model.embed_tokens.weight", (), (8, 2), "F32"))
    os.truncate(src / "model.safetensors", info.offset)
    try:
        source.read(Read(info.key, (), info.shape, info.dtype))
    except MoekitError as err:
        print(err)
"""


def test_a_source_truncated_while_it_is_read_is_an_error_not_a_crash(tmp_path):
    """Read through a memory map, the bytes past the new end would kill the process with
    SIGBUS; read with pread, they are a short read, reported."""
    import subprocess
    import sys

    src = checkpoint(tmp_path / "model")
    done = subprocess.run([sys.executable, "-c", TRUNCATE_THEN_READ, str(src)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "model.safetensors ends before the bytes of" in done.stdout
    assert "truncated or replaced" in done.stdout


def rewrite_in_place(file: Path) -> None:
    """Change bytes of ``file`` without changing its size (as a download resuming would)."""
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    with open(file, "r+b") as handle:
        handle.write(data)
    os.utime(file, ns=(0, file.stat().st_mtime_ns + 1_000_000))


def rewrite_keeping_mtime(file: Path) -> None:
    """Change bytes of ``file`` without changing its size, then put its modification time
    back (as ``touch -d`` or a copy that keeps times would)."""
    before = file.stat()
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    with open(file, "r+b") as handle:
        handle.write(data)
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    while file.stat().st_ctime_ns == before.st_ctime_ns:  # a coarse clock: change it again
        time.sleep(0.005)
        os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert file.stat().st_mtime_ns == before.st_mtime_ns


def replace_by_a_copy(file: Path) -> None:
    """Put a new file (another inode) with the same bytes in ``file``'s place."""
    copy = file.with_suffix(".new")
    copy.write_bytes(file.read_bytes())
    os.replace(copy, file)


def swap_for_a_pipe(file: Path) -> None:
    file.unlink()
    os.mkfifo(file)


SOURCE_CHANGES = [
    ("after planning", rewrite_in_place, "it was modified"),
    ("after planning", rewrite_keeping_mtime, "status changed"),
    ("after planning", replace_by_a_copy, "replaced by another file"),
    ("after planning", swap_for_a_pipe, "no longer a plain file"),
    ("after planning", lambda file: os.truncate(file, 100), "size went from"),
    ("while writing", rewrite_in_place, "it was modified"),
    ("while writing", rewrite_keeping_mtime, "status changed"),
    ("while writing", lambda file: os.truncate(file, 100), "size went from"),
]
"""A file replaced (or swapped for a pipe) once open is still read whole from the file that
was open: the output is then the checkpoint as planned, and correct."""


@pytest.mark.parametrize("when,change,expected", SOURCE_CHANGES)
@pytest.mark.parametrize("layout", ["nemo", "hf"])  # built from reads; kernel byte copies
def test_a_source_that_changes_during_a_conversion_is_refused(tmp_path, monkeypatch, when,
                                                              change, expected, layout):
    """The header (and so every offset) was read at planning: a shard that is not the
    same file by the end of the run gives an error, never an output of mixed bytes."""
    from moekit import conversion

    src = checkpoint(tmp_path / "model")
    write_plan = conversion.write_plan

    def changed_then_written(plan, source, *args, **kwargs):
        if when == "after planning":
            change(src / "model.safetensors")
        write_plan(plan, source, *args, **kwargs)
        if when == "while writing":
            change(src / "model.safetensors")

    monkeypatch.setattr(conversion, "write_plan", changed_then_written)
    with pytest.raises(MoekitError, match=expected):
        conversion.convert(src, tmp_path / "out", to=layout)
    assert output_names(tmp_path) == {"model"}


def test_a_megatron_file_rewritten_once_its_archives_are_read_is_refused(tmp_path,
                                                                         monkeypatch):
    """A Megatron-Core folder's ``.distcp`` files are known as they were before their
    archives were read: one rewritten in place from then on is an error, as for DCP."""
    from moekit import conversion, megatron_io, samples

    src = samples.save_model(samples.build_model("qwen3_moe"), tmp_path / "model")
    conversion.convert(src, tmp_path / "megatron", to="megatron")
    read_headers = megatron_io.read_headers

    def read_then_rewritten(path, given):
        found = read_headers(path, given)
        rewrite_in_place(next(found.iteration.glob("*.distcp")))
        return found

    monkeypatch.setattr(megatron_io, "read_headers", read_then_rewritten)
    with pytest.raises(MoekitError, match="it was modified"):
        conversion.convert(tmp_path / "megatron", tmp_path / "out", to="hf")
    assert not (tmp_path / "out").exists()


def test_a_sidecar_swapped_for_a_pipe_is_refused_not_waited_on(tmp_path, monkeypatch):
    from moekit import conversion

    src = checkpoint(tmp_path / "model")
    (src / "tokenizer.json").write_text("{}")
    write_plan = conversion.write_plan

    def written_then_swapped(*args, **kwargs):
        write_plan(*args, **kwargs)
        swap_for_a_pipe(src / "tokenizer.json")

    monkeypatch.setattr(conversion, "write_plan", written_then_swapped)
    with pytest.raises(MoekitError, match="tokenizer.json is no longer a plain file"):
        conversion.convert(src, tmp_path / "out", to="nemo")
    assert output_names(tmp_path) == {"model"}


SIDECAR_CHANGES = [
    ("after planning", rewrite_in_place, "it was modified"),
    ("after planning", rewrite_keeping_mtime, "status changed"),
    ("after planning", replace_by_a_copy, "replaced by another file"),
    ("after planning", lambda file: os.truncate(file, 10), "size went from"),
    ("while copied", rewrite_in_place, "it was modified"),
    ("while copied", rewrite_keeping_mtime, "status changed"),
    ("while copied", lambda file: os.truncate(file, 10), "size went from"),
]
"""A sidecar replaced once open is copied whole from the file that was open: the copy is
then the file as planned, and correct."""


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
@pytest.mark.parametrize("when,change,expected", SIDECAR_CHANGES)
def test_a_sidecar_that_changes_during_a_conversion_is_refused(tmp_path, monkeypatch, capsys,
                                                               name, when, change, expected):
    """The output was planned from the checkpoint as it was opened (its config.json): a
    sidecar that is not the same file at the copy is one message naming it, not copied
    as it is then beside weights planned from what it was."""
    from moekit import conversion, output

    src = checkpoint(tmp_path / "model")
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    write_plan, read_chunk = conversion.write_plan, output._read_chunk

    def changed_then_written(*args, **kwargs):
        if when == "after planning":
            change(src / name)
        write_plan(*args, **kwargs)

    def changed_while_read(fd, path):
        chunk = read_chunk(fd, path)
        if when == "while copied" and path == src / name and chunk:
            change(path)
        return chunk

    monkeypatch.setattr(conversion, "write_plan", changed_then_written)
    monkeypatch.setattr(output, "_read_chunk", changed_while_read)
    code = main(["convert", str(src), str(tmp_path / "out"), "--to", "nemo"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("moekit: error:") == 1 and "Traceback" not in err
    assert f"{src / name} changed since moekit opened the checkpoint" in err and expected in err
    assert output_names(tmp_path) == {"model"}


def test_a_config_rewritten_within_one_clock_tick_is_refused(tmp_path, monkeypatch, capsys):
    """On a file system whose clock ticks coarsely (seconds), a config.json rewritten in
    place at its size keeps its times: what was parsed is compared with what is copied."""
    from moekit import conversion
    from moekit.checkpoint import FileIdentity

    def without_times(cls, info: os.stat_result) -> FileIdentity:
        return cls(info.st_dev, info.st_ino, info.st_size, 0, 0)

    monkeypatch.setattr(FileIdentity, "of", classmethod(without_times))
    src = checkpoint(tmp_path / "model")
    config = src / "config.json"
    write_plan = conversion.write_plan

    def changed_then_written(*args, **kwargs):
        text = config.read_text()
        with open(config, "r+") as handle:
            handle.write(text.replace('"num_experts": 2', '"num_experts": 3'))
        write_plan(*args, **kwargs)

    monkeypatch.setattr(conversion, "write_plan", changed_then_written)
    code = main(["convert", str(src), str(tmp_path / "out"), "--to", "nemo"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("moekit: error:") == 1 and f"{config} changed" in err
    assert output_names(tmp_path) == {"model"}


def test_copied_sidecar_files_get_the_mode_the_umask_allows(tmp_path):
    """As ``cp`` without ``-p``: a read-only or private sidecar is not copied as such."""
    from moekit import convert

    src = checkpoint(tmp_path / "model")
    (src / "tokenizer.json").write_text("{}")
    os.chmod(src / "tokenizer.json", 0o400)
    os.chmod(src / "config.json", 0o600)
    previous = os.umask(0o022)
    try:
        convert(src, tmp_path / "out", to="nemo")
    finally:
        os.umask(previous)
    for name in ("tokenizer.json", "config.json"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644


def test_a_named_file_may_be_converted_beside_itself_but_its_folder_is_kept(tmp_path, capsys):
    """The source is that one file: a new folder beside it is fine; replacing the folder
    holding it, or the file itself, is not."""
    src = checkpoint(tmp_path / "downloads")
    (src / "notes.txt").write_text("mine")
    file = src / "model.safetensors"
    assert main(["convert", str(file), str(src / "nemo"), "--to", "nemo"]) == 0
    assert output_names(src) == {"model.safetensors", "config.json", "notes.txt", "nemo"}
    capsys.readouterr()
    (src / "notes.txt").unlink()
    shutil.rmtree(src / "nemo")
    for dst, expected in ((src, "contains the source"), (file, "is the source itself")):
        message = refused(capsys, tmp_path, ["convert", str(file), str(dst), "--to", "nemo",
                                             "--overwrite"])
        assert expected in message


@pytest.mark.parametrize("shape,region", [
    ((3, 4, 5), ()), ((3, 4, 5), (1,)), ((3, 4, 5), (1, slice(1, 3))),
    ((3, 4, 5), (2, slice(None), slice(1, None, 2))), ((3, 4, 5), (slice(None), 2)),
    ((3, 4, 5), (slice(1, 3), slice(0, 4, 3), 4)), ((3, 0, 5), (1,)), ((3, 4, 5), (1, 2, 3)),
    ((6,), (slice(5, 2),)), ((4, 6), (slice(None), slice(1, 5, 2)))])
def test_regions_read_with_pread_equal_safetensors_slices(tmp_path, shape, region):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from moekit.plan import Read

    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    save_file({"model.embed_tokens.weight": full}, tmp_path / "model.safetensors")
    ckpt = Checkpoint.open(tmp_path / "model.safetensors")
    with FileSource(ckpt) as source:
        got = source.read(Read("model.embed_tokens.weight", region, (), "F32"))
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        want = handle.get_slice("model.embed_tokens.weight")[region] if region else \
            handle.get_tensor("model.embed_tokens.weight")
    assert got.shape == want.shape and torch.equal(got, want)


# ---------------------------------------------------------------- section 4: printed names

EVIL = "model.layers.0.mlp.experts.0.x\x1b[2J\x1b]0;owned\x07\r\x9b31m\u202e"


def test_printable_escapes_controls_and_keeps_text():
    assert printable("model.layers.0") == "model.layers.0"
    assert printable("a\x1b[31mb\r\x9b\u202e\x00") == "a\\x1b[31mb\\x0d\\x9b\\u202e\\x00"
    assert printable("two\nlines", newlines=True) == "two\nlines"
    assert printable("two\nlines") == "two\\x0alines"
    assert str(MoekitError("tensor \x1b[2J")) == "tensor \\x1b[2J"


def test_control_characters_in_tensor_names_are_escaped_in_errors(tmp_path, capsys, good):
    src = checkpoint(tmp_path / "model", {**moe_tensors(), EVIL: ("F32", (1,))})
    refused_everywhere(capsys, tmp_path, src, good, printable(EVIL))


def test_control_characters_in_paths_are_escaped(tmp_path, capsys, good):
    src = checkpoint(tmp_path / "mo\x1b[31mdel\r")
    (src / "config.json").write_text("[")
    refused_everywhere(capsys, tmp_path, src, good, printable(str(src / "config.json")))
    assert main(["inspect", str(tmp_path / "gone\x1b[2J")]) == 2
    assert "gone\\x1b[2J" in capsys.readouterr().err


def test_verify_and_inspect_print_escaped_names_and_valid_json(tmp_path, capsys, good):
    src = checkpoint(tmp_path / "mo\x1bdel", {**moe_tensors(), "evil\x1b[2J\r": ("F32", (1,))})
    assert main(["verify", str(src), str(good)]) == 1
    out = capsys.readouterr().out
    assert "evil\\x1b[2J\\x0d: only in" in out
    assert all(c.isprintable() or c == "\n" for c in out)
    assert main(["verify", str(src), str(good), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert f"evil\x1b[2J\r: only in {src}" in report["differences"]
    assert main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert printable(str(src)) in out and all(c.isprintable() or c == "\n" for c in out)
    assert main(["inspect", str(src), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(src)
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "nemo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(c.isprintable() or c == "\n" for c in out)


@pytest.mark.parametrize("path", [None, 3, b"model", ["model"]])
def test_a_path_of_another_type_is_named(path, tmp_path, good):
    with pytest.raises(MoekitError, match=f"the checkpoint path must be a str or a pathlib.Path, "
                                          f"not {type(path).__name__}"):
        moekit.inspect(path)
    with pytest.raises(MoekitError, match=f"the destination path must be a str or a "
                                          f"pathlib.Path, not {type(path).__name__}"):
        moekit.convert(good, path, to="nemo")


def test_a_source_modified_while_it_is_loaded_is_refused(tmp_path, monkeypatch):
    """moekit.load (and load_experts, load_sharded, which read through the same reader)
    checks every shard again once everything is read: a shard modified meanwhile gives an
    error, never a state dict of mixed bytes."""
    from moekit import load
    from moekit.executors import device

    src = checkpoint(tmp_path / "model")
    run_plan = device.run_plan

    def read_then_modified(*args, **kwargs):
        out = run_plan(*args, **kwargs)
        rewrite_in_place(src / "model.safetensors")
        return out

    monkeypatch.setattr(device, "run_plan", read_then_modified)
    with pytest.raises(MoekitError, match="it was modified"):
        load(src, "nemo")
