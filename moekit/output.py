"""Output folders that never replace what the user did not name.

A checkpoint is written into a temporary folder beside its destination
(``.NAME.moekit-XXXXXXXX``, on the same file system) and moved into place only when
complete:

- The final move is an atomic no-replace rename (``renameat2(RENAME_NOREPLACE)``; where the
  file system lacks it, an exclusive ``mkdir`` claims the destination and the folder is
  renamed onto that empty folder).
  A destination that appears while moekit writes is kept, and this run fails.
- ``overwrite`` replaces only a folder holding a checkpoint (``CHECKPOINT_FILES``) and no
  byte of the source, checked again at the moment of the move. The old folder is swapped
  out (``RENAME_EXCHANGE``, or renamed aside) and deleted only once the new one is in place.
  A destination that is a symlink to such a folder keeps its link: the folder it points to
  is replaced, as ``rsync`` writes through a symlinked destination.
- Every file is fsynced, then the folder before the move, and its parent after (as
  ``torch.distributed.checkpoint`` does). A file handed to ``sync_soon`` once written is
  fsynced by a background thread while the next is written; the move waits for those.
- The folder and every file in it get the mode the umask allows, as ``mkdir`` and ``cp``
  (without ``-p``) give; sidecar files are copied without their source's mode.
- SIGINT, SIGTERM and SIGHUP are held while the folder is moved into place and while a
  failed one is removed, then delivered: neither is cut short, and an interrupt that comes
  once the output is in place says so (``in_place``).
- The temporary folder holds a marker naming its process until the move, so that a folder
  left by a killed run is removed by a later run once that process is provably gone (this
  machine, by its machine id or this boot, and the process ended or the machine rebooted
  since), and reported otherwise.
- Errors of the destination's file system (full, read-only, quota, ...) become one
  ``MoekitError`` naming the destination and what to do.

Linux only: renameat2, copy_file_range and O_DIRECT are Linux calls.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import io
import json
import logging
import os
import pickletools
import platform
import re
import secrets
import shlex
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from fnmatch import fnmatchcase
from pathlib import Path
from stat import S_ISDIR

from safetensors import SafetensorError, safe_open

from .checkpoint import (SIDECARS, Sidecar, as_path, changed_since, check_unchanged,
                         open_regular, open_unchanged)
from .errors import MoekitError, printable

log = logging.getLogger("moekit")

DCP_FILES = ("*.distcp", ".metadata")
"""Names of the files of a ``torch.distributed.checkpoint`` folder (``--format dcp``)."""
CHECKPOINT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                    "pytorch_model.bin.index.json", "adapter_config.json", ".gitattributes",
                    *DCP_FILES, "latest_checkpointed_iteration.txt", *SIDECARS)
"""Names of the files a checkpoint folder holds (weights, indexes, DCP files, Megatron-Core's
tracker, the sidecar files moekit copies, and what else the Hugging Face Hub keeps beside
them): ``overwrite`` replaces a folder holding nothing else (but ``ITERATION`` folders)."""
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", ".metadata")
"""Names of the files that hold weights (a DCP folder's ``.distcp`` files only with its
``.metadata``): a folder ``overwrite`` replaces holds one at least (or an ``ITERATION``
folder), unless it is empty, and each is what its name says (``_not_weights``)."""
TORCH_SAVE_STARTS = (b"PK\x03\x04", b"\x80")
"""How a ``torch.save`` file starts: a zip archive, or (the legacy format) a pickle of
protocol 2 or later."""
DCP_METADATA_CLASS = ("torch.distributed.checkpoint.metadata", "Metadata")
"""The class whose instance a DCP ``.metadata`` pickles, the first class its pickle names."""
PICKLE_HEAD_BYTES = 4096
"""Bytes of a ``.metadata`` read to find the first class it names."""
ITERATION = re.compile(r"iter_\d{7}\Z")
"""A Megatron-Core checkpoint's iteration folder, which ``overwrite`` replaces when it holds
only ``ITERATION_FILES``."""
ITERATION_FILES = (*DCP_FILES, "common.pt", "metadata.json")
"""Names of the files of a Megatron-Core ``torch_dist`` iteration folder."""

TEMP_INFIX = ".moekit-"
"""Temporary folders are named ``.{destination name}.moekit-{random}`` (a destination name
too long for that is shortened, and a digest of it added)."""
NAME_MAX = 255
"""Longest file name, in bytes, of the file systems moekit writes to (ext4, XFS, btrfs,
tmpfs, NFS)."""
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals held while an output is put in place or a failed one removed, and delivered
once that is done, so that neither is cut short."""
MARKER = ".moekit-partial"
"""The file in a temporary folder naming the process that writes it; removed just before
the folder is moved into place, so that it never reaches an output."""
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
"""Where this machine's id is read, the first that holds one (32 hex digits): what tells
two machines apart that share a host name and a file system (NFS), where a boot id that
differs says only that the kernel is not the one running here."""

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "riscv64": 276}
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS)
"""What renameat2 answers where the kernel or the file system lacks a flag."""
COPY_CHUNK = 8 * 2**20
"""Bytes read at a time when a sidecar file is copied."""

_ADVICE = {
    errno.ENOSPC: "the file system is full: free space there or choose a destination on "
                  "another disk",
    errno.EDQUOT: "your disk quota there is used up: free space within it or choose "
                  "another destination",
    errno.EFBIG: "a file is larger than this file system allows: pass a smaller "
                 "--max-shard-size (max_shard_size=) or choose another file system",
    errno.EROFS: "the file system is read-only: choose a writable destination",
    errno.EACCES: "permission denied: choose a destination you may write to",
    errno.EPERM: "the operation is not permitted there: choose a destination you may write to",
    errno.EBUSY: "the path is busy (a mount point, or in use): unmount it or choose another "
                 "destination",
    errno.EIO: "the disk reported an I/O error: check it, then run again",
    errno.EXDEV: "moekit puts the new folder in place by renaming it, which this file system "
                 "refuses for that folder (an overlayfs folder from a lower layer): write to a "
                 "new destination",
    errno.ENAMETOOLONG: "a name in the path is longer than this file system allows: choose "
                        "a shorter destination",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another destination",
    errno.ELOOP: "the path has a loop of symbolic links: fix the links or choose another "
                 "destination",
}
"""Errors of the destination's file system that a user fixes by acting on the destination."""


def require_linux() -> None:
    """Raise MoekitError on a platform other than Linux (writes use Linux-only calls)."""
    if sys.platform != "linux":
        raise MoekitError(f"moekit writes checkpoints with Linux system calls (renameat2, "
                          f"copy_file_range, O_DIRECT) and runs on Linux only; this is "
                          f"{sys.platform}")


def check_destination(dst: Path, sources: Sequence[Path], overwrite: bool,
                      source_files: Iterable[Path] = ()) -> Path:
    """Refuse a destination that would lose data or that cannot be written; return the
    folder the output will take.

    Refused: each of the ``sources`` (a checkpoint folder, or the one file the user named)
    itself, inside it or holding it, by path or by identity (the same folder reached
    through a bind mount); a folder holding any byte of a file of the sources
    (``source_files`` and the files at the top of each source, their symlinks resolved, hard
    links compared by inode: a Hugging Face snapshot links into ``../../blobs/``); an
    existing destination unless ``overwrite``; and with ``overwrite`` anything but a folder
    holding only a checkpoint, and a mount point. A symlink to a folder is replaced at its
    target (the link is kept); a dangling one is refused. A path that cannot be made (a
    file where a folder should be, a name too long, a loop of links) is refused too, and so
    is one below a dangling link (``mkdir -p`` would make folders where it leads), all as
    MoekitError."""
    dst = as_path(dst, "destination")
    try:
        _check_path(dst)
        target = _target(dst, overwrite)
        for src in sources:
            _check_source(target, Path(src))
        _check_held_files(target, [*source_files,
                                   *(f for src in sources for f in _files_at_top(Path(src)))])
        if os.path.lexists(dst):
            if not overwrite:
                raise MoekitError(f"destination {dst} already exists; pass --overwrite "
                                  "to replace it (only a folder holding a checkpoint is "
                                  "replaced)")
            _check_replaceable(target, dst)
    except OSError as err:
        raise output_error(err, dst, left=False) or MoekitError(
            f"cannot check the destination {dst}: {err.strerror or err}") from err
    return target


def _check_path(dst: Path) -> None:
    """Refuse a destination name too long for the file system, one below a file, and one
    below a symbolic link that leads nowhere."""
    length = len(os.fsencode(dst.name))
    if length > NAME_MAX:
        raise MoekitError(f"destination name {dst.name[:40]}... is {length} "
                          f"bytes long; file names are at most {NAME_MAX} bytes: choose a "
                          "shorter name")
    try:
        os.stat(dst)
    except FileNotFoundError:
        _check_no_dangling_link(dst)
        ancestor = _nearest_existing(dst.parent)
        if not ancestor.is_dir():
            raise MoekitError(f"cannot make {dst}: {ancestor} is a file, not "
                              "a folder; choose another destination") from None
    except NotADirectoryError:
        raise MoekitError(f"cannot make {dst}: {_nearest_existing(dst)} is a "
                          "file, not a folder; choose another destination") from None
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        raise MoekitError(f"destination {dst} goes through a loop of symbolic links; "
                          "fix the links or choose another destination") from None


def _check_no_dangling_link(dst: Path) -> None:
    """Refuse a destination below a symbolic link whose target does not exist: ``mkdir -p``
    would make the folders it names, wherever they lie, which the user never named."""
    for parent in Path(os.path.abspath(dst)).parents:
        if parent.exists():
            return
        if parent.is_symlink():
            link, real = os.readlink(parent), _resolved(parent)
            leading = "" if Path(link) == real else f" (leading to {real})"
            raise MoekitError(f"cannot make {dst}: {parent} is a symbolic link to {link}"
                              f"{leading}, which does not exist; moekit makes no folder where a "
                              "link leads: make that folder first, or choose another destination")


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest parent that exists (links followed)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _target(dst: Path, overwrite: bool) -> Path:
    """The path the output will take: ``dst`` with its symlinks resolved. A symlink must
    lead to something (a dangling one is refused: writing through it would make a folder
    elsewhere), with ``overwrite`` to a folder, which is what is replaced."""
    if dst.is_symlink():
        link = os.readlink(dst)
        if not dst.exists():
            raise MoekitError(f"destination {dst} is a symbolic link to {link}, which "
                              "does not exist (it is not a folder); remove the link or choose "
                              "another destination")
        if overwrite and not dst.is_dir():
            raise MoekitError(f"destination {dst} is a symbolic link to {link}, which "
                              "is not a folder; remove the link or choose another destination")
    return dst.resolve()


def _check_source(target: Path, src: Path) -> None:
    """Refuse a target that is the source, lies inside it or holds it."""
    src = src.resolve()
    if target == src:
        raise MoekitError(f"destination {target} is the source itself; choose another "
                          "folder (moekit never writes inside the source)")
    if src in target.parents:
        raise MoekitError(f"destination {target} is inside the source {src}; "
                          "choose a folder outside it (moekit never writes into its input)")
    if target in src.parents:
        raise MoekitError(f"destination {target} contains the source {src}; "
                          "choose another folder")
    _check_source_identity(target, src)


def _check_held_files(target: Path, files: list[Path]) -> None:
    """Refuse a target holding any byte of ``files`` (the sources' files): one of them, or
    a link to one, symlinks resolved and hard links compared by inode."""
    if not target.is_dir():
        return
    identities = {}
    for file in files:
        real = file.resolve()
        if target in real.parents:
            raise MoekitError(f"destination {target} holds {real}, the data of the source's "
                              f"{file.name} ({file} links there); choose another folder")
        with suppress(OSError):
            stat = real.stat()
            identities[(stat.st_dev, stat.st_ino)] = file
    for path in _held_files(target):
        with suppress(OSError):
            stat = os.stat(path)
            same = identities.get((stat.st_dev, stat.st_ino))
            if same is not None:
                raise MoekitError(f"destination {target} holds {path.relative_to(target)}, the "
                                  f"same file as the source's {same} (a link); choose another "
                                  "folder")


def _check_source_identity(target: Path, src: Path) -> None:
    """What ``_check_source`` checks by path, by identity (device and inode): a bind
    mount shows one folder under two paths that resolve apart."""
    inside = _nearest_existing(target)
    if src.is_dir():
        source = os.stat(src)
        for folder in (inside, *inside.parents):
            if os.path.samestat(os.stat(folder), source):
                where = "the source" if folder == target else f"inside the source {src}"
                raise MoekitError(f"destination {target} is {where} ({folder} is the same "
                                  f"folder as {src}, reached by another path such as a bind "
                                  "mount); choose a folder outside it (moekit never writes "
                                  "into its input)")
    if target.is_dir():
        destination = os.stat(target)
        for folder in src.parents:
            if os.path.samestat(os.stat(folder), destination):
                raise MoekitError(f"destination {target} contains the source {src} ({target} "
                                  f"is the same folder as {folder}, reached by another path "
                                  "such as a bind mount); choose another folder")


def _held_files(folder: Path) -> Iterator[Path]:
    """The entries of ``folder`` and of its Megatron-Core iteration folders (``ITERATION``),
    which ``overwrite`` would replace with it."""
    with os.scandir(folder) as entries:
        found = list(entries)
    for entry in found:
        yield Path(entry.path)
        if ITERATION.match(entry.name) and entry.is_dir(follow_symlinks=False):
            with suppress(OSError), os.scandir(entry.path) as inner:
                yield from (Path(e.path) for e in list(inner))


def _files_at_top(src: Path) -> list[Path]:
    """The files at the top of the source folder (a file source: that file)."""
    entries = list(src.iterdir()) if src.is_dir() else [src]
    return [p for p in entries if p.is_file()]


def _check_replaceable(target: Path, dst: Path) -> None:
    """Raise unless ``target`` is a folder holding only checkpoint files, and not a mount
    point (which cannot be renamed)."""
    if not target.is_dir():
        raise MoekitError(f"destination {dst} is a file, not a checkpoint folder; "
                          "--overwrite replaces only a folder holding a checkpoint")
    if os.path.ismount(target):
        raise MoekitError(f"destination {dst} is a mount point, which moekit cannot "
                          "replace (it puts a new folder in place by renaming); write to a "
                          "new folder inside it")
    foreign = _foreign_entries(target)
    if foreign:
        more = f" and {len(foreign) - 8} more" if len(foreign) > 8 else ""
        shown = ", ".join(foreign[:8]) + more
        raise MoekitError(
            f"--overwrite replaces only a folder holding a checkpoint (safetensors and their "
            f"index, DCP files, Megatron-Core's iteration folders and tracker, and sidecar "
            f"files such as config.json and tokenizer files); {dst} also holds "
            f"{shown}: move those away or choose another destination")
    _check_holds_weights(target, dst)


def _check_holds_weights(target: Path, dst: Path) -> None:
    """Refuse a folder holding files but no weights, and a weight file that is not what
    its name says: names alone (README.md, LICENSE, modeling_*.py, a note called
    .metadata) may be a user's project, not a checkpoint."""
    with os.scandir(target) as scan:
        entries = sorted(scan, key=lambda e: e.name)
    if not entries:
        return
    if not any(ITERATION.match(e.name) and e.is_dir(follow_symlinks=False)
               or any(fnmatchcase(e.name, pattern) for pattern in WEIGHT_FILES)
               for e in entries):
        if any(e.name.endswith(".distcp") for e in entries):
            raise MoekitError(f"--overwrite replaces only a folder holding a checkpoint; {dst} "
                              "holds .distcp files without their .metadata (an unfinished "
                              "torch.distributed.checkpoint save): remove the folder yourself "
                              "if it is to go, or choose another destination")
        raise MoekitError(f"--overwrite replaces only a folder holding a checkpoint; {dst} "
                          "holds no weights (safetensors, pytorch_model*.bin, DCP or Megatron-"
                          "Core files): move its files away or choose another destination")
    for entry in entries:
        if entry.is_file(follow_symlinks=False):
            problem = _not_weights(Path(entry.path))
            if problem is not None:
                raise MoekitError(f"--overwrite replaces only a folder holding a checkpoint; "
                                  f"{dst} holds {entry.name}, which is not {problem}: move it "
                                  "away or choose another destination")


def _not_weights(path: Path) -> str | None:
    """What the weight file ``path`` is not, by its name, and why; None where it is."""
    for pattern, what, check in _WEIGHT_CHECKS:
        if fnmatchcase(path.name, pattern):
            try:
                check(path)
            except (SafetensorError, OSError, MoekitError) as err:
                return f"{what} ({printable(str(err))})"
            return None
    return None


def _opens_as_safetensors(path: Path) -> None:
    with safe_open(path, framework="numpy"):
        pass


def _starts_as_torch_save(path: Path) -> None:
    with open(path, "rb") as file:
        start = file.read(4)
    if not start.startswith(TORCH_SAVE_STARTS):
        raise MoekitError(f"it starts with {start!r}")


def _pickles_dcp_metadata(path: Path) -> None:
    """Refuse a ``.metadata`` whose pickle does not start by naming DCP's ``Metadata``,
    as every ``dcp.save`` writes it: read without torch, which a dry run never imports,
    and in a few bytes, since the destination is checked again at the final move."""
    with open(path, "rb") as file:
        head = file.read(PICKLE_HEAD_BYTES)
    try:
        named = _first_class(head)
    except ValueError as err:  # pickletools: an unknown opcode, or the bytes end
        raise MoekitError(f"it is not a pickle ({err})") from None
    if named != DCP_METADATA_CLASS:
        raise MoekitError("its pickle does not hold DCP's Metadata" + (
            f" but {'.'.join(named)}" if named else ""))


def _first_class(pickled: bytes) -> tuple[str, ...] | None:
    """(module, name) of the first class or function ``pickled`` names, or None."""
    strings: list[str] = []
    for opcode, arg, _ in pickletools.genops(io.BytesIO(pickled)):
        if opcode.name == "GLOBAL":
            return tuple(arg.split(" ", 1))
        if opcode.name == "STACK_GLOBAL":
            return tuple(strings[-2:])
        if isinstance(arg, str):
            strings.append(arg)
    return None


_WEIGHT_CHECKS = (("*.safetensors", "a safetensors file", _opens_as_safetensors),
                  ("pytorch_model*.bin", "a torch.save file", _starts_as_torch_save),
                  (".metadata", "a torch.distributed.checkpoint .metadata",
                   _pickles_dcp_metadata))
"""Each kind of ``WEIGHT_FILES``: its name, what it must be, and the check that it is."""


def _foreign_entries(folder: Path, names: tuple[str, ...] = CHECKPOINT_FILES,
                     prefix: str = "") -> list[str]:
    """Entries of ``folder`` that are not checkpoint files ``names`` (folders shown with a
    ``/``; a Megatron-Core iteration folder only for what it holds beside its files)."""
    foreign = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir(follow_symlinks=False):
            foreign += (_foreign_entries(Path(entry.path), ITERATION_FILES, f"{entry.name}/")
                        if not prefix and ITERATION.match(entry.name)
                        else [f"{prefix}{entry.name}/"])
        elif not (entry.is_file(follow_symlinks=False) or entry.is_symlink()) or not any(
                fnmatchcase(entry.name, pattern) for pattern in names):
            foreign.append(prefix + entry.name)
    return foreign


class OutputFolder:
    """A checkpoint being written: ``folder``, beside the destination, takes its place on
    ``commit``; ``discard`` removes it."""

    def __init__(self, dst: Path, sources: Sequence[Path] = (), overwrite: bool = False,
                 source_files: Iterable[Path] = ()) -> None:
        """Check the destination (see ``check_destination``), report leftovers of earlier
        runs, make the folder."""
        require_linux()
        self.dst = as_path(dst, "destination")
        self.sources = list(sources)
        self.overwrite = overwrite
        self.source_files = list(source_files)
        self.in_place = False
        """True once the new folder has taken the destination's place (from then on a
        failure or an interrupt leaves it there: it is complete)."""
        self.target = check_destination(self.dst, self.sources, overwrite,
                                        self.source_files)
        self._syncer = _BackgroundSync()
        self._parents = []
        try:
            self._parents = _make_parents(self.target.parent)
            clean_leftovers(self.target)
            self.folder = _make_folder(self.target)
        except BaseException as err:
            _remove_empty(self._parents)
            if isinstance(err, OSError):  # every path here is the destination's
                where = f" ({os.fsdecode(err.filename)})" if err.filename else ""
                raise output_error(err, self.dst) or MoekitError(
                    f"cannot make a folder for {self.dst}: {err.strerror or err}{where}; "
                    "choose another destination") from err
            raise

    def copy_in(self, files: Iterable[Sidecar]) -> None:
        """Copy files of the source (sidecar files) into the folder, under their names;
        one that changed since the source was opened is refused (``copy_file``)."""
        for file in files:
            copy_file(file, self.folder / file.name)
            self.sync_soon(self.folder / file.name)

    def sync_soon(self, path: Path) -> None:
        """Start fsyncing ``path``, a file of the folder that is written in full and will
        not change, in the background, so that the disk writes it out while the next file
        is written. ``commit`` waits for it; the error of an earlier one is raised here."""
        self._syncer.submit(path)

    def commit(self) -> None:
        """Make the finished folder durable and move it into place, never replacing a
        destination that was not checked. Once the background fsyncs are done,
        interrupts are held until the folder is in place."""
        synced = self._syncer.wait()
        with deferred_signals():
            (self.folder / MARKER).unlink()
            _sync_folder(self.folder, synced)
            if self.overwrite and os.path.lexists(self.target):
                if check_destination(self.dst, self.sources, True,
                                     self.source_files) != self.target:
                    raise MoekitError(f"destination {self.dst} now points elsewhere than when "
                                      "moekit started writing; nothing was replaced: run again")
                self._swap(_checked_files(self.target))
            else:
                self._move_in()
            for folder in self._holding_folders():
                self._sync_holding(folder)

    def _sync_holding(self, folder: Path) -> None:
        """fsync ``folder``, which holds an entry leading to the output in place; its
        failure is a MoekitError saying the output is written but may not be durable."""
        try:
            _fsync_dir(folder)
        except OSError as err:
            raise MoekitError(f"wrote {self.dst}, but {folder} could not be synced "
                              f"({err.strerror}): the checkpoint may not survive a power "
                              "loss; check the disk") from err

    def _holding_folders(self) -> list[Path]:
        """The folders whose entries lead to the output, which must be synced for it to
        survive a power loss: its parent, and the folders made for it (``mkdir -p``) with
        the one each was made in, innermost first."""
        return [self.target.parent, *(made.parent for made in reversed(self._parents))]

    def discard(self) -> None:
        """Remove the temporary folder (after a failure or an interrupt), and the parent
        folders made for it if they are empty; nothing once the output is in place (the
        move removed what it replaced, keeping what came in meanwhile: ``_swap``).
        Interrupts are held until this is done."""
        with deferred_signals():
            self._syncer.stop()
            if not self.in_place:
                shutil.rmtree(self.folder, ignore_errors=True)
                _remove_empty(self._parents)

    def _move_in(self) -> None:
        """Move the folder to the target, which must not exist."""
        try:
            _renameat2(self.folder, self.target, _RENAME_NOREPLACE)
        except FileExistsError as err:
            raise self._appeared() from err
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                raise
            _move_into_claimed_folder(self.folder, self.target, self._appeared)
        self.in_place = True

    def _appeared(self) -> MoekitError:
        return MoekitError(f"destination {self.dst} appeared while moekit was writing (another "
                           "run, or a folder made meanwhile); it was kept and this run's output "
                           "removed: choose another destination, or pass --overwrite to replace it")

    def _swap(self, checked: dict[Path, tuple[int, int]]) -> None:
        """Exchange the folder with the old one at the target, then delete the old one's
        ``checked`` files and folders (``_remove_replaced``)."""
        try:
            _renameat2(self.folder, self.target, _RENAME_EXCHANGE)
        except OSError as err:
            if err.errno == errno.ENOENT:
                self._move_in()
                return
            if err.errno not in _UNSUPPORTED:
                raise
            self._swap_aside(checked)
            return
        self.in_place = True
        try:
            self._sync_holding(self.target.parent)
        finally:
            _remove_replaced(self.folder, checked, self.dst)

    def _swap_aside(self, checked: dict[Path, tuple[int, int]]) -> None:
        """Without RENAME_EXCHANGE: the old folder renamed aside, the new one moved in (the
        old one put back if that fails), then the old one's ``checked`` files deleted."""
        old = _unused_name(self.target, "old-")
        os.rename(self.target, old)
        try:
            self._move_in()
        except BaseException:
            _put_back(old, self.target)
            raise
        try:
            self._sync_holding(self.target.parent)
        finally:
            _remove_replaced(old, checked, self.dst)


@contextmanager
def atomic_output(dst: Path, sources: Sequence[Path] = (), overwrite: bool = False,
                  source_files: Iterable[Path] = ()) -> Iterator[OutputFolder]:
    """Yield an ``OutputFolder`` beside ``dst`` to write into (its ``folder``); on success
    it takes ``dst``'s place (see the module's docstring), on any failure or interrupt it
    is removed and ``dst`` is left as it was. File-system errors of the destination are
    raised as MoekitError. An interrupt that comes once the output is in place is raised
    with ``in_place(err)`` naming it."""
    dst = as_path(dst, "destination")
    output = None
    try:
        output = OutputFolder(dst, sources, overwrite, source_files)
        yield output
        output.commit()
    except BaseException as err:
        if output is not None:
            output.discard()
            if output.in_place:
                err.moekit_in_place = dst
        if isinstance(err, OSError):
            mapped = output_error(err, dst, left=output is not None and output.in_place)
            if mapped is not None:
                raise mapped from err
        raise


def in_place(err: BaseException) -> Path | None:
    """The output that was complete and in place when ``err`` (an interrupt, or an error
    after the final move) was raised, else None."""
    return getattr(err, "moekit_in_place", None)


@contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """Hold ``DEFERRED_SIGNALS`` while the block runs, then deliver the first that came
    (to the handler it would have met); the block gets the list of those caught so far.
    Signals are handled in the main thread only, so elsewhere the block just runs;
    signals the caller ignores stay ignored."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    held = {s: h for s in DEFERRED_SIGNALS
            if (h := signal.getsignal(s)) not in (signal.SIG_IGN, None)}
    for signum in held:
        signal.signal(signum, lambda signum, frame: caught.append(signum))
    try:
        yield caught
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
        if caught:
            signal.raise_signal(caught[0])


class Stopped(BaseException):
    """A signal that came during an ``interruptible`` block, raised where the block was
    (a BaseException, as KeyboardInterrupt is, so that ``except Exception`` lets it by);
    the signal itself is delivered when the ``deferred_signals`` block around it ends."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"


@contextmanager
def interruptible(caught: list[int]) -> Iterator[None]:
    """Inside a ``deferred_signals`` block whose list is ``caught``: a step that a signal
    stops at once, raising ``Stopped`` (one that came before the step stops it before it
    begins). The signal is still delivered when the outer block ends; a second one
    during the step is only held."""
    if caught:
        raise Stopped(caught[0])
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer = {s: h for s in DEFERRED_SIGNALS
             if (h := signal.getsignal(s)) not in (signal.SIG_IGN, None)}

    def stop(signum: int, frame: object) -> None:
        caught.append(signum)
        if len(caught) == 1:
            raise Stopped(signum)

    for signum in outer:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in outer.items():
            signal.signal(signum, handler)


def copy_file(src: Sidecar, dst: Path) -> None:
    """Copy the plain file ``src`` (links followed) to a new file ``dst``, which gets the
    mode the umask allows (as ``cp`` without ``-p``). A source that cannot be read, is no
    longer a plain file, or is not the file it was when the checkpoint was opened (before
    the copy, or by its end; for a file moekit parsed, by its bytes too) is a MoekitError
    naming it; errors writing ``dst`` are raised."""
    fd = open_unchanged(src.path, src.identity, Sidecar.SINCE)
    digest = hashlib.sha256() if src.digest is not None else None
    try:
        with open(dst, "wb") as out:
            while chunk := _read_chunk(fd, src.path):
                out.write(chunk)
                if digest is not None:
                    digest.update(chunk)
        check_unchanged(fd, src.path, src.identity, Sidecar.SINCE)
    finally:
        os.close(fd)
    if digest is not None and digest.hexdigest() != src.digest:
        raise changed_since(src.path, Sidecar.SINCE, ["its bytes differ from those read then"])


def _read_chunk(fd: int, path: Path) -> bytes:
    """The next ``COPY_CHUNK`` bytes at most of the open file ``fd`` (``path``); empty at
    its end."""
    try:
        return os.read(fd, COPY_CHUNK)
    except OSError as err:
        raise MoekitError(f"cannot read {printable(str(path))}: {err.strerror or err}") from err


def output_error(err: OSError, dst: Path, left: bool = False) -> MoekitError | None:
    """The MoekitError for a file-system error met writing ``dst`` (or its temporary
    folder), or None when ``err`` is not one a user fixes at the destination, or names
    only paths that are not the destination's (a source file). ``left``: the output is in
    place nonetheless."""
    advice = _ADVICE.get(err.errno)
    named = [p for p in (err.filename, err.filename2) if p is not None]
    if advice is None or (named and not any(_is_output_path(Path(os.fsdecode(p)), Path(dst))
                                            for p in named)):
        return None
    outcome = (f"{dst} was written in full before the error" if left else
               "nothing was left behind")
    return MoekitError(f"cannot write {dst}: {err.strerror}; {advice} ({outcome})")


def _is_output_path(path: Path, dst: Path) -> bool:
    """Whether ``path`` is ``dst``, one of its parents, under it, or a temporary folder
    (or a file in one) of ``dst``."""
    path = Path(os.path.abspath(path))
    for root in {Path(os.path.abspath(dst)), _resolved(dst)}:
        if path == root or root in path.parents or path in root.parents:
            return True
        temporary = _temp_prefix(root)
        if any(p.parent == root.parent and p.name.startswith(temporary)
               for p in (path, *path.parents)):
            return True
    return False


def _resolved(path: Path) -> Path:
    """``path`` with its links resolved, as far as they resolve (a loop is left as is)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def _temp_prefix(target: Path) -> str:
    """``.{target name}.moekit-``, the start of the name of every temporary folder of
    ``target``; a name too long to leave room for the rest is cut, with a digest of it."""
    name = target.name
    room = NAME_MAX - len(TEMP_INFIX) - len(".old-") - 8
    encoded = os.fsencode(name)
    if len(encoded) > room:
        digest = hashlib.sha256(encoded).hexdigest()[:8]
        name = os.fsdecode(encoded[:room - len(digest) - 1]) + "~" + digest
    return f".{name}{TEMP_INFIX}"


def clean_leftovers(target: Path) -> None:
    """Report the temporary folders earlier runs left beside ``target``; remove those whose
    marker names a process of this machine that is no longer running."""
    prefix = _temp_prefix(target)
    with os.scandir(target.parent) as entries:
        leftovers = [entry for entry in entries
                     if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False)]
    for entry in leftovers:
        reason = remove_if_abandoned(Path(entry.path))
        if reason is None:
            log.warning("moekit: removed %s, left by an earlier moekit run that was "
                        "interrupted", entry.path)
        else:
            log.warning("moekit: found %s, a temporary folder of another moekit run; kept, "
                        "since %s. Once no moekit run on any machine writes to %s, remove "
                        "it by hand (rm -r %s).", entry.path, reason, target,
                        shlex.quote(entry.path))


def remove_if_abandoned(folder: Path) -> str | None:
    """Remove the temporary folder ``folder`` when its marker names a process that provably
    no longer runs (``_kept_because``), so that it can never be moved into place, and
    return None; else keep it and return why."""
    reason = _kept_because(folder)
    if reason is None:
        with deferred_signals():  # the marker last: what an interrupt leaves is still known
            for entry in os.scandir(folder):
                if entry.name != MARKER:
                    _remove_entry(entry)
            with suppress(OSError):
                os.unlink(folder / MARKER)
                os.rmdir(folder)
    return reason


def _remove_entry(entry: os.DirEntry) -> None:
    """Remove a file, link or folder (with what it holds), ignoring failures."""
    if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path, ignore_errors=True)
    else:
        with suppress(OSError):
            os.unlink(entry.path)


def _kept_because(folder: Path) -> str | None:
    """Why a leftover folder may not be removed, or None when it provably is moekit's own
    and its writer is gone: made in this boot (the same kernel) by a process of this PID
    namespace that no longer runs, or made on this machine (the same machine id) before
    it booted. A host name alone proves nothing: machines of one image or container spec
    share it, and may share the file system too."""
    try:
        owner = json.loads(_marker_text(folder / MARKER))
        pid, host = owner["pid"], owner["host"]
        boot, pid_namespace = owner["boot"], owner["pid_namespace"]
        machine = owner.get("machine", "")
        if not isinstance(pid, int) or pid <= 0 or not isinstance(machine, str):
            raise ValueError(pid)
    except (MoekitError, OSError, ValueError, KeyError, TypeError):
        return ("it holds no moekit marker (it may hold a checkpoint that an interrupted "
                "--overwrite replaced)")
    here = _owner()
    if host != here["host"]:
        return f"it was made on {printable(str(host))}"
    if boot != here["boot"]:
        return _another_boot(folder / MARKER, host, machine, str(here["machine"]))
    if pid_namespace != here["pid_namespace"]:
        return "it was made in another container (PID namespace) of this machine"
    if process_alive(pid):
        return f"the process that made it (pid {pid}) is still running"
    return None


MAX_MARKER_BYTES = 4096
"""Largest marker read: moekit writes a few hundred bytes."""


def _marker_text(path: Path) -> str:
    """The text of the marker ``path``: MoekitError unless it is a plain file, not a link
    (``open_regular``: a pipe put there would hang the read), ValueError unless of at most
    MAX_MARKER_BYTES bytes."""
    fd = open_regular(path, follow_links=False)
    try:
        raw = os.read(fd, MAX_MARKER_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_MARKER_BYTES:
        raise ValueError(f"{path} is larger than a marker")
    return raw.decode("utf-8")


def _another_boot(marker: Path, host: str, machine: str, here: str) -> str | None:
    """Why a leftover whose ``marker`` names another boot (and ``machine``) may be another
    machine's, whose run may still write it; None where it is this machine's (``here``)
    from before it booted. Machines cloned from one image may share a machine id: a marker
    written since this machine booted is another's."""
    if not here:
        return (f"this machine has no machine id ({' or '.join(MACHINE_ID_FILES)}), so moekit "
                "cannot tell whether it was made here before a reboot or on another machine")
    if not machine:
        return ("its marker (of an older moekit) names no machine id, so moekit cannot tell "
                "whether it was made on this machine before a reboot or on another one")
    if machine != here:
        return (f"it was made on another machine named {printable(host)} too (machine id "
                f"{printable(machine)}), whose run may still write it")
    booted = boot_time()
    try:
        written = marker.lstat().st_mtime
    except OSError as err:
        return f"its marker cannot be read ({err.strerror or err})"
    if booted is None or written >= booted:
        return ("it was made in another boot of a machine with this machine's id and host name "
                "(a copy of this machine's image?), since this machine booted")
    return None


PROC_STAT = "/proc/stat"
"""Where the kernel gives the time it booted (``btime``, seconds since the epoch)."""


def boot_time() -> float | None:
    """When this machine booted (seconds since the epoch), None where that cannot be read."""
    for line in _read(PROC_STAT).splitlines():
        if line.startswith("btime "):
            try:
                return float(line.split()[1])
            except (IndexError, ValueError):
                return None
    return None


def _owner() -> dict[str, object]:
    """What identifies this process across runs: pid, host, machine id ("" where there is
    none), boot and PID namespace."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "machine": _machine_id(),
            "boot": _read("/proc/sys/kernel/random/boot_id"), "pid_namespace": _pid_namespace()}


def _machine_id() -> str:
    """This machine's id, from the first of ``MACHINE_ID_FILES`` that holds one (32 hex
    digits; an empty file or systemd's ``uninitialized`` is none), else ""."""
    for path in MACHINE_ID_FILES:
        found = _read(path)
        if re.fullmatch(r"[0-9a-f]{32}", found):
            return found
    return ""


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs: it exists and is not a zombie (a process that has
    ended but that its parent has not yet waited for)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _read(f"/proc/{pid}/stat")
    return stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])


def _make_parents(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents (as ``mkdir -p``); return those made, the
    outermost first."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    made: list[Path] = []
    try:
        for path in reversed(missing):
            try:
                os.mkdir(path, 0o777)
            except FileExistsError:
                continue
            made.append(path)
    except BaseException:
        _remove_empty(made)
        raise
    return made


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (outermost first) from the innermost out, stopping at one that
    is not empty."""
    for folder in reversed(folders):
        try:
            os.rmdir(folder)
        except OSError:
            return


def _make_folder(target: Path) -> Path:
    """A new empty folder beside ``target`` (same file system, so that the final rename is
    atomic), with the umask's mode and a marker naming this process."""
    while True:
        folder = _unused_name(target, "")
        try:
            os.mkdir(folder, 0o777)
            break
        except FileExistsError:
            continue
    try:
        (folder / MARKER).write_text(json.dumps(_owner()))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _unused_name(target: Path, kind: str) -> Path:
    """A name beside ``target`` that nothing holds now."""
    while True:
        name = target.parent / f"{_temp_prefix(target)}{kind}{secrets.token_hex(4)}"
        if not os.path.lexists(name):
            return name


def _move_into_claimed_folder(folder: Path, target: Path,
                              appeared: Callable[[], MoekitError]) -> None:
    """Where renameat2 has no no-replace flag: claim ``target`` with an exclusive
    ``mkdir``, then rename ``folder`` onto that empty folder, which ``rename`` replaces
    atomically, so that the checkpoint appears whole or not at all. A target that exists,
    or that is no longer empty at the rename, raises ``appeared()`` and is kept."""
    try:
        os.mkdir(target, 0o777)
    except FileExistsError as err:
        raise appeared() from err
    try:
        os.rename(folder, target)
    except OSError as err:
        with suppress(OSError):
            os.rmdir(target)  # the claim, while it is still empty
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise appeared() from err
        raise


def _put_back(old: Path, target: Path) -> None:
    """Return a checkpoint renamed aside to its place; say where it is if that fails."""
    try:
        try:
            _renameat2(old, target, _RENAME_NOREPLACE)
        except OSError as err:
            if err.errno not in _UNSUPPORTED or os.path.lexists(target):
                raise
            os.rename(old, target)
    except OSError as err:
        log.warning("moekit: the checkpoint that was at %s is kept at %s (%s)", target, old,
                    err.strerror)


def _checked_files(folder: Path) -> dict[Path, tuple[int, int]]:
    """The files (and links) of ``folder`` that ``overwrite`` replaces, by their path
    inside it, with their identities (device, inode): what its last check saw."""
    found = {}
    for path in _held_files(folder):
        stat = os.lstat(path)
        if not S_ISDIR(stat.st_mode):
            found[path.relative_to(folder)] = (stat.st_dev, stat.st_ino)
    return found


def _remove_replaced(old: Path, checked: dict[Path, tuple[int, int]], dst: Path) -> None:
    """Delete the replaced checkpoint, now at ``old``: the ``checked`` files that are
    still the ones checked, then its folders. Whatever else it holds came after the last
    check (a file written into the destination at the moment of the swap), and is not
    the user's to lose: the folder is kept, and where said. The new checkpoint is in
    place, so a failure is reported, not raised."""
    try:
        for path, identity in checked.items():
            with suppress(FileNotFoundError):
                stat = os.lstat(old / path)
                if (stat.st_dev, stat.st_ino) == identity:
                    os.unlink(old / path)
        for folder in {old / path.parent for path in checked} - {old}:
            with suppress(OSError):  # not empty: os.rmdir(old) says so
                os.rmdir(folder)
        os.rmdir(old)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            log.warning("moekit: could not remove the checkpoint %s replaced, now at %s (%s); "
                        "remove it by hand", dst, old, err.strerror)
            return
        log.warning("moekit: kept %s, where the checkpoint %s replaced was put: it holds %s, "
                    "which came into %s while moekit replaced it", old, dst,
                    ", ".join(sorted(str(p.relative_to(old)) for p in _held_files(old))[:8]),
                    dst)


class _BackgroundSync:
    """fsyncs files, one at a time and in the order given, in a background thread (made
    at the first file), so that the disk writes out one file while the next is written."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Future]] = []
        self._thread: ThreadPoolExecutor | None = None

    def submit(self, path: Path) -> None:
        """Queue ``path`` for an fsync, after raising the error of a finished one."""
        for _, future in self._pending:
            if future.done():
                future.result()
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="moekit-fsync")
        self._pending.append((Path(path), self._thread.submit(_fsync_file, path)))

    def wait(self) -> set[Path]:
        """Wait for every queued fsync and end the thread; raise the error of the first
        that failed, else return the paths synced."""
        for _, future in self._pending:
            future.result()
        self.stop()
        return {path for path, _ in self._pending}

    def stop(self) -> None:
        """Drop the queued fsyncs and wait for the one under way (its file descriptor is
        closed before this returns); errors are dropped too."""
        if self._thread is not None:
            self._thread.shutdown(wait=True, cancel_futures=True)


def _fsync_file(path: str | Path) -> None:
    """fsync the file at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path, synced: Collection[Path] = ()) -> None:
    """fsync every file of ``folder`` but those in ``synced`` (already fsynced, unchanged
    since), then the folder itself."""
    with os.scandir(folder) as entries:
        files = [entry.path for entry in entries if entry.is_file(follow_symlinks=False)]
    for file in files:
        if Path(file) not in synced:
            _fsync_file(file)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    """fsync a folder, so that the names it holds are durable (where the file system
    supports directory fsync)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


@functools.cache
def _renameat2_call() -> Callable[..., int] | None:
    """libc's renameat2, else the raw system call where its number is known, else None."""
    libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                             ctypes.c_uint]
        return function
    number = _SYS_RENAMEAT2.get(platform.machine())
    if number is None:
        return None
    return lambda *args: libc.syscall(ctypes.c_long(number), *(
        ctypes.c_long(a) if isinstance(a, int) else a for a in args))


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    """``renameat2(src, dst, flags)``; raise OSError (ENOSYS where there is none)."""
    call = _renameat2_call()
    if call is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), str(src), None, str(dst))
    if call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(src), None, str(dst))
