"""torch.distributed.checkpoint folders: a sink that writes a plan as one DCP checkpoint
(``.metadata`` and several ``.distcp`` files), streaming; and the headers of such a
folder, read so that its tensors are read as byte ranges, as safetensors files are.

DCP plans a save from the state dict's shapes and dtypes alone and asks its planner for
a tensor's data only when it writes that tensor: torch 2.13's ``FileSystemWriter``
resolves the items of a file one at a time (``_SerialCpuLoader``, one writer thread;
with an accelerator present, ``_OverlappingCpuLoader`` resolves at most 10 MB ahead).
So the state dict handed to ``dcp.save`` holds tensors on the meta device (shape and
dtype, no data), and the planner builds each tensor from its recipe when DCP asks for
it. The writer puts the tensors, in the plan's order, into ``.distcp`` files of at most
the shard size (a larger tensor gets a file alone), all described by one ``.metadata``;
DCP keeps a file's tensors until the file is written, so memory holds at most one
file's tensors, whatever the model's size. One process writes, without a process group
(``no_dist``). A tensor the plan places in a larger stored one (``TensorPlan.chunk``,
Megatron-Core's layers and experts) is saved as that chunk of it, so that ``.metadata``
lists the stored tensor with one chunk a plan tensor; ``objects`` (Megatron-Core's
``_extra_state`` entries) are saved as DCP saves any non-tensor value, ``torch.save``d,
in the last data file. ``save_distributed`` is the other writer: every rank of a process group
saves its own shards (``save_experts(format="dcp")``), which a reader finds as tensors
saved in row chunks.
"""

from __future__ import annotations

import functools
import io
import math
import os
import pickle
import queue
import struct
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (SavePlan, SavePlanner, TensorWriteData,
                                                  WriteItem, WriteItemType)
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.tensor import DTensor

from . import pickle_bounds
from .checkpoint import DCP_METADATA_NAME, TensorInfo, member_file
from .chunks import Chunked, chunked_tensors
from .dtypes import to_safetensors, to_torch
from .errors import MoekitError, printable
from .executors.evaluate import KeepingStatistics, materialize
from .executors.streaming import shard_tensors
from .gc_pauses import COLLECTOR_OFF
from .output import Stopped, interruptible, output_error
from .plan import Expr, Plan, TensorPlan, nbytes
from .progress import progress
from .sources import TensorSource

DISTCP_SUFFIX = ".distcp"
"""The suffix of DCP's data files (``torch.distributed.checkpoint.filesystem``)."""


class DcpFolder:
    """A sink writing a plan as one ``torch.distributed.checkpoint`` folder whose data
    files hold at most ``max_shard_bytes`` each."""

    def __init__(self, max_shard_bytes: int) -> None:
        if not hasattr(FileSystemWriter, "_write_data"):  # see _ShardedWriter.write_data
            raise MoekitError(f"--format dcp writes through torch 2.13's DCP file-system "
                              f"writer, which torch {torch.__version__} does not have")
        self.max_shard_bytes = max_shard_bytes

    def check(self, plan: Plan) -> None:
        plan.refuse_chunks("dcp")

    def write(self, plan: Plan, source: TensorSource, folder: Path,
              show_progress: bool | None, finished: Callable[[Path], object],
              objects: Mapping[str, object] = {}) -> None:
        """Write ``plan``'s tensors, built from ``source`` one at a time, and ``objects``
        as a DCP checkpoint in ``folder``; ``finished`` is called with every file once
        the checkpoint is complete (DCP writes ``.metadata`` last)."""
        shapes = {**_saved(plan.tensors), **objects}
        with progress(plan.total_bytes, f"{plan.src_layout} -> {plan.dst_layout}",
                      show_progress) as bar, warnings.catch_warnings():
            # torch 2.13 warns that it assumes one process whenever no process group is
            # initialised, no_dist or not: that is the intent here.
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            try:
                dcp.save(shapes, no_dist=True,
                         storage_writer=_ShardedWriter(folder, plan, self.max_shard_bytes,
                                                       len(objects)),
                         planner=_RecipePlanner(plan, source, bar.update))
            except CheckpointException as err:
                raise _original(err) from None
        for path in sorted(folder.iterdir()):
            finished(path)


def _saved(tensors: list[TensorPlan]) -> dict[str, object]:
    """What ``dcp.save`` is handed for the plan's tensors: a tensor on the meta device for
    each tensor stored whole, one ``_Chunks`` for each tensor stored in chunks."""
    saved: dict[str, object] = {}
    for t in tensors:
        if t.chunk is None:
            saved[t.name] = torch.empty(t.shape, dtype=to_torch(t.dtype), device="meta")
        else:
            saved.setdefault(t.chunk.key, _Chunks(t.chunk.whole, t.dtype)).add(t)
    return saved


def _index_of(tensor: TensorPlan) -> MetadataIndex:
    """The index DCP gives the write of a plan tensor: its name (or stored tensor's) and
    the offset of its data there."""
    if tensor.chunk is None:
        return MetadataIndex(tensor.name, torch.Size([0] * len(tensor.shape)))
    return MetadataIndex(tensor.chunk.key, torch.Size(tensor.chunk.offsets))


class _Chunks:
    """A tensor stored in chunks, each a plan tensor: DCP asks an object for its writes
    (``__create_write_items__``, as it asks a DTensor for its shard's)."""

    def __init__(self, whole: tuple[int, ...], dtype: str) -> None:
        self.whole, self.dtype = whole, dtype
        self.chunks: list[TensorPlan] = []

    def add(self, tensor: TensorPlan) -> "_Chunks":
        self.chunks.append(tensor)
        return self

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        properties = TensorProperties(dtype=to_torch(self.dtype))
        return [WriteItem(index=_index_of(t), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(torch.Size(t.chunk.offsets),
                                                         torch.Size(t.shape)),
                              properties=properties, size=torch.Size(self.whole)))
                for t in self.chunks]


def save_distributed(state_dict: dict[str, torch.Tensor], folder: Path, dst: Path,
                     caught: list[int]) -> dict[int, str]:
    """Save this rank's ``state_dict`` (DTensors and plain tensors) into ``folder``, the
    temporary folder of ``dst``, with ``torch.distributed.checkpoint.save`` over the
    default process group, called on every rank: DCP's own planner has each rank write
    its shards and each replicated tensor written once, and its coordinator commits
    ``.metadata``. A step that fails on any rank fails the save on every rank: each
    returns the same failures, rank -> message (a file-system error of the destination
    as moekit words it), none when the checkpoint is complete. A signal stops this
    rank's writes (``moekit.output.interruptible`` over ``caught``), a failure like any
    other. Files are left for the caller to sync."""
    try:
        dcp.save({key: _as_stored(value) for key, value in state_dict.items()},
                 storage_writer=_RankWriter(folder, caught))
    except CheckpointException as err:
        if not err.failures:
            return {torch.distributed.get_rank(): f"torch.distributed.checkpoint failed: {err}"}
        return {rank: _message(failure, dst) for rank, (failure, _) in err.failures.items()}
    return {}


def _as_stored(value: object) -> object:
    """``value`` as ``dcp.save`` must be handed it for its chunk to be read as saved: a
    tensor (or a DTensor's local shard) whose negation or conjugation torch keeps lazy
    (``x._neg_view()``, ``z.conj().imag``) or whose elements are not in row-major order (a
    transposed or expanded view) as a row-major copy of its values, since ``torch.save``
    stores the storage, strides and flags as they are (DCP copies only a tensor smaller
    than its storage); anything else as it is."""
    if isinstance(value, DTensor):
        local = value.to_local()
        stored = _row_major(local)
        if stored is local:
            return value
        return DTensor.from_local(stored, value.device_mesh, value.placements, run_check=False,
                                  shape=value.shape, stride=value.stride())
    return _row_major(value) if isinstance(value, torch.Tensor) else value


def _row_major(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a row-major copy of its values when its bytes are not them."""
    if tensor.is_neg() or tensor.is_conj() or not tensor.is_contiguous():
        return tensor.detach().resolve_conj().resolve_neg().contiguous()
    return tensor


def _message(err: BaseException, dst: Path) -> str:
    """A failure as moekit reports it: a file-system error of ``dst`` with what to do,
    another OSError by its reason and file."""
    if isinstance(err, OSError) and err.strerror:
        mapped = output_error(err, dst)
        if mapped is not None:
            return str(mapped)
        where = f" ({printable(os.fsdecode(err.filename))})" if err.filename else ""
        return f"{err.strerror}{where}"
    return printable(str(err))


def _original(err: CheckpointException) -> BaseException:
    """The exception a DCP step raised, which DCP wraps (with its traceback as text) in a
    CheckpointException, a BaseException: re-raised as itself, a MoekitError or an
    OSError of the destination is reported as moekit reports it elsewhere."""
    if not err.failures:
        return MoekitError(f"torch.distributed.checkpoint failed: {err}")
    failure, _ = next(iter(err.failures.values()))
    return failure


class _RecipePlanner(DefaultSavePlanner):
    """DCP's default save planner, whose data for each tensor is built from the plan's
    recipe when DCP writes it."""

    def __init__(self, plan: Plan, source: TensorSource, done: Callable[[int], object]
                 ) -> None:
        super().__init__()
        self._tensors = {_index_of(t): t for t in plan.tensors}
        self._source = KeepingStatistics(source)
        self._done = done

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        tensor = self._tensors[write_item.index]
        built = materialize(tensor.recipe, self._source)
        self._done(tensor.nbytes)
        return built


class _DestinationFiles(FileSystem):
    """DCP's local file system, whose failure writing a file is raised as what failed it:
    an interrupt as itself, an OSError naming the file. torch 2.13's ``torch.save`` into
    an open file (how DCP writes each tensor) raises its own RuntimeError ("unexpected
    pos") when a write fails, with what failed it (a signal's KeyboardInterrupt raised
    while the file was written, a full disk's ENOSPC) only as its context."""

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        try:
            with super().create_stream(path, mode) as stream:
                yield stream
        except Exception as err:
            stop = _in_chain(err, lambda e: isinstance(e, (KeyboardInterrupt, Stopped)))
            if stop is not None:
                raise stop from None
            cause = _in_chain(err, lambda e: isinstance(e, OSError) and e.errno is not None)
            if cause is None or (cause is err and err.filename is not None):
                raise
            raise OSError(cause.errno, cause.strerror, os.fspath(path)) from err


def save_object(obj: object, path: Path) -> None:
    """``torch.save`` ``obj`` into a new file at ``path``; a failed write is raised as its
    OSError naming the file (torch.save to a path reports a full disk as "iostream
    error", nothing more)."""
    with _DestinationFiles().create_stream(path, "wb") as stream:
        torch.save(obj, stream)


def _in_chain(err: BaseException | None, wanted: Callable[[BaseException], bool]
              ) -> BaseException | None:
    """The first exception in the chain of ``err`` (itself, then what it was raised from
    or while handling) that is ``wanted``, else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if wanted(err):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class _RankWriter(FileSystemWriter):
    """DCP's file-system writer for one rank of a process group, whose writes a signal
    stops (``Stopped``, which DCP reports to every rank as this rank's failure) and whose
    failed writes are raised as their OSError."""

    def __init__(self, folder: Path, caught: list[int]) -> None:
        super().__init__(folder, sync_files=False, overwrite=False)
        self.fs = _DestinationFiles()
        self._caught = caught

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        with interruptible(self._caught):
            return super().write_data(plan, planner)


class _ShardedWriter(FileSystemWriter):
    """DCP's file-system writer, with the plan's tensors in order in files of at most
    ``max_shard_bytes`` (DCP's own writer puts a rank's tensors in one file per thread),
    and the non-tensor objects in the last file."""

    def __init__(self, folder: Path, plan: Plan, max_shard_bytes: int, objects: int) -> None:
        super().__init__(folder, sync_files=False, overwrite=False)
        self.fs = _DestinationFiles()
        shards = shard_tensors(plan.tensors, max_shard_bytes)
        self._shards = shards if shards or not objects else [[]]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        items = {item.index: item for item in plan.items}
        objects = [item for item in plan.items if item.type == WriteItemType.BYTE_IO]
        files: queue.Queue = queue.Queue()
        for number, shard in enumerate(self._shards):
            name = f"{plan.storage_data.prefix}{number}{DISTCP_SUFFIX}"
            last = number == len(self._shards) - 1
            files.put((self.fs.concat_path(self.path, name), name,
                       [items[_index_of(t)] for t in shard] + (objects if last else [])))
        # torch 2.13's FileSystemWriter.write_data fills this queue (path, file name,
        # items) with its own split and hands it to _write_data, which writes each file.
        return self._write_data(planner, files)

MAX_METADATA_BYTES = 256 * 2**20
"""Largest ``.metadata`` read (a 1,000,000-tensor checkpoint's is about 200 MB)."""

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.planner", name) for name in (
    "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout")}
"""What torch 2.13's ``.metadata`` pickle refers to, beside dtypes and paths: its own
dataclasses, and the save plans megatron-core 0.16.1 keeps there after a save over several
ranks (``all_local_plans``). Nothing else is unpickled (``FileSystemReader.read_metadata``
would run any pickle)."""
_MAX_PATHS = 16
_MAX_PATH_LENGTH = 4096
"""Paths a ``.metadata`` may hold (DCP writes one), and their length (Linux's PATH_MAX)."""

_STORAGE_DTYPES = {
    "FloatStorage": "F32", "DoubleStorage": "F64", "HalfStorage": "F16",
    "BFloat16Storage": "BF16", "LongStorage": "I64", "IntStorage": "I32",
    "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8", "BoolStorage": "BOOL",
    "UInt16Storage": "U16", "UInt32Storage": "U32", "UInt64Storage": "U64",
    "Float8_e4m3fnStorage": "F8_E4M3", "Float8_e5m2Storage": "F8_E5M2",
}
"""``torch.save``'s typed storage classes, by the safetensors dtype they hold."""

_TORCH_DTYPES = {
    "float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
    "bool": "BOOL", "uint16": "U16", "uint32": "U32", "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
"""torch dtypes by name, as ``torch.save`` refers to them beside an untyped storage
(``_rebuild_tensor_v3``: float8 and the unsigned types)."""


TRAINING_STATE = ("optimizer", "lr_scheduler", "dataloader", "train_state")
"""What a training checkpoint holds beside the model, by the first part of its keys.
torchtitan 0.3's ``CheckpointManager`` saves the model's keys at the top level beside its
OPTIMIZER, LR_SCHEDULER and DATALOADER states and the trainer's ``train_state``
(``components/checkpointer/base.py``), each flattened by DCP into ``ROOT.…`` keys
(``optimizer.state.layers.0.….exp_avg``, ``lr_scheduler.last_epoch``); every checkpoint
but a run's last (``last_save_model_only``) is such a full one."""


@dataclass(frozen=True)
class DcpHeaders:
    """A DCP folder's tensors, as ``read_tensors`` reads them."""

    tensors: dict[str, TensorInfo]
    """Every tensor of the model, in saved order (a tensor stored in blocks: its blocks)."""
    made: dict[str, Expr]
    """What makes the tensors stored in blocks (``Checkpoint.made``; empty where there
    are none)."""
    training_state: dict[str, int]
    """Entries of training state not read, by their root in ``TRAINING_STATE``."""


def read_tensors(folder: Path) -> DcpHeaders:
    """Every tensor of the DCP checkpoint in ``folder``, in saved order, what makes the
    tensors stored in blocks, and the count of training-state entries passed over
    (``TRAINING_STATE``: a training checkpoint's optimizer state and the like, which are
    not the model's and are not read).

    DCP's ``FileSystemWriter`` stores each tensor as a ``torch.save`` archive inside a
    ``.distcp`` file; the archive keeps the tensor's one storage uncompressed, so a
    tensor saved whole, row-major, is a run of raw bytes in that file, read and copied as
    a safetensors tensor is. A tensor that ranks saved in row chunks (``Shard(0)``
    DTensors: expert rows split over expert-parallel ranks) is its chunks in row order,
    each such a run (``TensorInfo.chunks``); one saved in blocks is made from them
    (``chunked_tensors``). A tensor saved strided, with an offset into a larger storage,
    or compressed, chunks that leave a gap or overlap, and any entry of the model that is
    not a tensor, are refused naming it.
    """
    metadata = read_metadata(folder / DCP_METADATA_NAME)
    with _as_written(folder / DCP_METADATA_NAME):
        entries, skipped = _model_entries(metadata.state_dict_metadata)
        stored = []
        for key, entry in entries.items():
            where = f"{printable(str(folder / DCP_METADATA_NAME))}: {printable(key)}"
            if not isinstance(entry, TensorStorageMetadata):
                raise MoekitError(f"{where} is not a tensor ({type(entry).__name__}): moekit "
                                  "reads checkpoints of model weights only")
            stored.append(Chunked(key, tuple(entry.size), _dtype(entry, where), entry.chunks,
                                  functools.partial(_run, folder, key,
                                                    storage_data=metadata.storage_data,
                                                    where=where), where))
        tensors, made = chunked_tensors(stored)
    return DcpHeaders(tensors, made, skipped)


def _model_entries(entries: dict[str, object]) -> tuple[dict[str, object], dict[str, int]]:
    """``entries`` but those of training state (``TRAINING_STATE``), and how many of those
    each root has."""
    model = {key: entry for key, entry in entries.items()
             if key.partition(".")[0] not in TRAINING_STATE}
    skipped = Counter(key.partition(".")[0] for key in entries if key not in model)
    return model, dict(skipped)


@contextmanager
def _as_written(path: Path) -> Iterator[None]:
    """Refuse, naming ``path``, a ``.metadata`` whose classes are DCP's but whose fields
    hold what DCP never writes (None for a size, an int for a key, a list for the whole),
    which reading it met as a TypeError, AttributeError, ... instead of a value."""
    try:
        yield
    except (TypeError, AttributeError, ValueError, KeyError, IndexError) as err:
        raise MoekitError(f"{printable(str(path))} is not a torch.distributed.checkpoint "
                          f".metadata as DCP writes it: {type(err).__name__}: "
                          f"{printable(str(err))}") from err


@dataclass(frozen=True)
class StoredTensor:
    """A tensor of a DCP checkpoint as it is stored: its shape and dtype, and each chunk
    (however the saving ranks split it) as its offset and the run of bytes that holds it,
    a ``TensorInfo`` named ``name(key, offset)``."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[tuple[tuple[int, ...], TensorInfo], ...]


def read_stored(folder: Path, name: Callable[[str, tuple[int, ...], tuple[int, ...]], str]
                ) -> tuple[dict[str, StoredTensor], list[str]]:
    """Every tensor of the DCP checkpoint in ``folder`` chunk by chunk, each chunk named
    ``name(key, offsets, shape)`` (a Megatron-Core checkpoint stacks layers and experts
    in chunks that split more than rows); and the keys of its non-tensor entries."""
    metadata = read_metadata(folder / DCP_METADATA_NAME)
    tensors, objects = {}, []
    with _as_written(folder / DCP_METADATA_NAME):
        for key, entry in metadata.state_dict_metadata.items():
            if not isinstance(entry, TensorStorageMetadata):
                objects.append(key)
                continue
            where = f"{printable(str(folder / DCP_METADATA_NAME))}: {printable(key)}"
            shape = tuple(entry.size)
            dtype = _dtype(entry, where)
            chunks = []
            for chunk in entry.chunks:
                offsets = tuple(chunk.offsets)
                run = _run(folder, key, chunk, dtype, storage_data=metadata.storage_data,
                           where=where)
                chunks.append((offsets, TensorInfo(name(key, offsets, shape), *run)))
            tensors[key] = StoredTensor(key, shape, dtype, tuple(chunks))
    return tensors, objects


def read_metadata(path: Path) -> Metadata:
    """The checkpoint's ``Metadata``, unpickled allowing only DCP's own classes, once it
    is known to be a plain file inside its folder and a pickle whose unpickling is
    bounded (``moekit.pickle_bounds``); without the garbage collector's pauses, which
    unpickling a million objects would set off many times."""
    shown = printable(str(member_file(path.parent, path.name)))
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > MAX_METADATA_BYTES:
                raise MoekitError(f"{shown} is {size:,} bytes, more than a DCP .metadata "
                                  f"moekit reads ({MAX_METADATA_BYTES:,})")
            data = file.read(size + 1)
        pickle_bounds.check(data)
        with COLLECTOR_OFF.scope():
            metadata = _Unpickler(io.BytesIO(data)).load()
    except OSError as err:
        raise MoekitError(f"cannot read {shown}: {err.strerror or err}") from err
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError,
            IndexError, KeyError, RuntimeError) as err:
        raise MoekitError(f"{shown} is not a torch.distributed.checkpoint .metadata moekit "
                          f"reads: {printable(str(err))}") from err
    if not isinstance(metadata, Metadata):
        raise MoekitError(f"{shown} is not a torch.distributed.checkpoint .metadata: it holds "
                          f"a {type(metadata).__name__}, not a Metadata")
    return metadata


_PATH_CLASSES = {("pathlib", "PosixPath"), ("pathlib._local", "PosixPath")}
"""Where a pickled ``pathlib.PosixPath`` names its class (Python 3.13 pickles it as
``pathlib._local``'s): DCP's file-system writer stores the folder as a Path."""


class _Unpickler(pickle.Unpickler):
    """Unpickles DCP metadata: its dataclasses and torch dtypes, nothing else; paths (a
    ``StorageMeta.checkpoint_id``) only a few and of a path's length, as building one
    joins strings that the pickle may repeat."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self._paths = _MAX_PATHS

    def find_class(self, module: str, name: str):
        if (module, name) in _PATH_CLASSES:
            return self._path
        if (module, name) in _METADATA_CLASSES or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not part of a "
                                     "DCP checkpoint's metadata")

    def _path(self, *parts: str) -> Path:
        """``pathlib.PosixPath(*parts)``, as a pickled path is rebuilt, within the limits."""
        self._paths -= 1
        if self._paths < 0 or sum(len(os.fspath(part)) for part in parts) > _MAX_PATH_LENGTH:
            raise pickle.UnpicklingError(f"it holds more than {_MAX_PATHS} paths or one longer "
                                         f"than {_MAX_PATH_LENGTH} characters")
        return Path(*parts)

    def persistent_load(self, pid: object):
        raise pickle.UnpicklingError("it refers to external storage")


def _dtype(entry: TensorStorageMetadata, where: str) -> str:
    """The safetensors dtype of a tensor entry of ``.metadata``; a MoekitError naming the
    entry (``where``) for a dtype moekit does not handle."""
    try:
        return to_safetensors(entry.properties.dtype)
    except KeyError:
        raise MoekitError(f"{where} has dtype {entry.properties.dtype}, which moekit does "
                          "not handle") from None


def _run(folder: Path, key: str, chunk, dtype: str, *, storage_data, where: str
         ) -> tuple[str, tuple[int, ...], str, int]:
    """(data file, shape, dtype, byte offset) of one chunk of tensor ``key``."""
    info = storage_data.get(MetadataIndex(key, chunk.offsets))
    shape = tuple(chunk.sizes)
    if info is None:
        raise MoekitError(f"{where} has no storage entry saying which file holds it")
    if info.transform_descriptors:
        raise MoekitError(f"{where} is stored transformed "
                          f"({', '.join(info.transform_descriptors)}); moekit reads tensors "
                          "stored as saved")
    file = PurePosixPath(info.relative_path)
    if file.is_absolute() or len(file.parts) != 1 or not file.name.endswith(DISTCP_SUFFIX):
        raise MoekitError(f"{where} is stored in {printable(info.relative_path)}, not a "
                          f"{DISTCP_SUFFIX} file of the folder")
    offset = _data_offset(folder / file.name, info.offset, info.length, shape, dtype, where)
    return file.name, shape, dtype, offset


def _data_offset(path: Path, start: int, length: int, shape: tuple[int, ...], dtype: str,
                 where: str) -> int:
    """Where, in ``path``, the elements of the ``torch.save`` archive at ``start`` begin,
    once the archive is known to hold exactly that tensor, row-major, uncompressed."""
    shown = f"{where} ({printable(path.name)})"
    try:
        with open(path, "rb") as file:
            archive = zipfile.ZipFile(_Slice(file, start, length))
            members = {info.filename.split("/", 1)[-1]: info for info in archive.infolist()}
            storages = [name for name in members if name.startswith("data/")]
            if storages != ["data/0"] or "data.pkl" not in members:
                raise MoekitError(f"{shown} is not one tensor saved by torch.save")
            if any(members[name].file_size > limit for name, limit in _SMALL_MEMBERS.items()
                   if name in members):
                raise MoekitError(f"{shown} is not one tensor saved by torch.save: its "
                                  f"{', '.join(_SMALL_MEMBERS)} unpack to more than "
                                  f"{max(_SMALL_MEMBERS.values()):,} bytes")
            if "byteorder" in members and archive.read(members["byteorder"]) != b"little":
                raise MoekitError(f"{shown} is saved big-endian")
            rebuilt = _rebuilt_tensor(archive.read(members["data.pkl"]))
            data = members["data/0"]
            file.seek(start + data.header_offset)
            local = file.read(30)
    except OSError as err:
        raise MoekitError(f"cannot read {shown}: {err.strerror or err}") from err
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError,
            IndexError, KeyError, struct.error) as err:
        raise MoekitError(f"{shown} is not a tensor saved by torch.save: "
                          f"{printable(str(err))}") from err
    storage_dtype, storage_offset, size, stride, flags = rebuilt
    lazy = [flag for flag in ("neg", "conj") if isinstance(flags, dict) and flags.get(flag)]
    if lazy:
        raise MoekitError(f"{shown} is saved with torch's {' and '.join(lazy)} bit set: its "
                          f"values are not its bytes but their {_LAZY[lazy[0]]}, which moekit "
                          "does not compute; save it after .resolve_neg() and .resolve_conj()")
    row_major = tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))
    if (storage_dtype, storage_offset, tuple(size)) != (dtype, 0, shape) or \
            any(n > 1 and s != r for n, s, r in zip(shape, stride, row_major)):
        raise MoekitError(f"{shown} is saved as {storage_dtype} {list(size)} with strides "
                          f"{list(stride)} from element {storage_offset}, where .metadata "
                          f"says {dtype} {list(shape)} whole and row-major")
    if data.compress_type != zipfile.ZIP_STORED or data.file_size != nbytes(shape, dtype):
        raise MoekitError(f"{shown} holds {data.file_size:,} bytes (compression "
                          f"{data.compress_type}) where {dtype} {list(shape)} is "
                          f"{nbytes(shape, dtype):,} bytes, uncompressed")
    signature, name_length, extra_length = struct.unpack("<I22xHH", local)
    if signature != 0x04034B50:
        raise MoekitError(f"{shown} is not a tensor saved by torch.save: no local header")
    return start + data.header_offset + 30 + name_length + extra_length


@functools.lru_cache(maxsize=256)
def _rebuilt_tensor(pickled: bytes) -> tuple[str, int, tuple, tuple, object]:
    """What the ``data.pkl`` ``pickled`` describes (``_Rebuild``), once its unpickling is
    known to be bounded; kept for the next tensor of the same dtype and shape, whose
    ``data.pkl`` is the same bytes."""
    pickle_bounds.check(pickled)
    return _Rebuild(io.BytesIO(pickled)).load()


class _Rebuild(pickle.Unpickler):
    """Reads the ``data.pkl`` of a ``torch.save`` archive of one tensor as (dtype, storage
    offset, size, stride), without building it; anything else is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuilt
        if (module, name) == ("torch._utils", "_rebuild_tensor_v3"):
            return _rebuilt_v3
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return None
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        raise pickle.UnpicklingError(f"it refers to {module}.{name}")

    def persistent_load(self, pid: object):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and pid[2] == "0"):
            raise pickle.UnpicklingError("its storage is not the archive's data/0")
        return pid[1]


def _rebuilt(storage: str, storage_offset: int, size: tuple, stride: tuple,
             requires_grad: bool = False, hooks: object = None, metadata: object = None
             ) -> tuple[str, int, tuple, tuple, object]:
    """What ``torch._utils._rebuild_tensor_v2`` would build, in words: the dtype of its
    typed storage, storage offset, size, stride and the flags ``torch.save`` records
    (``torch._utils.get_tensor_metadata``: ``neg`` and ``conj`` when a lazy negation or
    conjugation is set)."""
    return storage, storage_offset, tuple(size), tuple(stride), metadata


def _rebuilt_v3(storage: None, storage_offset: int, size: tuple, stride: tuple,
                requires_grad: bool, hooks: object, dtype: str, metadata: object = None
                ) -> tuple[str, int, tuple, tuple, object]:
    """What ``torch._utils._rebuild_tensor_v3`` would build (an untyped storage and its
    dtype), in words."""
    return dtype, storage_offset, tuple(size), tuple(stride), metadata


_LAZY = {"neg": "negation", "conj": "conjugate"}
"""What a tensor's bytes become under each lazy flag ``torch.save`` records."""
_SMALL_MEMBERS = {"data.pkl": 2**12, "byteorder": 16}
"""Members of a one-tensor ``torch.save`` archive that are read whole, and their largest
unpacked size: a few hundred bytes as torch writes them, while a compressed member could
unpack to any size (and checking a pickle takes time in proportion to its size)."""


class _Slice(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file, as a seekable file of its own
    (``zipfile`` reads an archive inside a ``.distcp`` file through it)."""

    def __init__(self, file, start: int, length: int) -> None:
        self.file, self.start, self.length, self.at = file, start, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.at

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.at, io.SEEK_END: self.length}[whence]
        self.at = max(0, min(self.length, base + offset))
        return self.at

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.at))
        data = os.pread(self.file.fileno(), n, self.start + self.at)
        buffer[:len(data)] = data
        self.at += len(data)
        return len(data)
