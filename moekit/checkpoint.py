"""Reading a checkpoint's headers: tensor names, shapes, dtypes, files, config.json.

No tensor data is read here. A checkpoint is a folder with one ``model.safetensors`` or
HF-sharded ``model-0000i-of-0000n.safetensors`` files plus ``model.safetensors.index.json``
(a single ``.safetensors`` file is accepted too). Every problem found is reported with the
file it concerns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .dtypes import ITEMSIZES
from .errors import MoekitError
from .plan import nbytes

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
LAYOUT_METADATA_KEY = "moekit.layout"
FAMILY_METADATA_KEY = "moekit.family"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what its header says."""

    key: str
    file: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    """Where the tensor's bytes start in ``file`` (for ``pread`` and kernel copies)."""


@dataclass
class Checkpoint:
    """The headers of a safetensors checkpoint, its config.json and its other files."""

    path: Path
    tensors: dict[str, TensorInfo]
    config: dict | None
    metadata: dict[str, str] = field(default_factory=dict)
    """The safetensors ``__metadata__`` of the first shard (moekit records its layout there)."""

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        """Read every header of the checkpoint at ``path``; raise MoekitError on bad input."""
        path = Path(path)
        if not path.exists():
            raise MoekitError(f"no checkpoint at {path}: the path does not exist")
        folder, files, weight_map = _weight_files(path)
        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, str] = {}
        for i, name in enumerate(files):
            file_meta = _read_header(folder / name, tensors)
            if i == 0:
                metadata = file_meta
        if weight_map is not None:
            _check_index(folder / INDEX_NAME, weight_map, tensors)
        return cls(path=folder, tensors=tensors, config=read_config(folder), metadata=metadata)

    @property
    def files(self) -> list[str]:
        """The weight files, in order."""
        return list(dict.fromkeys(t.file for t in self.tensors.values()))

    @property
    def model_type(self) -> str | None:
        return (self.config or {}).get("model_type")

    def file_of(self, key: str) -> str:
        return self.tensors[key].file

    def total_bytes(self) -> int:
        return sum(nbytes(t.shape, t.dtype) for t in self.tensors.values())

    def extra_files(self) -> list[Path]:
        """The files that are not weights (config, tokenizer, generation config, ...)."""
        weights = set(self.files) | {INDEX_NAME}
        return sorted(p for p in self.path.iterdir() if p.is_file() and p.name not in weights
                      and not p.name.endswith(".safetensors"))


def _weight_files(path: Path) -> tuple[Path, list[str], dict[str, str] | None]:
    """The folder, its weight files in order, and the index's weight map (None when the
    checkpoint has no index)."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise MoekitError(f"{path} is not a .safetensors file nor a checkpoint folder")
        return path.parent, [path.name], None
    index = path / INDEX_NAME
    if index.exists():
        weight_map = _read_index(index)
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise MoekitError(
                f"{index} names {len(missing)} file(s) that do not exist: {', '.join(missing)}; "
                "the checkpoint is incomplete (re-download or re-save it)")
        return path, files, weight_map
    if (path / SINGLE_NAME).is_file():
        return path, [SINGLE_NAME], None
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if not found:
        raise MoekitError(f"{path} holds no .safetensors files (looked for {INDEX_NAME} and "
                          f"{SINGLE_NAME})")
    if len(found) > 1:
        raise MoekitError(f"{path} holds {len(found)} .safetensors files but no {INDEX_NAME} "
                          "saying which tensors each holds")
    return path, found, None


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise MoekitError(f"{index} is not a valid safetensors index ({err})") from err
    if not isinstance(weight_map, dict):
        raise MoekitError(f"{index}: 'weight_map' is not a mapping of tensor names to files")
    return weight_map


def _read_header(file: Path, tensors: dict[str, TensorInfo]) -> dict[str, str]:
    """Add the tensors of one file's header to ``tensors``; return its metadata.

    safetensors validates the file and lists its tensors in the order of their bytes; the
    format requires those bytes to fill the data section, which ends the file, without
    gaps, so each tensor's byte offset follows from the sizes (the library checks but does
    not expose the offsets)."""
    try:
        with safe_open(str(file), framework="numpy") as handle:
            found = []
            for key in handle.offset_keys():
                if key in tensors:
                    raise MoekitError(f"tensor {key} is stored twice: in {tensors[key].file} "
                                      f"and in {file.name}")
                view = handle.get_slice(key)
                found.append((key, tuple(view.get_shape()), view.get_dtype()))
            metadata = dict(handle.metadata() or {})
    except SafetensorError as err:
        raise MoekitError(f"cannot read {file}: {err} (the file is truncated or corrupt)") from err
    sizes = [_nbytes(file, key, shape, dtype) for key, shape, dtype in found]
    offset = file.stat().st_size - sum(sizes)
    name = file.name
    for (key, shape, dtype), size in zip(found, sizes):
        tensors[key] = TensorInfo(key, name, shape, dtype, offset)
        offset += size
    return metadata


def _nbytes(file: Path, key: str, shape: tuple[int, ...], dtype: str) -> int:
    if dtype not in ITEMSIZES:
        raise MoekitError(f"{file}: tensor {key} has dtype {dtype}, which moekit does not "
                          f"handle ({', '.join(ITEMSIZES)})")
    return nbytes(shape, dtype)


def _check_index(index: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]
                 ) -> None:
    """Raise when the index and the files' headers disagree on where a tensor is."""
    wrong = [k for k, f in weight_map.items() if k not in tensors or tensors[k].file != f]
    if wrong:
        shown = ", ".join(f"{k} (index says {weight_map[k]})" for k in wrong[:5])
        raise MoekitError(f"{index} disagrees with the files' headers for {len(wrong)} tensor(s): "
                          f"{shown}; the index or a shard is stale or corrupt")
    unlisted = [k for k in tensors if k not in weight_map]
    if unlisted:
        raise MoekitError(f"{index} does not list {len(unlisted)} tensor(s) found in the shards, "
                          f"e.g. {unlisted[0]} in {tensors[unlisted[0]].file}")


def read_config(folder: Path, name: str = "config.json") -> dict | None:
    """The ``config.json`` (or ``name``) of a checkpoint folder, or None when absent."""
    config = folder / name
    if not config.exists():
        return None
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise MoekitError(f"{config} is not valid JSON ({err})") from err
