"""Damage done to a small sharded checkpoint, drawn by hypothesis for the fuzz test.

Each mutation is a frozen dataclass whose ``repr`` is a reproducer: applied to a copy of
the pristine checkpoint (``apply(src)``), it edits a safetensors header (a tensor's dtype,
shape, offsets or name; the ``__metadata__``; the header's bytes or length field), the raw
bytes of a shard, the index, config.json, or where files lie. Most leave something that
moekit must refuse; some leave a checkpoint that is merely unusual and must convert
exactly (the fuzz test judges the result, not the mutation). ``mutations(base)`` draws
one or two of them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

INDEX = "model.safetensors.index.json"
CONFIG = "config.json"

ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
            "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
"""safetensors dtypes a rewritten tensor may take (bytes per element)."""


class Inapplicable(Exception):
    """A mutation found nothing to act on (an earlier one already broke the structure)."""


# --- the checkpoint under test ---------------------------------------------------------

@dataclass(frozen=True)
class Tensor:
    """A tensor of the pristine checkpoint, as its header describes it."""

    shard: str
    key: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Base:
    """A pristine checkpoint: its name (its folder's), folder, layout, the layouts it is
    converted to, its tensors, shard sizes and config."""

    name: str
    folder: Path
    layout: str
    targets: tuple[str, ...]
    tensors: tuple[Tensor, ...] = field(repr=False)
    sizes: dict[str, int] = field(repr=False)
    config: dict = field(repr=False)

    @classmethod
    def of(cls, folder: Path, layout: str, targets: tuple[str, ...]) -> "Base":
        shards = sorted(folder.glob("*.safetensors"))
        tensors = tuple(Tensor(p.name, key, entry["dtype"], tuple(entry["shape"]))
                        for p in shards for key, entry in sorted(read_header(p)[0].items())
                        if key != "__metadata__")
        return cls(folder.name, folder, layout, targets, tensors,
                   {p.name: p.stat().st_size for p in shards},
                   json.loads((folder / CONFIG).read_text()))

    @property
    def shards(self) -> list[str]:
        return sorted(self.sizes)


def read_header(path: Path) -> tuple[dict, bytes]:
    """A shard's parsed header and its data section; Inapplicable when they do not parse."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8:8 + size])
    except (ValueError, RecursionError) as err:
        raise Inapplicable(str(err)) from err
    if len(raw) < 8 + size or not isinstance(header, dict):
        raise Inapplicable(f"{path.name} has no usable header")
    return header, raw[8 + size:]


def _write(path: Path, header: bytes, data: bytes, length: int | None = None) -> None:
    path.write_bytes((len(header) if length is None else length).to_bytes(8, "little")
                     + header + data)


def _dump(header: Any) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def _entries(path: Path) -> tuple[Any, list[list]]:
    """A well-formed shard as its metadata and [key, dtype, shape, bytes] in data order."""
    header, data = read_header(path)
    try:
        ordered = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda item: item[1]["data_offsets"][0])
        entries = [[k, v["dtype"], list(v["shape"]), data[slice(*v["data_offsets"])]]
                   for k, v in ordered]
    except (KeyError, TypeError, IndexError) as err:
        raise Inapplicable(f"{path.name}: {err}") from err
    return header.get("__metadata__"), entries


def _rewrite(path: Path, metadata: Any, entries: list[list]) -> None:
    """Write a well-formed shard: offsets recomputed from each entry's bytes."""
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for key, dtype, shape, data in entries:
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    _write(path, _dump(header), b"".join(e[3] for e in entries))


def _resized(data: bytes, size: int) -> bytes:
    """``size`` bytes made from ``data`` (repeated or cut; zeros when it is empty)."""
    if not data:
        return bytes(size)
    return (data * (size // len(data) + 1))[:size]


def _edit_json(path: Path, edit) -> None:
    """Rewrite a JSON file through ``edit(value) -> value``; Inapplicable when unreadable."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        raise Inapplicable(str(err)) from err
    path.write_text(json.dumps(edit(value)))


def _fix_index(folder: Path, edit) -> None:
    """Keep the index in step with a header edit, where the index is still readable."""
    def in_weight_map(index: Any) -> Any:
        if isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
            edit(index["weight_map"])
        return index

    with contextlib.suppress(Inapplicable):
        _edit_json(folder / INDEX, in_weight_map)


# --- mutations --------------------------------------------------------------------------

@dataclass(frozen=True)
class Mutation:
    """One edit of a checkpoint folder."""

    def apply(self, src: Path) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class SetHeaderField(Mutation):
    """Set (or with ``value=DELETE`` remove) one field of a tensor's header entry; the data
    section is left as it is."""

    shard: str
    key: str
    field: str
    value: Any

    def apply(self, src: Path) -> None:
        header, data = read_header(src / self.shard)
        entry = header.get(self.key)
        if not isinstance(entry, dict):
            raise Inapplicable(self.key)
        if self.value == DELETE:
            entry.pop(self.field, None)
        else:
            entry[self.field] = self.value
        _write(src / self.shard, _dump(header), data)


DELETE = "<delete>"


@dataclass(frozen=True)
class SetShapeDim(Mutation):
    """Replace one dimension of a tensor's header shape (data left as it is)."""

    shard: str
    key: str
    dim: int
    value: Any

    def apply(self, src: Path) -> None:
        header, data = read_header(src / self.shard)
        shape = header.get(self.key, {}).get("shape")
        if not isinstance(shape, list) or not shape:
            raise Inapplicable(self.key)
        shape[self.dim % len(shape)] = self.value
        _write(src / self.shard, _dump(header), data)


@dataclass(frozen=True)
class Retype(Mutation):
    """Give a tensor another shape and dtype in a well-formed file (its bytes cut or
    repeated to fit)."""

    shard: str
    key: str
    dtype: str
    shape: tuple[int, ...]

    def apply(self, src: Path) -> None:
        metadata, entries = _entries(src / self.shard)
        for entry in entries:
            if entry[0] == self.key:
                size = math.prod(self.shape) * ITEMSIZE[self.dtype]
                entry[1:] = [self.dtype, list(self.shape), _resized(entry[3], size)]
        _rewrite(src / self.shard, metadata, entries)


@dataclass(frozen=True)
class Rename(Mutation):
    """Rename a tensor in its header (and in the index when ``fix_index``)."""

    shard: str
    key: str
    new_key: str
    fix_index: bool

    def apply(self, src: Path) -> None:
        metadata, entries = _entries(src / self.shard)
        for entry in entries:
            if entry[0] == self.key:
                entry[0] = self.new_key
        _rewrite(src / self.shard, metadata, entries)
        if self.fix_index:
            _fix_index(src, lambda m: m.__setitem__(self.new_key, m.pop(self.key, self.shard)))


@dataclass(frozen=True)
class AddCopy(Mutation):
    """Add to ``to_shard`` a tensor named ``new_key`` holding a copy of ``key`` (of
    ``shard``): a second expert 1 spelled ``01``, a tensor stored twice, an extra expert."""

    shard: str
    key: str
    to_shard: str
    new_key: str
    fix_index: bool

    def apply(self, src: Path) -> None:
        copies = [[self.new_key, *e[1:]] for e in _entries(src / self.shard)[1] if e[0] == self.key]
        metadata, entries = _entries(src / self.to_shard)
        _rewrite(src / self.to_shard, metadata, entries + copies)
        if self.fix_index:
            _fix_index(src, lambda m: m.__setitem__(self.new_key, self.to_shard))


@dataclass(frozen=True)
class Drop(Mutation):
    """Remove a tensor: its header entry alone (``keep_bytes``: a gap in the data) or its
    bytes too; from the index as well when ``fix_index``."""

    shard: str
    key: str
    keep_bytes: bool
    fix_index: bool

    def apply(self, src: Path) -> None:
        if self.keep_bytes:
            header, data = read_header(src / self.shard)
            header.pop(self.key, None)
            _write(src / self.shard, _dump(header), data)
        else:
            metadata, entries = _entries(src / self.shard)
            _rewrite(src / self.shard, metadata, [e for e in entries if e[0] != self.key])
        if self.fix_index:
            _fix_index(src, lambda m: m.pop(self.key, None))


@dataclass(frozen=True)
class DropLayerExperts(Mutation):
    """Remove every expert tensor of a layer (its router too when ``router``), from the
    shards and the index: the layer is dense in the files, MoE by config.json."""

    layer: int
    router: bool

    def apply(self, src: Path) -> None:
        prefix = f"layers.{self.layer}.mlp."
        gone = (f"{prefix}experts.", f"{prefix}gate.") if self.router else (f"{prefix}experts.",)
        _remove_where(src, lambda key: any(part in key for part in gone))


@dataclass(frozen=True)
class CopyLayer(Mutation):
    """Copy every tensor of layer ``layer`` under the number ``to``, beside the original
    (a complete MoE layer that config.json's ``num_hidden_layers`` does not have)."""

    layer: int
    to: int

    def apply(self, src: Path) -> None:
        old, new = f"layers.{self.layer}.", f"layers.{self.to}."
        for path in sorted(src.glob("*.safetensors")):
            metadata, entries = _entries(path)
            copies = [[e[0].replace(old, new), *e[1:]] for e in entries if old in e[0]]
            _rewrite(path, metadata, entries + copies)
            _fix_index(src, lambda m: m.update({k: path.name for k, *_ in copies}))


def _remove_where(src: Path, doomed) -> None:
    """Remove the tensors whose key ``doomed(key)`` from every shard and the index."""
    for path in sorted(src.glob("*.safetensors")):
        metadata, entries = _entries(path)
        _rewrite(path, metadata, [e for e in entries if not doomed(e[0])])
    _fix_index(src, lambda m: [m.pop(k) for k in [k for k in m if doomed(k)]])


@dataclass(frozen=True)
class SetMetadata(Mutation):
    """Replace a shard's ``__metadata__`` (DELETE removes it)."""

    shard: str
    value: Any

    def apply(self, src: Path) -> None:
        metadata, entries = _entries(src / self.shard)
        _rewrite(src / self.shard, None if self.value == DELETE else self.value, entries)


@dataclass(frozen=True)
class HeaderBytes(Mutation):
    """Damage a shard's header as bytes: its length field or its JSON text (a key written
    twice, with the same entry or with another shape, among others)."""

    shard: str
    kind: str

    KINDS = ("length_huge", "length_zero", "length_short", "length_past_end", "not_json",
             "not_utf8", "cut_json", "top_list", "bom", "deep_nesting", "duplicate_key",
             "duplicate_key_differs", "nan")

    def apply(self, src: Path) -> None:
        path = src / self.shard
        raw = path.read_bytes()
        size = int.from_bytes(raw[:8], "little")
        if len(raw) < 8 + size or size < 8:
            raise Inapplicable(f"{self.shard} has no header left")
        header, data = raw[8:8 + size], raw[8 + size:]
        if self.kind.startswith("length_"):
            length = {"length_huge": 2**63 - 1, "length_zero": 0, "length_short": size - 1,
                      "length_past_end": len(raw)}[self.kind]
            return _write(path, header, data, length)
        _write(path, self._text(header), data)

    def _text(self, header: bytes) -> bytes:
        first_key = header.find(b'"', header.find(b"}") + 1)
        edits = {
            "not_json": lambda: b"x" * len(header),
            "not_utf8": lambda: header[:first_key + 2] + b"\xff" + header[first_key + 3:],
            "cut_json": lambda: header[:len(header) // 2] + b" " * (len(header) - len(header) // 2),
            "top_list": lambda: b"[" + header + b"]",
            "bom": lambda: b"\xef\xbb\xbf" + header,
            "deep_nesting": lambda: b"[" * 100_000 + b"]" * 100_000,
            "duplicate_key": lambda: header.replace(b"{", b"{" + _first_entry(header) + b",", 1),
            "duplicate_key_differs": lambda: header.rstrip()[:-1] + b"," + _reshaped(header) + b"}",
            "nan": lambda: re.sub(rb"\[(\d+),", b"[NaN,", header, count=1),
        }
        return edits[self.kind]()


def _first_entry(header: bytes) -> bytes:
    """The text of the first tensor entry of a header (``"key":{...}``)."""
    match = re.search(rb'"(?!__metadata__)[^"]+":\{[^}]*\}', header)
    return match.group(0) if match else b'"x":{}'


def _reshaped(header: bytes) -> bytes:
    """The first tensor entry of a header again, its shape another of the same size."""
    (key, entry), = json.loads(b"{" + _first_entry(header) + b"}").items()
    shape = entry.get("shape")
    if isinstance(shape, list):
        entry["shape"] = shape[::-1] if shape != shape[::-1] else [1, *shape]
    return json.dumps({key: entry}, separators=(",", ":")).encode()[1:-1]


@dataclass(frozen=True)
class Truncate(Mutation):
    """Cut a file to ``size`` bytes."""

    name: str
    size: int

    def apply(self, src: Path) -> None:
        with open(src / self.name, "r+b") as f:
            f.truncate(self.size)


@dataclass(frozen=True)
class Append(Mutation):
    """Add bytes at the end of a file."""

    name: str
    data: bytes

    def apply(self, src: Path) -> None:
        with open(src / self.name, "ab") as f:
            f.write(self.data)


@dataclass(frozen=True)
class FlipByte(Mutation):
    """XOR one byte of a file (in the length field, the header or the data)."""

    name: str
    position: int
    xor: int

    def apply(self, src: Path) -> None:
        raw = bytearray((src / self.name).read_bytes())
        if not raw:
            raise Inapplicable(f"{self.name} is empty")
        raw[self.position % len(raw)] ^= self.xor
        (src / self.name).write_bytes(bytes(raw))


@dataclass(frozen=True)
class ReplaceFile(Mutation):
    """Replace a file by ``content`` bytes, a directory, or nothing (removed)."""

    name: str
    content: bytes | str

    def apply(self, src: Path) -> None:
        path = src / self.name
        if path.exists() or path.is_symlink():
            path.unlink()
        if self.content == "<directory>":
            path.mkdir()
        elif self.content != "<absent>":
            path.write_bytes(self.content)


@dataclass(frozen=True)
class EditJson(Mutation):
    """Set (DELETE: remove) a top-level field of the index or config.json; ``field=None``
    replaces the whole document."""

    name: str
    field: str | None
    value: Any

    def apply(self, src: Path) -> None:
        def edit(doc: Any) -> Any:
            if self.field is None:
                return self.value
            if not isinstance(doc, dict):
                raise Inapplicable(self.name)
            if self.value == DELETE:
                doc.pop(self.field, None)
            else:
                doc[self.field] = self.value
            return doc

        _edit_json(src / self.name, edit)


@dataclass(frozen=True)
class EditIndexEntry(Mutation):
    """Point (DELETE: remove) one index entry, existing or new, at ``value``."""

    key: str
    value: Any

    def apply(self, src: Path) -> None:
        def edit(weight_map: dict) -> None:
            if self.value == DELETE:
                weight_map.pop(self.key, None)
            else:
                weight_map[self.key] = self.value

        _fix_index(src, edit)


@dataclass(frozen=True)
class MoveOutside(Mutation):
    """Move a file (a shard, config.json) out of the checkpoint folder and reach it from
    inside: through the index (``relative``: ``../``; ``absolute``) or a ``symlink``."""

    name: str
    via: str

    def apply(self, src: Path) -> None:
        outside = src.parent / "elsewhere"
        outside.mkdir(exist_ok=True)
        target = outside / self.name
        os.replace(src / self.name, target)
        if self.via == "symlink":
            (src / self.name).symlink_to(target)
            return
        where = f"../elsewhere/{self.name}" if self.via == "relative" else str(target)
        _fix_index(src, lambda m: m.update({k: where for k, v in m.items() if v == self.name}))


# --- strategies --------------------------------------------------------------------------

_json_leaf = (st.none() | st.booleans() | st.integers() | st.floats()
              | st.text(max_size=6))
json_values = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                           max_leaves=5)
"""Any JSON value (NaN and infinities included: Python's json writes and reads them)."""

LAYOUT_NAMES = ["hf", "nemo", "transformers", "vllm"]
FAMILY_NAMES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "phimoe",
                "nemotron_h", "gpt_oss", "llama4_text", "llama", "mistral", "qwen2", "qwen3"]
_weird_text = st.sampled_from(["", "\x1b[31mred", "a\nb", "\u0661", "x" * 300, "..", "/"])
_weird_ints = st.sampled_from([0, 1, -1, 3, 5, 2**31, 2**53, 2**64, 10**30])
_HUGE_DIMS = [1, 7, 2**31, 2**62, 100_000_000, 999_999_999]


def _shapes(shape: tuple[int, ...]) -> st.SearchStrategy[tuple[int, ...]]:
    """Shapes near ``shape`` (the same, reversed, one dimension off by one, one dimension
    more or fewer), any small shape, or a shape of no elements with huge other dims."""
    near = [shape, shape[::-1], shape[1:], (1, *shape)]
    near += [shape[:d] + (shape[d] + delta,) + shape[d + 1:]
             for d in range(len(shape)) for delta in (-1, 1)]
    small = st.lists(st.integers(0, 64), max_size=3).map(tuple)
    empty = st.tuples(st.lists(st.sampled_from(_HUGE_DIMS), min_size=1, max_size=3),
                      st.integers(0, 3)).map(lambda d: tuple(d[0][:d[1]] + [0] + d[0][d[1]:]))
    return st.sampled_from(near) | small | empty


def _renamed(key: str) -> st.SearchStrategy[str]:
    """Names derived from ``key``: other numbers (non-canonical ones included), other
    projections and suffixes, control characters, empty or reserved names."""
    numbers = list(re.finditer(r"(?<=\.)\d+(?=\.)", key))
    options = [st.sampled_from(["", "__metadata__", key + ".extra", key.replace("weight", "bias"),
                                "\x1b[2J" + key, key.replace(".", "\n", 1)])]
    if numbers:
        def renumber(choice: tuple[int, str]) -> str:
            m = numbers[choice[0] % len(numbers)]
            return key[:m.start()] + choice[1] + key[m.end():]

        texts = st.sampled_from(["0", "1", "2", "3", "4", "7", "999999999", "01", "+1", "\u0661",
                                 "\uff11", " 1", "-1", "1_0"])
        options.append(st.tuples(st.integers(0, 3), texts).map(renumber))
    for old, new in (("gate_proj", "up_proj"), ("up_proj", "down_proj"), ("gate_proj", "w1"),
                     ("mlp.experts", "mlp.shared_expert"), ("down_projs", "gate_and_up_projs"),
                     ("gate_and_up_projs", "gate_up_proj")):
        if old in key:
            options.append(st.just(key.replace(old, new)))
    return st.one_of(options)


_HEADER_KINDS = ["retype", "retype", "rename", "rename", "copy", "copy", "drop", "layer",
                 "field", "dim", "metadata", "bytes"]
"""Edits that leave a well-formed file (retype, rename, copy, drop) come up more often:
safetensors itself answers most broken headers; the planner has to answer these."""


@st.composite
def _header_mutation(draw, base: Base) -> Mutation:
    tensor = draw(st.sampled_from(base.tensors))
    shard, key = tensor.shard, tensor.key
    kind = draw(st.sampled_from(_HEADER_KINDS))
    if kind == "field":
        name = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        specific = {"dtype": st.sampled_from([*ITEMSIZE, "F4", "F8_E8M0", "f32", "F33"]),
                    "shape": st.lists(_weird_ints, max_size=3),
                    "data_offsets": st.lists(_weird_ints | st.integers(0, 100_000), max_size=3)}
        return SetHeaderField(shard, key, name, draw(specific[name] | json_values
                                                    | st.just(DELETE)))
    if kind == "dim":
        return SetShapeDim(shard, key, draw(st.integers(0, 3)),
                           draw(_weird_ints | st.sampled_from([1.5, 4.0, "8", None, True, []])))
    if kind == "retype":
        dtype = draw(st.sampled_from([tensor.dtype, *ITEMSIZE]))
        return Retype(shard, key, dtype, draw(_shapes(tensor.shape)))
    if kind == "rename":
        return Rename(shard, key, draw(_renamed(key)), draw(st.booleans()))
    if kind == "copy":
        other = draw(st.sampled_from(base.tensors)).key
        return AddCopy(shard, key, draw(st.sampled_from(base.shards)),
                       draw(_renamed(key) | st.just(other)), draw(st.booleans()))
    if kind == "drop":
        return Drop(shard, key, draw(st.booleans()), draw(st.booleans()))
    if kind == "layer":
        layer = draw(st.integers(0, base.config["num_hidden_layers"] - 1))
        return draw(st.builds(DropLayerExperts, st.just(layer), st.booleans())
                    | st.builds(CopyLayer, st.just(layer), st.sampled_from([2, 3, 7])))
    if kind == "metadata":
        layout = st.sampled_from(LAYOUT_NAMES) | _weird_text
        family = st.sampled_from(FAMILY_NAMES) | _weird_text
        strings = st.fixed_dictionaries({}, optional={"format": st.just("pt"),
                                                      "moekit.layout": layout,
                                                      "moekit.family": family})
        return SetMetadata(shard, draw(strings | json_values | st.just(DELETE)))
    return HeaderBytes(shard, draw(st.sampled_from(HeaderBytes.KINDS)))


@st.composite
def _bytes_mutation(draw, base: Base) -> Mutation:
    shard = draw(st.sampled_from(base.shards))
    size = base.sizes[shard]
    kind = draw(st.sampled_from(["truncate", "append", "flip"]))
    if kind == "truncate":
        return Truncate(shard, draw(st.integers(0, size - 1)))
    if kind == "append":
        return Append(shard, draw(st.binary(min_size=1, max_size=16)))
    return FlipByte(shard, draw(st.integers(0, size - 1)), draw(st.integers(1, 255)))


_BAD_JSON = [b"", b"{", b"not json", b"\xff\xfe{}", b"[]", b'"x"', b"null", b"1",
             b"[" * 100_000 + b"]" * 100_000, b'{"weight_map": {"a": "\xff"}}',
             b'{"model_type": "qwen3_moe", "num_experts": 1e999}', "<directory>", "<absent>"]


@st.composite
def _index_mutation(draw, base: Base) -> Mutation:
    tensor = draw(st.sampled_from(base.tensors))
    shard, key = tensor.shard, tensor.key
    kind = draw(st.sampled_from(["entry", "new_entry", "document", "file", "outside"]))
    targets = (st.sampled_from([*base.shards, "missing.safetensors", f"../{shard}", f"/{shard}",
                                "", ".", CONFIG, INDEX, f"{shard}/", f"./{shard}"])
               | json_values | st.just(DELETE))
    if kind == "entry":
        return EditIndexEntry(key, draw(targets))
    if kind == "new_entry":
        return EditIndexEntry(draw(_renamed(key)), draw(targets))
    if kind == "document":
        field = draw(st.sampled_from([None, "weight_map", "metadata"]))
        return EditJson(INDEX, field, draw(json_values | st.just(DELETE)))
    if kind == "file":
        return ReplaceFile(draw(st.sampled_from([INDEX, *base.shards])),
                           draw(st.sampled_from(_BAD_JSON)))
    return draw(st.builds(MoveOutside, st.just(shard),
                          st.sampled_from(["relative", "absolute", "symlink"]))
                | st.builds(MoveOutside, st.sampled_from([CONFIG, "generation_config.json"]),
                            st.just("symlink")))


_CONFIG_FIELDS = ["num_experts", "num_local_experts", "n_routed_experts", "model_type",
                  "num_hidden_layers", "hidden_size", "moe_intermediate_size",
                  "num_experts_per_tok", "mlp_only_layers", "decoder_sparse_step"]
_PLAUSIBLE = {"model_type": st.sampled_from(FAMILY_NAMES),
              "mlp_only_layers": st.lists(st.integers(-1, 3), max_size=2)}


@st.composite
def _config_mutation(draw, base: Base) -> Mutation:
    kind = draw(st.sampled_from(["field", "field", "document", "file"]))
    if kind == "field":
        field = draw(st.sampled_from(_CONFIG_FIELDS))
        plausible = _PLAUSIBLE.get(field, _weird_ints | st.integers(0, 5))
        return EditJson(CONFIG, field, draw(plausible | st.sampled_from([4.0, 1.5, "4", None, True])
                                            | json_values | st.just(DELETE)))
    if kind == "document":
        return EditJson(CONFIG, None, draw(json_values))
    return ReplaceFile(CONFIG, draw(st.sampled_from(_BAD_JSON)))


def mutations(base: Base) -> st.SearchStrategy[list[Mutation]]:
    """One or two mutations of ``base``: of a header (three times in eight), of a shard's
    raw bytes (once in eight), of the index or of config.json (twice in eight each)."""
    header, index, config = _header_mutation(base), _index_mutation(base), _config_mutation(base)
    kinds = [header, header, header, _bytes_mutation(base), index, index, config, config]
    return st.lists(st.sampled_from(kinds).flatmap(lambda kind: kind), min_size=1, max_size=2)
