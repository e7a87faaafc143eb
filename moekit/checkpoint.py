"""Reading a checkpoint's headers: tensor names, shapes, dtypes, files, config.json.

No tensor data is read here. A checkpoint is a folder with one ``model.safetensors`` or
HF-sharded ``model-0000i-of-0000n.safetensors`` files plus ``model.safetensors.index.json``
(a single ``.safetensors`` file is accepted too). Every problem found is reported with the
file it concerns.

Only what belongs to the checkpoint is read or copied: the weight files, the index, and
the sidecar files named in ``SIDECARS``. A symbolic link is followed only where it stays
inside the checkpoint folder or the Hugging Face cache repository the folder is a snapshot
of (``models--org--name/snapshots/REV/x -> ../../blobs/HASH``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from functools import partial
from operator import itemgetter
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from safetensors import SafetensorError, safe_open

from .dtypes import ITEMSIZES
from .errors import MoekitError, printable
from .plan import Expr, nbytes, reads

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
DCP_METADATA_NAME = ".metadata"
"""The file describing a torch.distributed.checkpoint folder (``moekit.dcp`` reads it)."""
SHARDING_INFO = "DCP_SHARDING_INFO"
"""The safetensors ``__metadata__`` key under which DCP's ``HuggingFaceStorageWriter``
(torch 2.13, ``save_distributed=True``) records, as JSON, where each tensor's chunk in
the file lies in the whole tensor (``_hf_utils.CUSTOM_METADATA_KEY``)."""
SAVED_OFFSETS = "saved_offsets"
"""A tensor's entry under ``SHARDING_INFO``: its chunk's offsets in the whole tensor."""
LAYOUT_METADATA_KEY = "moekit.layout"
FAMILY_METADATA_KEY = "moekit.family"

SIDECARS: dict[str, str] = {
    CONFIG_NAME: "model configuration",
    "generation_config.json": "generation defaults",
    "tokenizer.json": "tokenizer",
    "tokenizer_config.json": "tokenizer",
    "tokenizer.model": "tokenizer (SentencePiece)",
    "special_tokens_map.json": "tokenizer",
    "added_tokens.json": "tokenizer",
    "vocab.json": "tokenizer",
    "vocab.txt": "tokenizer",
    "merges.txt": "tokenizer",
    "spiece.model": "tokenizer (SentencePiece)",
    "sentencepiece.bpe.model": "tokenizer (SentencePiece)",
    "*.tiktoken": "tokenizer (tiktoken)",
    "chat_template.jinja": "chat template",
    "chat_template.json": "chat template",
    "preprocessor_config.json": "processor",
    "processor_config.json": "processor",
    "configuration_*.py": "remote code (trust_remote_code)",
    "modeling_*.py": "remote code (trust_remote_code)",
    "tokenization_*.py": "remote code (trust_remote_code)",
    "README.md": "model card",
    "LICENSE*": "licence",
    "NOTICE*": "licence notice",
    "USE_POLICY.md": "use policy",
}
"""Name patterns (case-sensitive globs) of the files of a checkpoint folder that are not
weights and travel with them to a converted checkpoint; what each is. Other files in the
folder (notes, other models, archives) are not the checkpoint's and are never copied."""

MODEL_CARD = "README.md"
"""The sidecar that describes a model (``SIDECARS``): it travels with the model's weights,
not with its config.json named for another checkpoint (``GivenConfig``)."""

MAX_INDEX_BYTES = 128 * 2**20
"""Largest safetensors index read: DeepSeek-V3's (91,000 tensors) is 8.4 MB, a
1,000,000-tensor checkpoint's about 100 MB."""
MAX_CONFIG_BYTES = 16 * 2**20
"""Largest config.json (or other JSON file of settings) read: real ones are kilobytes,
and parsing JSON builds up to 24 times its size in objects."""
MAX_JSON_CONTAINERS = 2**20
"""Most ``{`` and ``[`` characters read in one JSON file, a bound on the objects and arrays
it holds (an index holds three, a config.json tens), each of which parses to 56 bytes or
more from two."""


class TensorInfo(NamedTuple):
    """Where one tensor lives and what its header says. A named tuple: reading headers
    makes one for every tensor of a checkpoint (over a hundred thousand in the largest),
    in less than half a frozen dataclass's time."""

    key: str
    file: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    """Where the tensor's bytes start in ``file`` (for ``pread`` and kernel copies)."""
    chunks: tuple["TensorInfo", ...] = ()
    """For a tensor saved in row chunks (a DCP save of ``Shard(0)`` DTensors, one chunk a
    rank), each chunk's rows in order, each a run of its own file; ``file`` and
    ``offset`` are then the first non-empty chunk's. Empty for a tensor stored whole."""


@dataclass
class Checkpoint:
    """The headers of a safetensors (or torch.distributed.checkpoint) checkpoint, its
    config.json and its sidecar files."""

    path: Path
    tensors: dict[str, TensorInfo]
    config: dict | None
    metadata: dict[str, str] = field(default_factory=dict)
    """The safetensors ``__metadata__`` of the first shard (moekit records its layout there)."""
    sidecars: list["Sidecar"] = field(default_factory=list)
    """The folder's files listed in ``SIDECARS`` (none for a single named file), as they
    were when the checkpoint was opened."""
    read: list[Path] = field(default_factory=list)
    """Every file the headers were read from: weights, index, config.json."""
    named: Path | None = None
    """What the user named: the checkpoint folder, or its one ``.safetensors`` file (by
    default ``path``)."""
    identities: dict[str, "FileIdentity"] = field(default_factory=dict)
    """Weight file name -> what it was when its header was read (see ``open_unchanged``)."""
    made: dict[str, "Expr"] = field(default_factory=dict)
    """The model's tensors where the files store them in another form, each the recipe
    reading it from ``tensors`` (a Megatron-Core checkpoint's, under HF names): what the
    checkpoint is planned from. Empty where ``tensors`` are the model's."""
    training_state: dict[str, int] = field(default_factory=dict)
    """Entries of a training checkpoint's state beside the model (optimizer, learning-rate
    schedule, ...), not read, counted by the first part of their keys (a DCP folder's:
    ``moekit.dcp.TRAINING_STATE``; a Megatron-Core folder's: ``megatron_io``'s)."""

    def __post_init__(self) -> None:
        if self.named is None:
            self.named = self.path

    @classmethod
    def open(cls, path: str | Path, config: str | Path | None = None) -> "Checkpoint":
        """Read every header of the checkpoint at ``path``; raise MoekitError on bad input.

        ``config`` names the model's config.json where the checkpoint has none (training
        checkpoints seldom do), or to read it by instead of its own (``GivenConfig``).

        A folder is read with its index, config.json and sidecar files. A single
        ``.safetensors`` file named directly is that file alone (followed wherever it
        links, since the user named it): its folder's config.json is read for detection,
        but none of its neighbours is copied with it. A ``str`` that names no local path
        and reads as a Hugging Face repo id (``ORG/NAME[@REVISION]``) is that repository's
        snapshot in the local Hub cache (see ``moekit.hub``). A folder holding a DCP
        ``.metadata`` and no safetensors files is a torch.distributed.checkpoint.
        """
        from .hub import local_path  # not at the top: moekit.hub imports this module
        from .megatron_io import is_megatron  # likewise

        given = None if config is None else GivenConfig.read(config)
        local = local_path(path)
        if is_megatron(local):
            return cls._open_megatron(local, given)._with(given)
        if _is_dcp(local):
            return cls._open_dcp(local, given)._with(given)
        source = _locate(local)
        if source.unindexed:
            return cls._open_sharded(source, given)._with(given)
        return cls._open_safetensors(path, source, given)._with(given)

    @classmethod
    def _open_safetensors(cls, path: str | Path, source: "_Source",
                          given: "GivenConfig | None") -> "Checkpoint":
        """A folder of safetensors files with their index, or one safetensors file."""
        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, str] = {}
        identities: dict[str, FileIdentity] = {}
        for i, name in enumerate(source.files):
            file_meta, identities[name] = _read_header(source.folder, name, tensors)
            if i == 0:
                metadata = file_meta
        if source.weight_map is None and SHARDING_INFO in metadata:
            _check_whole(source.folder / source.files[0], metadata, tensors)
        if source.weight_map is not None:
            _check_index(source.folder / INDEX_NAME, source.weight_map, tensors)
        config, config_file = config_in(source.folder, given)
        read = [source.folder / f for f in source.files]
        if source.weight_map is not None:
            read.append(source.folder / INDEX_NAME)
        if config_file is not None:
            read.append(config_file.path)
        sidecars = [] if source.named_file else _sidecars(source.folder, set(source.files),
                                                          config_file)
        return cls(path=source.folder, tensors=tensors, config=config, metadata=metadata,
                   sidecars=sidecars, read=read,
                   named=Path(path) if source.named_file else source.folder,
                   identities=identities)

    @classmethod
    def _open_sharded(cls, source: "_Source", given: "GivenConfig | None") -> "Checkpoint":
        """A folder of several safetensors files and no index: the files that ranks saved
        with DCP's ``HuggingFaceStorageWriter`` (``moekit.chunks.sharded_safetensors``), each
        holding its rank's chunk of each tensor, with the sidecar files beside them or in
        NeMo AutoModel's ``HF_METADATA`` folder; any other such folder is refused."""
        folder = source.folder
        files: dict[str, tuple[dict[str, str], dict[str, TensorInfo]]] = {}
        identities: dict[str, FileIdentity] = {}
        for name in source.files:
            tensors: dict[str, TensorInfo] = {}
            metadata, identities[name] = _read_header(folder, name, tensors)
            files[name] = metadata, tensors
        lacking = [name for name, (metadata, _) in files.items() if SHARDING_INFO not in metadata]
        if lacking:
            mixed = (f" ({printable(lacking[0])} has no {SHARDING_INFO} metadata, which the "
                     "others have: files of two checkpoints?)" if len(lacking) < len(files) else "")
            raise MoekitError(f"{_shown(folder)} holds {len(files)} .safetensors files but no "
                              f"{INDEX_NAME} saying which tensors each holds{mixed}")
        from .chunks import sharded_safetensors  # imports this module

        tensors, made = sharded_safetensors(folder, files)
        beside = _metadata_folder(folder)
        config, config_file = config_in(beside, given)
        read = [folder / name for name in files]
        if config_file is not None:
            read.append(config_file.path)
        return cls(path=folder, tensors=tensors, config=config,
                   sidecars=_sidecars(beside, set(files), config_file), read=read,
                   identities=identities, made=made)

    @classmethod
    def _open_dcp(cls, folder: Path, given: "GivenConfig | None") -> "Checkpoint":
        """The headers of a torch.distributed.checkpoint folder (``moekit.dcp``): each
        tensor is a run of bytes of a ``.distcp`` file, read like a safetensors tensor; a
        training checkpoint's optimizer state and the like are passed over."""
        from .dcp import read_tensors  # imports torch, which DCP's metadata refers to

        data_files = {name: FileIdentity.of(member_file(folder, name).stat())
                      for name in sorted(p.name for p in folder.glob("*.distcp"))}
        headers = read_tensors(folder)
        tensors = headers.tensors
        used = list(dict.fromkeys(run.file for t in tensors.values()
                                  for run in t.chunks or (t,)))
        missing = [name for name in used if name not in data_files]
        if missing:
            raise MoekitError(f"{_shown(folder / DCP_METADATA_NAME)} names "
                              f"{printable(missing[0])}, which the folder lacks")
        config, config_file = config_in(folder, given)
        read = [folder / DCP_METADATA_NAME, *(folder / name for name in used)]
        if config_file is not None:
            read.append(config_file.path)
        return cls(path=folder, tensors=tensors, config=config,
                   sidecars=_sidecars(folder, {DCP_METADATA_NAME, *data_files}, config_file),
                   read=read, identities={name: data_files[name] for name in used},
                   made=headers.made, training_state=headers.training_state)

    @classmethod
    def _open_megatron(cls, path: Path, given: "GivenConfig | None") -> "Checkpoint":
        """A Megatron-Core ``torch_dist`` folder (``moekit.megatron_io``): its stored
        chunks, each a run of a ``.distcp`` file as in a DCP folder, and the model's tensors
        under HF names made from them (``made``)."""
        from .layouts.megatron import MEGATRON
        from .megatron_io import TRACKER, read_headers  # imports torch, like _open_dcp

        found = read_headers(path, given)
        used = list(dict.fromkeys(info.file for info in found.chunks.values()))
        if not set(used) <= found.identities.keys():
            raise _changed_while_read(found.iteration / next(
                name for name in used if name not in found.identities))
        identities = {name: found.identities[name] for name in used}
        read = [found.iteration / DCP_METADATA_NAME, *(found.iteration / name for name in used)]
        sidecars = _sidecars(found.top, {TRACKER, DCP_METADATA_NAME, *used}, found.config_file)
        if found.config_file is not None:
            read.append(found.config_file.path)
            if found.config_file.path.parent != found.top:
                sidecars.append(found.config_file)
        return cls(path=found.iteration, tensors=found.chunks, config=found.config,
                   metadata={LAYOUT_METADATA_KEY: MEGATRON.name}, sidecars=sidecars, read=read,
                   named=path, identities=identities, made=found.made,
                   training_state=found.training_state)

    def _with(self, given: "GivenConfig | None") -> "Checkpoint":
        """This checkpoint read by ``given`` (when not None): its config.json the one
        copied beside converted weights, and the other sidecar files of ``given``'s folder
        copied too where the checkpoint has none of that name."""
        if given is None:
            return self
        own = [sidecar for sidecar in self.sidecars if sidecar.name != CONFIG_NAME]
        names = {sidecar.name for sidecar in own}
        return replace(self, sidecars=[*own, given.file,
                                       *(s for s in given.others if s.name not in names)])

    @property
    def config_file(self) -> Path:
        """Where the config.json that the checkpoint is read by is (or would be)."""
        return next((sidecar.path for sidecar in self.sidecars if sidecar.name == CONFIG_NAME),
                    self.path / CONFIG_NAME)

    @property
    def files(self) -> list[str]:
        """The weight files, in order."""
        return list(dict.fromkeys(run.file for t in self.tensors.values()
                                  for run in t.chunks or (t,)))

    @property
    def model_type(self) -> str | None:
        return (self.config or {}).get("model_type")

    def file_of(self, key: str) -> str:
        if key in self.made:
            return self.tensors[reads(self.made[key])[0].key].file
        return self.tensors[key].file

    def total_bytes(self) -> int:
        return sum(nbytes(t.shape, t.dtype) for t in self.tensors.values())

    def extra_files(self) -> list["Sidecar"]:
        """The files to copy beside converted weights: the sidecars (config, tokenizer,
        generation config, ...), each checked when the checkpoint was opened and refused
        at the copy if it changed since."""
        return list(self.sidecars)

    def source_files(self) -> list[Path]:
        """The real path (symbolic links resolved) of every file of the checkpoint: what
        a destination must never replace."""
        return [p.resolve() for p in (*self.read, *(s.path for s in self.sidecars))]


@dataclass(frozen=True)
class FileIdentity:
    """What a file was when moekit read it: which file (device, inode), its size, and its
    modification and status-change times. Tensor offsets come from the header read then,
    so a file that differs later (rewritten, truncated, replaced by a re-download) must not
    be read. The status-change time (ctime) catches a rewrite whose writer put the
    modification time back (``touch -d``, ``os.utime``, an rsync of the same size), which
    no process can set; it also moves on chmod, chown and a new hard link, which are then
    refused alike."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> "FileIdentity":
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    def differences(self, now: "FileIdentity") -> list[str]:
        """How ``now`` differs from this identity, in words (empty when it does not)."""
        found = []
        if (now.device, now.inode) != (self.device, self.inode):
            found.append("it was replaced by another file")
        if now.size != self.size:
            found.append(f"its size went from {self.size:,} to {now.size:,} bytes")
        if now.mtime_ns != self.mtime_ns:
            found.append("it was modified")
        elif now.ctime_ns != self.ctime_ns:
            found.append("its status changed (ctime): it may have been rewritten with its "
                         "modification time put back, or its permissions or links changed")
        return found


@dataclass(frozen=True)
class Sidecar:
    """A file copied beside converted weights (``SIDECARS``) and what it was when the
    checkpoint was opened. The output is planned from the checkpoint as it was then, so a
    sidecar that is not the same file at the copy (rewritten, replaced by a re-download)
    is refused, as a weight file is (``check_unchanged``)."""

    path: Path
    identity: FileIdentity
    digest: str | None = None
    """sha256 of the bytes moekit parsed (config.json, which the plan was built from), to
    compare with the bytes copied: a rewrite at the same size that a coarse clock leaves
    with the same times still shows. None for a file moekit did not read."""

    copied_as: str | None = None
    """The name it is copied under, where not its own (a config.json named ``--config``)."""

    SINCE = "moekit opened the checkpoint"
    """When its identity was taken, as ``check_unchanged`` says it."""

    @property
    def name(self) -> str:
        return self.copied_as or self.path.name

    @classmethod
    def of(cls, path: Path) -> "Sidecar":
        """The file at ``path`` (links followed) as it is now."""
        try:
            return cls(path, FileIdentity.of(path.stat()))
        except OSError as err:
            raise MoekitError(f"cannot read {_shown(path)}: {err.strerror or err}") from err


def as_path(value: object, role: str) -> Path:
    """``value`` as a Path when it is a str or an ``os.PathLike``; MoekitError naming the
    ``role`` of the argument (and the type given) otherwise, and for an empty path, which
    ``Path`` would read as the current directory (an unset variable in a script). A
    ``Path("")`` is ``Path(".")`` already, and taken as that."""
    if isinstance(value, (str, os.PathLike)) and not isinstance(value, bytes):
        if os.fspath(value) == "":
            raise MoekitError(f"the {role} path is empty")
        return Path(value)
    raise MoekitError(f"the {role} path must be a str or a pathlib.Path, not "
                      f"{type(value).__name__} ({printable(repr(value))})")


def open_regular(path: Path, follow_links: bool = True) -> int:
    """A read-only descriptor of the plain file at ``path`` (links followed, unless not
    ``follow_links``: then a link is refused), opened without blocking, so that a named
    pipe or device put in a file's place is refused rather than waited on; MoekitError
    naming the file otherwise."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise MoekitError(f"cannot open {_shown(path)}: {err.strerror or err}") from err
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise MoekitError(f"{_shown(path)} is no longer a plain file (it is "
                              f"{'a folder' if stat.S_ISDIR(mode) else 'a pipe or device'} "
                              "now); was the checkpoint changed while moekit ran?")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_unchanged(path: Path, identity: FileIdentity,
                   since: str = "moekit read its header") -> int:
    """``open_regular(path)``, refused when the file is not the one ``identity``
    describes (its header, and so every offset moekit planned with, may be stale)."""
    fd = open_regular(path)
    try:
        check_unchanged(fd, path, identity, since)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_unchanged(fd: int, path: Path, identity: FileIdentity,
                    since: str = "moekit read its header") -> None:
    """Raise MoekitError when the open file ``fd`` no longer is what ``identity`` says
    (taken when ``since`` says, in the message)."""
    differences = identity.differences(FileIdentity.of(os.fstat(fd)))
    if differences:
        raise changed_since(path, since, differences)


def changed_since(path: Path, since: str, differences: list[str]) -> MoekitError:
    """The refusal of a checkpoint file that changed since ``since``, in the ways
    ``differences`` says."""
    return MoekitError(f"{_shown(path)} changed since {since} ({'; '.join(differences)}); "
                       "was it being written or downloaded while moekit ran? Run again once "
                       "the checkpoint is complete")


@dataclass(frozen=True)
class _Source:
    folder: Path
    files: list[str]
    weight_map: dict[str, str] | None
    """The index's tensor -> file map; None when the checkpoint has no index."""
    named_file: bool
    """True when the user named one ``.safetensors`` file rather than a folder."""
    unindexed: bool = False
    """True for a folder of several safetensors files and no index (``_open_sharded``)."""


AUTOMODEL_WEIGHTS = "model"
"""The folder of a NeMo AutoModel 0.7 checkpoint (``step-N``) that holds its weights
(``Checkpointer.save_model``), the optimizer's state beside it in ``optim``."""
HF_METADATA = ".hf_metadata"
"""Where NeMo AutoModel 0.7 puts the config.json, generation config and tokenizer files
of a checkpoint's ``model/`` folder of sharded safetensors files (``Checkpointer.save_model``)."""


def _metadata_folder(folder: Path) -> Path:
    """The folder of the sidecar files of sharded safetensors files in ``folder``: its
    ``HF_METADATA`` folder where it has no config.json and that is a folder of its own
    (not a link), else ``folder``."""
    inner = folder / HF_METADATA
    if (os.path.lexists(folder / CONFIG_NAME) or inner.is_symlink()
            or _kind(inner) != "folder"):
        return folder
    return inner


def is_checkpoint_folder(path: Path) -> bool:
    """Whether ``path`` is a folder of weights without safetensors files: a
    torch.distributed.checkpoint or Megatron-Core one."""
    from .megatron_io import is_megatron  # imports this module

    return _is_dcp(path) or is_megatron(path)


def _is_dcp(path: Path) -> bool:
    """Whether ``path`` is a torch.distributed.checkpoint folder: a ``.metadata`` and no
    safetensors files."""
    return (_kind(path) == "folder" and os.path.lexists(path / DCP_METADATA_NAME)
            and not any(path.glob("*.safetensors")))


def _locate(path: Path) -> _Source:
    """The folder, weight files and index of the checkpoint at ``path``."""
    kind = _kind(path)
    if kind == "missing":
        raise MoekitError(f"no checkpoint at {_shown(path)}: the path does not exist")
    if kind == "file":
        if path.suffix != ".safetensors":
            raise MoekitError(f"{_shown(path)} is not a .safetensors file nor a checkpoint folder")
        return _Source(path.parent, [path.name], None, named_file=True)
    if kind != "folder":
        raise MoekitError(f"{_shown(path)} is {kind}, not a checkpoint folder or a "
                          ".safetensors file")
    if os.path.lexists(path / INDEX_NAME):
        index = member_file(path, INDEX_NAME)
        weight_map = _read_index(index)
        files = _index_files(index, weight_map)
        for name in files:
            member_file(path, name, f"named by {INDEX_NAME}")
        return _Source(path, files, weight_map, named_file=False)
    if os.path.lexists(path / SINGLE_NAME):
        return _Source(path, [member_file(path, SINGLE_NAME).name], None, named_file=False)
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if not found:
        inner = path / AUTOMODEL_WEIGHTS
        hint = (f"; its weights are in {_shown(inner)} (as NeMo AutoModel saves them): name "
                "that folder" if _kind(inner) == "folder" and any(inner.glob("*.safetensors"))
                else "")
        raise MoekitError(f"{_shown(path)} holds no .safetensors files (looked for {INDEX_NAME} "
                          f"and {SINGLE_NAME}){hint}")
    return _Source(path, [member_file(path, name).name for name in found], None,
                   named_file=False, unindexed=len(found) > 1)


def _kind(path: Path) -> str:
    """"file", "folder", "missing", or what else ``path`` is (symbolic links followed)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as err:
        raise MoekitError(f"cannot read {_shown(path)}: {err}") from err
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a plain file"


def member_file(folder: Path, name: str, why: str = "") -> Path:
    """``folder / name`` once it is known to be a plain file of the checkpoint: its real
    path (links followed) inside the folder or the folder's Hugging Face cache repository."""
    file = folder / name
    shown = _shown(file) + (f" ({why})" if why else "")
    try:
        real = file.resolve(strict=True)
    except FileNotFoundError:
        if file.is_symlink():
            raise MoekitError(f"{shown} is a symbolic link to {_shown(Path(os.readlink(file)))}, "
                              "which does not exist; the checkpoint is incomplete "
                              "(re-download or re-save it)") from None
        raise MoekitError(f"{shown} does not exist; the checkpoint is incomplete (re-download "
                          "or re-save it)") from None
    except (OSError, RuntimeError) as err:
        raise MoekitError(f"cannot resolve {shown}: {err}") from err
    roots = _roots(folder)
    if not any(real.is_relative_to(root) for root in roots):
        target = Path(os.readlink(file)) if file.is_symlink() else None
        link = (f"is a symbolic link to {_shown(target)}" if target is not None
                else "lies under a symbolic link")
        if target != real:
            link += f", which leads to {_shown(real)}"
        where = " or its Hugging Face cache repository" if len(roots) > 1 else ""
        raise MoekitError(
            f"{shown} {link}, outside the checkpoint folder "
            f"{_shown(roots[0])}{where}; moekit reads only files inside the checkpoint (copy "
            "the file into the folder if it belongs to the checkpoint)")
    kind = _kind(real)
    if kind != "file":
        raise MoekitError(f"{shown} is {'a folder' if kind == 'folder' else kind}, not a file")
    return file


def _roots(folder: Path) -> list[Path]:
    """Where a checkpoint's files may really live: its folder and, for a Hugging Face cache
    snapshot (``models--org--name/snapshots/REV``), that cache repository."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        roots.append(real.parent.parent)
    return roots


def _read_index(index: Path) -> dict[str, str]:
    data = _read_json(index, MAX_INDEX_BYTES)
    if "weight_map" not in data:
        raise MoekitError(f"{_shown(index)} is not a safetensors index: it has no 'weight_map'")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise MoekitError(f"{_shown(index)}: 'weight_map' is {_json_type(weight_map)}, not a "
                          "mapping of tensor names to files")
    if not weight_map:
        raise MoekitError(f"{_shown(index)}: 'weight_map' lists no tensors")
    return weight_map


def index_files(folder: Path) -> list[str]:
    """The weight files the safetensors index of ``folder`` names, in order."""
    index = member_file(folder, INDEX_NAME)
    return _index_files(index, _read_index(index))


def _index_files(index: Path, weight_map: dict) -> list[str]:
    """The files the index names, in order; every one a relative path inside the folder,
    written in ``weight_map`` as one name a file (``./a.safetensors`` as ``a.safetensors``,
    as the file system reads them)."""
    if not set(map(type, weight_map.values())) <= {str}:  # in C; JSON makes no str subclass
        key, value = next((k, v) for k, v in weight_map.items() if type(v) is not str)
        raise MoekitError(f"{_shown(index)}: the weight_map entry of {printable(key)} is "
                          f"{_json_type(value)}, not a file name")
    files = list(dict.fromkeys(weight_map.values()))
    for name in files:
        parts = PurePosixPath(name).parts
        if not name or "\0" in name or name.startswith("/") or ".." in parts:
            raise MoekitError(
                f"{_shown(index)} names the file {printable(repr(name))}, which is not a file "
                "inside the checkpoint folder (an index names its shards by relative paths "
                "without '..'); moekit reads nothing outside the checkpoint")
    normal = {name: PurePosixPath(name).as_posix() for name in files}
    if any(name != written for written, name in normal.items()):
        weight_map.update({key: normal[name] for key, name in weight_map.items()})
        files = list(dict.fromkeys(normal.values()))
    return files


def _read_header(folder: Path, name: str, tensors: dict[str, TensorInfo]
                 ) -> tuple[dict[str, str], "FileIdentity"]:
    """Add the tensors of one file's header to ``tensors``; return its metadata and what
    the file was just before its header was read (a file changed while it is read then
    differs from that identity when its bytes are read).

    safetensors validates the file (offsets contiguous and filling the data section,
    which ends the file; shapes matching sizes); the names, shapes, dtypes and offsets
    are then read from the JSON header in one parse, tensors listed in the order of
    their bytes."""
    file = folder / name
    try:
        identity = FileIdentity.of(file.stat())  # taken first, so a change while read shows
        with safe_open(str(file), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
        start, entries, twice = _header_entries(file)
    except SafetensorError as err:
        raise MoekitError(f"cannot read {_shown(file)}: {err} (the file is truncated or "
                          "corrupt)") from err
    except OSError as err:
        raise MoekitError(f"cannot read {_shown(file)}: {err.strerror or err}") from err
    if twice is not None:
        raise MoekitError(f"{_shown(file)}: its header gives {printable(twice)} twice, with "
                          "different entries (readers disagree on which one counts); the file "
                          "is corrupt: re-download or re-save it")
    try:
        _add_entries(file, name, start, entries, tensors)
    except (TypeError, KeyError, IndexError):
        raise _changed_while_read(file) from None
    return metadata, identity


def _add_entries(file: Path, name: str, start: int, entries: dict[str, dict],
                 tensors: dict[str, TensorInfo]) -> None:
    """Add the header ``entries`` of ``file`` (``name``), whose data section starts at
    byte ``start``, to ``tensors`` in the order of their bytes. Each entry is taken to be
    as safetensors checked it; a TypeError, KeyError or IndexError here means the file
    was rewritten after that check."""
    infos = [_NEW_INFO((key, name, tuple(entry["shape"]), entry["dtype"],
                        start + entry["data_offsets"][0], ())) for key, entry in entries.items()]
    infos.sort(key=_OFFSET)
    for info in infos:
        key, _, shape, dtype, _, _ = info
        if key in tensors:
            raise MoekitError(f"tensor {printable(key)} is stored twice: in "
                              f"{printable(tensors[key].file)} and in {printable(name)}")
        if dtype not in ITEMSIZES or 0 in shape:
            _check_entry(file, key, shape, dtype)
        tensors[key] = info


_NEW_INFO = partial(tuple.__new__, TensorInfo)
"""A TensorInfo of a tuple of its six fields, made in C: its class's ``__new__``, which
gives ``chunks`` its default, is Python, and a checkpoint's headers can hold over a
hundred thousand entries (with 32,700 of them, the header read would take 5 to 8 % longer
through it)."""
_OFFSET = itemgetter(4)
"""A TensorInfo's ``offset``, as a sort key that runs in C."""
_FILE = itemgetter(1)
"""A TensorInfo's ``file``."""


def _header_entries(file: Path) -> tuple[int, dict[str, dict], str | None]:
    """The byte where the data section of the safetensors file ``file`` (validated by
    safetensors) starts, its tensor entries by name, and a name its header gives twice
    with different entries (else None).

    A name given twice is lost once the JSON is parsed into dicts, so the parse is
    trusted only when the header has as many colons as the dicts have pairs, and as the
    metadata's strings hold (``_quoted_colons``): each pair has one colon, and any other
    colon inside a string only adds to the count. Any other header (a name given twice, a
    colon in a name, a colon written escaped, metadata that is not strings) is parsed
    again into tuples of pairs, where a name given twice is still there to be seen."""
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        raw = handle.read(length)
    try:
        objects = json.loads(raw)
    except (ValueError, RecursionError):
        raise _changed_while_read(file) from None
    if not isinstance(objects, dict) or raw.count(b":") != _pairs(objects) + _quoted_colons(
            objects, raw):
        return 8 + length, *_pairwise_entries(file, raw)
    objects.pop("__metadata__", None)
    return 8 + length, objects, None


def _pairs(objects: dict) -> int:
    """The pairs of a parsed header: its own and those of the objects it holds."""
    values = objects.values()
    if set(map(type, values)) == {dict}:  # every value an object, as in a valid header
        return len(objects) + sum(map(len, values))
    return len(objects) + sum(len(value) for value in values if type(value) is dict)


def _quoted_colons(objects: dict, raw: bytes) -> int:
    """The colons inside the strings of a parsed header's ``__metadata__`` (a value may
    hold JSON, as DCP's sharding info does), each one of ``raw``'s colons that is no
    pair's; -1, which no count matches, where ``raw`` may write a colon escaped (then the
    parsed strings hold colons that ``raw`` does not) or the metadata holds other than
    strings."""
    metadata = objects.get("__metadata__")
    if type(metadata) is not dict:
        return 0
    if set(map(type, metadata.values())) - {str}:
        return -1
    colons = sum(key.count(":") + value.count(":") for key, value in metadata.items())
    if colons and (b"\\u003a" in raw or b"\\u003A" in raw):  # scanned only when it matters
        return -1
    return colons


def _pairwise_entries(file: Path, raw: bytes) -> tuple[dict[str, dict], str | None]:
    """The tensor entries of the JSON header ``raw`` of ``file`` by name, and a name it
    gives twice with different entries (else None): parsed into tuples of pairs (the hook
    is a C type, so the parse runs at the decoder's speed)."""
    try:
        pairs = json.loads(raw, object_pairs_hook=tuple)
    except (ValueError, RecursionError):
        raise _changed_while_read(file) from None
    names = dict(pairs)
    objects = {key: dict(value) if type(value) is tuple else value
               for key, value in names.items()}
    repeated = len(names) != len(pairs) or any(
        len(objects[key]) != len(value) for key, value in names.items() if type(value) is tuple)
    objects.pop("__metadata__", None)
    return objects, _given_twice(raw) if repeated else None


def _changed_while_read(file: Path) -> MoekitError:
    return MoekitError(f"{_shown(file)} changed while its header was read; was it being "
                       "written or downloaded? Run again once the checkpoint is complete")


def _given_twice(header: bytes) -> str | None:
    """A name that the JSON ``header`` of a safetensors file gives twice with different
    values, else None."""
    twice: list[str] = []

    def pairs(items: list[tuple[str, object]]) -> dict:
        seen: dict[str, object] = {}
        for key, value in items:
            if key in seen and seen[key] != value:
                twice.append(key)
            seen[key] = value
        return seen

    json.loads(header, object_pairs_hook=pairs)
    return twice[0] if twice else None


MAX_INT64 = 2**63 - 1


def _check_whole(file: Path, metadata: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    """Refuse the one safetensors file of a checkpoint that DCP's ``HuggingFaceStorageWriter``
    saved when its ``SHARDING_INFO`` places a tensor anywhere but at the start of the whole
    tensor: it holds one rank's chunks, not whole tensors (a file saved by one rank starts
    every tensor at 0)."""
    placed = saved_offsets(file, metadata, tensors)
    key = next((key for key, offsets in placed.items() if any(offsets)), None)
    if key is not None:
        raise MoekitError(f"{_shown(file)} holds one rank's chunks of its tensors, not whole "
                          f"tensors ({printable(key)} starts at {list(placed[key])} of its "
                          f"whole, by its {SHARDING_INFO} metadata): name the folder that "
                          "holds every rank's file")


def saved_offsets(file: Path, metadata: dict[str, str], tensors: dict[str, TensorInfo]
                   ) -> dict[str, tuple[int, ...]]:
    """Each tensor's offsets in its whole tensor, from ``file``'s ``SHARDING_INFO``."""
    shown = f"{_shown(file)}: its {SHARDING_INFO} metadata"
    try:
        info = json.loads(metadata[SHARDING_INFO])
    except (ValueError, RecursionError) as err:
        raise MoekitError(f"{shown} is not JSON moekit reads: {printable(str(err))}") from None
    found = {}
    for key, tensor in tensors.items():
        entry = info.get(key) if isinstance(info, dict) else None
        offsets = entry.get(SAVED_OFFSETS) if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == len(tensor.shape)
                and all(type(n) is int and 0 <= n < 2**62 for n in offsets)):
            raise MoekitError(f"{shown} gives no {SAVED_OFFSETS} for {printable(key)} of "
                              f"shape {list(tensor.shape)} (one whole number from 0 a "
                              "dimension)")
        found[key] = tuple(offsets)
    return found


def _check_entry(file: Path, key: str, shape: tuple[int, ...], dtype: str) -> None:
    """Refuse a dtype moekit cannot handle and an empty shape whose strides overflow 64
    bits (safetensors checks the byte size of the others against their offsets)."""
    if dtype not in ITEMSIZES:
        raise MoekitError(f"{_shown(file)}: tensor {printable(key)} has dtype {dtype}, which "
                          f"moekit does not handle ({', '.join(ITEMSIZES)})")
    if 0 in shape and math.prod(max(n, 1) for n in shape) * ITEMSIZES[dtype] > MAX_INT64:
        raise MoekitError(f"{_shown(file)}: tensor {printable(key)} has shape {list(shape)}, "
                          "whose strides overflow 64-bit byte counts: no reader can lay it "
                          "out; the file is corrupt")


def _check_index(index: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]
                 ) -> None:
    """Raise when the index and the files' headers disagree on where a tensor is."""
    if dict(zip(tensors, map(_FILE, tensors.values()))) == weight_map:
        return
    wrong = [k for k, f in weight_map.items() if k not in tensors or tensors[k].file != f]
    if wrong:
        shown = ", ".join(f"{printable(k)} (index says {printable(weight_map[k])})"
                          for k in wrong[:5])
        raise MoekitError(f"{_shown(index)} disagrees with the files' headers for {len(wrong)} "
                          f"tensor(s): {shown}; the index or a shard is stale or corrupt")
    unlisted = [k for k in tensors if k not in weight_map]
    if unlisted:
        raise MoekitError(f"{_shown(index)} does not list {len(unlisted)} tensor(s) found in "
                          f"the shards, e.g. {printable(unlisted[0])} in "
                          f"{printable(tensors[unlisted[0]].file)}")


def _sidecars(folder: Path, weights: set[str], read: Sidecar | None) -> list[Sidecar]:
    """The folder's files named in ``SIDECARS``, each checked to be a plain file of the
    checkpoint (a link leaving it is refused, not followed), as they are now; ``read``
    (config.json) as it was when read, and the folder's own config.json left out where
    ``read`` is another file (one the user named, which replaces it)."""
    try:
        names = sorted(entry.name for entry in os.scandir(folder))
    except OSError as err:
        raise MoekitError(f"cannot list {_shown(folder)}: {err.strerror or err}") from err
    if read is not None and read.path != folder / CONFIG_NAME:
        weights = {*weights, CONFIG_NAME}
    return [read if read is not None and folder / name == read.path
            else Sidecar.of(member_file(folder, name)) for name in names
            if name not in weights and any(fnmatchcase(name, p) for p in SIDECARS)]


def read_config(folder: Path, name: str = CONFIG_NAME) -> dict | None:
    """The ``config.json`` (or ``name``) of a checkpoint folder, or None when absent.

    It must be a JSON object, a plain file inside the checkpoint, and its ``model_type``
    (when present) a string."""
    found = read_config_file(folder, name)
    return None if found is None else found[0]


@dataclass(frozen=True)
class GivenConfig:
    """A config.json the user names for a checkpoint (``--config``; ``config=``): a JSON
    file of any name, or a folder (or Hugging Face repo id, from the local Hub cache)
    holding one. Nothing is written into the checkpoint's own folder."""

    config: dict
    file: Sidecar
    """The config file, copied as config.json."""
    others: tuple[Sidecar, ...] = ()
    """A folder's other sidecar files (``SIDECARS``: tokenizer, generation config, chat
    template, processor, remote code, licence and use policy), copied beside converted
    weights where the checkpoint has none of their names; not its model card
    (``MODEL_CARD``), which describes that model, not the checkpoint."""

    @staticmethod
    def named(value: str | Path) -> str | Path:
        """What ``value`` names: a path where it ends in ``.json`` (never a repo id),
        else a path or a repo id as a checkpoint argument is."""
        if isinstance(value, str) and (not value or value.endswith(".json")):
            if not value:
                raise MoekitError("the config named is an empty path")
            return Path(value)
        return value

    @classmethod
    def read(cls, value: str | Path) -> "GivenConfig":
        """The config ``value`` names (``named``), a repo id from the local Hub cache."""
        from .hub import local_path  # not at the top: moekit.hub imports this module

        path = local_path(cls.named(value), "config", weights=False)
        if path.is_dir():
            return cls._of_folder(path)
        if not path.is_file():
            raise MoekitError(f"the config {_shown(path)} "
                              + ("is not a file or folder" if os.path.lexists(path)
                                 else "does not exist"))
        real = path.resolve()  # a file named by the user is read wherever it links
        config, file = _found_config(real.parent, real.name)
        return cls(config, replace(file, copied_as=CONFIG_NAME))

    @classmethod
    def _of_folder(cls, folder: Path) -> "GivenConfig":
        """The config.json of ``folder`` and the files that travel with it (``others``)."""
        config, file = _found_config(folder, CONFIG_NAME)
        return cls(config, file, tuple(s for s in _sidecars(folder, set(), file)
                                       if s.name not in (CONFIG_NAME, MODEL_CARD)))


def _found_config(folder: Path, name: str) -> tuple[dict, Sidecar]:
    """``read_config_file`` of a config the user named, which must exist."""
    found = read_config_file(folder, name)
    if found is None:
        raise MoekitError(f"the config folder {_shown(folder)} holds no {name}"
                          if name == CONFIG_NAME else
                          f"the config {_shown(folder / name)} does not exist")
    return found


def config_in(folder: Path, given: GivenConfig | None) -> tuple[dict | None, Sidecar | None]:
    """The config a checkpoint is read by: ``given``'s, else its folder's, else none."""
    if given is not None:
        return given.config, given.file
    return read_config_file(folder) or (None, None)


def read_config_file(folder: Path, name: str = CONFIG_NAME) -> tuple[dict, Sidecar] | None:
    """``read_config``, with the file as it was when read (the sidecar copied)."""
    if not os.path.lexists(folder / name):
        return None
    config = member_file(folder, name)
    info, raw = _read_json_bytes(config, MAX_CONFIG_BYTES)
    data = _parse_json(config, raw)
    model_type = data.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise MoekitError(f"{_shown(config)}: model_type is {_json_type(model_type)}, not a "
                          "string")
    return data, Sidecar(config, FileIdentity.of(info), hashlib.sha256(raw).hexdigest())


def _read_json(file: Path, limit: int) -> dict:
    """The JSON object in ``file``, of at most ``limit`` bytes (``_read_json_bytes``); a
    MoekitError naming the file for anything else."""
    return _parse_json(file, _read_json_bytes(file, limit)[1])


def _read_json_bytes(file: Path, limit: int) -> tuple[os.stat_result, bytes]:
    """What the JSON file ``file`` was when it was opened (a change while it is read then
    differs from it), and its bytes: at most ``limit`` of them and ``MAX_JSON_CONTAINERS``
    objects and arrays, so that parsing them takes bounded memory."""
    try:
        with open(file, "rb") as handle:
            info = os.fstat(handle.fileno())
            if info.st_size > limit:
                raise MoekitError(f"{_shown(file)} is {info.st_size:,} bytes; moekit reads a "
                                  f"{printable(file.name)} of at most {limit:,} bytes")
            raw = handle.read(info.st_size + 1)
    except OSError as err:
        raise MoekitError(f"cannot read {_shown(file)}: {err.strerror or err}") from err
    brackets = raw.count(b"{") + raw.count(b"[")
    if brackets > MAX_JSON_CONTAINERS:
        raise MoekitError(f"{_shown(file)} holds {brackets:,} '{{' and '[' characters, more "
                          f"than the {MAX_JSON_CONTAINERS:,} objects and arrays moekit reads "
                          "in one JSON file")
    return info, raw


def _parse_json(file: Path, raw: bytes) -> dict:
    """The JSON object ``raw`` holds, read from ``file``; a MoekitError naming the file
    for anything else."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MoekitError(f"{_shown(file)} is not UTF-8 text (byte {err.start} is "
                          f"{raw[err.start]:#04x}); JSON files are UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise MoekitError(f"{_shown(file)} is not valid JSON ({err.msg} at line {err.lineno}, "
                          f"column {err.colno})") from None
    except RecursionError:
        raise MoekitError(f"{_shown(file)} nests its JSON values too deeply to be read; it is "
                          "not a checkpoint file") from None
    except ValueError as err:
        raise MoekitError(f"{_shown(file)} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise MoekitError(f"{_shown(file)} holds {_json_type(data)}; expected a JSON object "
                          "({...})")
    return data


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, with its article ("an array")."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _shown(path: Path) -> str:
    """A path as messages print it (escaped where its name holds control characters)."""
    return printable(str(path))
