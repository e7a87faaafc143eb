"""The device executor: plan -> tensors on an accelerator, straight from the files.

For each destination tensor, the byte ranges of its source regions are copied by a pool of
reader threads (kept for the process's later loads) into a device staging buffer, and the
recipe (stack, concatenate, transpose, ...) is evaluated there. A reader moves each chunk
it is given through its two small pinned buffers in turn, reading into one while the other
is copied to the device (through its first alone while the first load in a process pins
its second). (Registering the page cache's mapped pages with CUDA instead, to skip the
host copy, is slower: registration does not scale across threads.) Where kvikio is
installed, its native threads read instead, into the staging buffer through bounce
buffers of their own (``native``): they need no GIL, which moekit's Python readers share
with the main thread. Tensors are staged in batches of about BATCH_BYTES, whose regions
adjacent in a file are read as one range (a layer's experts usually are); the reads of
SLOTS batches are queued at a time, so that the reads of the next batches overlap the
copies and the evaluation of one. Pinned host memory is two BUFFER_BYTES buffers per
reader, whatever the model size; no tensor is ever assembled on the host.

With a CPU device the same path runs with plain host buffers (and no copies), which is how
CI, without a GPU, tests it.
"""

from __future__ import annotations

import math
import mmap
import os
import queue
import re
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager as ContextManager, nullcontext
from dataclasses import dataclass, field, replace
from operator import itemgetter

import torch

from ..checkpoint import Checkpoint, TensorInfo
from ..cores import sharing_processes, usable_cpus
from ..dtypes import ITEMSIZES, itemsize, to_torch
from ..errors import MoekitError, printable
from ..gc_pauses import ScopedSetting
from ..output import deferred_signals
from ..plan import (Concat, Plan, Read, TensorPlan, checked_index, composed_plan, nbytes,
                    reads)
from ..sizes import format_size
from ..sources import FileSource, truncated, unreadable
from .ahead import ReadAhead, pieces, spanned, spans_of
from .evaluate import fill, load_copy_kernels
from .memory import run_plan
from .native import NativeFiles, NativeRead, load_for_later, native_reads, with_index
from .native import prepare as prepare_native

CHUNK_BYTES = 64 * 2**20
"""Bytes of one read job: large, so that queueing jobs costs little Python."""
BUFFER_BYTES = 8 * 2**20
"""Bytes of each of a reader's two pinned buffers, through which it moves its jobs: pinned
host memory is 2 x BUFFER_BYTES per reader. Small, because pinning is slow (0.05 to 0.1 s for
256 MiB, see ``PageLockedPool``) and the first load in a process pays for it; not smaller,
because each buffer's copy costs the reader the GIL (with 16 readers, 4 MiB buffers load a
quarter slower than 8 MiB ones; 8 to 32 MiB load within 6 % of each other once pinned)."""


def reader_count(cpus: int, processes: int = 1) -> int:
    """Reader threads for a process that can keep ``cpus`` cores busy, one of ``processes``
    on the machine: half its share of the cores, at most 16, at least 1.

    ``pread`` from the page cache is a memory copy, so several readers read faster than
    one, but the host's memory bandwidth, shared with the copies to the device, runs out
    before its cores do, and the main thread, which queues the reads and builds the
    tensors, needs a core of its own: on a 16-core H200 host, 8 to 10 readers moved 3 MiB
    expert tensors at 46 GB/s where 16 moved them at 36 GB/s, the main thread then taking
    4 to 5 times as long to build the same tensors. At most 16: the pinned host memory is
    two buffers a reader."""
    return max(1, min(16, cpus // (2 * processes)))


READERS = reader_count(usable_cpus(), sharing_processes())
"""Reader threads of a load onto an accelerator (``reader_count``)."""
SWITCH_INTERVAL = 2e-4
"""Seconds a Python thread may hold the GIL while others wait for it, during a load. A
reader whose ``pread`` returned needs the GIL only to queue its device copy; with Python's
default (5 ms) it can wait that long behind the main thread's recipe work, which shows
with small tensors; between 0.05 and 5 ms larger tensors load alike."""
BATCH_BYTES = 256 * 2**20
"""Destination bytes staged together (or one layer's, if more: a layer is not split), so
device staging memory is about SLOTS x max(BATCH_BYTES, one layer's source bytes)."""
SLOTS = 3
"""Batches staged on the device at once: the reads of two overlap the evaluation of one."""
ALIGN = 256


class PageLockedPool:
    """Host buffers page-locked for CUDA's asynchronous copies, kept for the process's later
    loads: a load takes its readers' buffers from the pool and gives them back when its
    copies are done, so only the first load in a process pays for pinning.

    A buffer is anonymous memory registered with ``cudaHostRegister``, as
    ``torch.distributed.checkpoint``'s stager pins its buffers: on an H200 host that pins
    256 MiB in 0.05 to 0.1 s, where ``cudaHostAlloc`` (PyTorch's pinned allocator) takes
    0.1 to 0.3 s, and the copies from either run at the same speed. Its pages are not
    populated beforehand: registering faults them in, with the GIL released, in one pass
    over the memory instead of two, which holds the process's memory-map lock for less of
    the time that the main thread, reading headers and planning, needs it too. Where the
    kernel has free huge pages to spare (``_spare_huge_pages``), the buffer is made of
    them: fewer pages to fault in and pin, and reads into it are faster (fewer TLB misses).
    Where registering fails, the buffer comes from PyTorch's pinned allocator instead."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, size: int) -> torch.Tensor:
        """A page-locked buffer of ``size`` bytes: a free one, else a newly pinned one."""
        with self._lock:
            free = self._free.get(size)
            if free:
                return free.pop()
        return _page_locked(size)

    def give_back(self, buffers: Iterable[torch.Tensor]) -> None:
        """Keep ``buffers`` (no copy may still read them) for later loads."""
        with self._lock:
            for buffer in buffers:
                self._free.setdefault(buffer.numel(), []).append(buffer)


HUGE_PAGE = 2 * 2**20
"""Bytes of a transparent huge page (x86-64's and, with 4 KiB pages, AArch64's)."""
SPARE_HUGE_PAGES = 512
"""Free huge pages (1 GiB) moekit leaves to others on each NUMA node: a buffer is made of
huge pages only where more are free."""


def _page_locked(size: int) -> torch.Tensor:
    """``size`` bytes of host memory, registered with CUDA (see ``PageLockedPool``): of huge
    pages, aligned to them, where the kernel has them to spare."""
    huge = size >= HUGE_PAGE and _spare_huge_pages() >= size // HUGE_PAGE
    memory = mmap.mmap(-1, size + HUGE_PAGE if huge else size,
                       flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        try:
            memory.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without transparent huge pages: small pages, aligned
            pass
    whole = torch.frombuffer(memory, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE if huge else 0
    buffer = whole[start:start + size]
    try:
        failed = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), size, _PORTABLE))
    except (AttributeError, RuntimeError):  # a runtime whose bindings lack it
        failed = True
    return torch.empty(size, dtype=torch.uint8, pin_memory=True) if failed else buffer


def _spare_huge_pages(buddyinfo: str = "/proc/buddyinfo") -> int:
    """Huge pages free beyond SPARE_HUGE_PAGES (negative where fewer are free) on the NUMA
    node that has the fewest: the blocks of HUGE_PAGE bytes and more that ``buddyinfo``
    lists free in each node's zones (but DMA and DMA32, kept for devices). Huge pages are
    asked for only from these: where there are none, the kernel would compact or reclaim
    memory to make them (on a fragmented host 0.5 s and more, and page cache evicted), so
    buffers are of small pages there. The fewest of any node, because a page is taken
    from the node of the CPU that touches it first, which may be any. 0 where Python has
    no ``MADV_HUGEPAGE``, pages are of another size, or the file is missing or unreadable."""
    if not hasattr(mmap, "MADV_HUGEPAGE") or mmap.PAGESIZE != 4096:
        return 0
    order = (HUGE_PAGE // mmap.PAGESIZE).bit_length() - 1
    nodes: dict[str, int] = {}
    try:
        with open(buddyinfo) as handle:
            for line in handle:
                _, node, _, zone, *counts = line.replace(",", " ").split()
                free = sum(int(n) << (at - order) for at, n in enumerate(counts) if at >= order)
                nodes[node] = nodes.get(node, 0) + (0 if zone in ("DMA", "DMA32") else free)
    except (OSError, ValueError):
        return 0
    return min(nodes.values(), default=0) - SPARE_HUGE_PAGES


_PORTABLE = 1
"""``cudaHostRegisterPortable``: the buffer is page-locked for every device's copies."""
PAGE_LOCKED = PageLockedPool()
"""The process's page-locked buffers, shared by its loads."""


class ReaderPool:
    """Reader threads kept for the process's later loads, as pinned buffers are
    (``PageLockedPool``): a load takes a pool of them and gives it back when its reads are
    done, so only the first load in a process starts threads. Each pool's threads are all
    started before the load queues its first read: a thread started while others already
    read waits for the GIL behind them (on an H200 host, starting 16 readers as a load
    queued its first reads held its reading back by about 10 ms). A load has its pool to
    itself, since a reader makes its load's stream its current one; loads at once take a
    pool each. A process forked from one that loaded starts with none (its threads are not
    copied)."""

    def __init__(self) -> None:
        self._free: dict[int, list[ThreadPoolExecutor]] = {}
        self._lock = threading.Lock()

    def take(self, threads: int) -> ThreadPoolExecutor:
        """A pool of ``threads`` started reader threads: a free one, else a new one."""
        with self._lock:
            free = self._free.get(threads)
            if free:
                return free.pop()
        return _started_pool(threads)

    def keep_one(self, threads: int) -> None:
        """Start a pool of ``threads`` threads now, unless one is free: a load calls this
        before it pins its buffers, since starting a thread (mapping its stack) waits for
        the process's memory map, which pinning holds (on an H200 host, 16 readers started
        before the pinning took 5 ms of a first load, and 20 to 45 ms started while it
        ran)."""
        with self._lock:
            if self._free.get(threads):
                return
        self.give_back(threads, _started_pool(threads))

    def give_back(self, threads: int, pool: ThreadPoolExecutor) -> None:
        """Keep ``pool`` of ``threads`` threads (none may still run a job) for later loads,
        unless one of as many threads is kept already: then its threads end (so a process
        keeps at most one idle pool per reader count, however many loads ran at once)."""
        with self._lock:
            free = self._free.setdefault(threads, [])
            if not free:
                free.append(pool)
                return
        pool.shutdown(wait=False)

    def forget(self) -> None:
        """Drop every kept pool (in a forked child, whose pools have no threads)."""
        self._free = {}
        self._lock = threading.Lock()


def _started_pool(threads: int) -> ThreadPoolExecutor:
    """A thread pool whose ``threads`` threads are all running and idle: each of its
    first jobs waits for the others, so the pool starts a thread for every one."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="moekit-read")
    everyone = threading.Barrier(threads)
    try:
        wait([pool.submit(everyone.wait) for _ in range(threads)])
    except BaseException:  # a thread that could not start: free the others, which wait
        everyone.abort()
        pool.shutdown(wait=False)
        raise
    return pool


READER_POOLS = ReaderPool()
"""The process's reader threads, shared by its loads."""
os.register_at_fork(after_in_child=READER_POOLS.forget)


class PinnedBuffers:
    """The pinned host buffers a load's readers move their bytes through, two a reader,
    taken from ``PAGE_LOCKED`` one at a time by a background thread: the first load in a
    process pins them (0.05 to 0.1 s for 16 readers) while its plan is built and its first
    bytes are read, not before. Later loads find them in the pool.

    Every reader's first buffer is pinned before any reader's second, and each is handed
    over as soon as it is ready (``take``; ``take_second`` once the firsts are pinned): a
    reader with one buffer cannot read while its last copy runs, but every reader starts
    reading half as late as it would if it waited for both.

    While it pins, the GIL switch interval is short (``PROMPT_HANDOFFS``): the thread needs
    the GIL around each buffer, and with Python's default interval the main thread, busy
    reading headers and planning, would hand it over only every 5 ms, which stretches the
    pinning of 32 buffers over the whole plan instead of overlapping it.

    The thread pins with ``device`` (the load's, with its index) as its current device:
    registering memory with CUDA from a thread makes a context on the thread's current
    device where it has none, which for a new thread is the first GPU, not the load's."""

    def __init__(self, pairs: int = READERS, buffer_bytes: int = BUFFER_BYTES,
                 device: torch.device | None = None) -> None:
        self.pairs = pairs
        self.buffer_bytes = buffer_bytes
        self.device = device
        self._firsts: queue.SimpleQueue = queue.SimpleQueue()
        self._seconds: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._pin, name="moekit-pin")
        self._thread.start()

    def take(self) -> torch.Tensor:
        """A reader's first buffer (waiting for it to be pinned); the pinning's error, if
        any."""
        return self._checked(self._firsts, self._firsts.get())

    def take_second(self) -> torch.Tensor | None:
        """A reader's second buffer if one is pinned, else None (the reader asks again
        before its next read); the pinning's error, if any."""
        try:
            return self._checked(self._seconds, self._seconds.get_nowait())
        except queue.Empty:
            return None

    def join(self) -> None:
        """Wait until every buffer is pinned (so that no thread outlives the load), and
        give the buffers no reader took back to the pool."""
        self._thread.join()
        for pinned in (self._firsts, self._seconds):
            left: list = []
            while not pinned.empty():
                left.append(pinned.get())
            PAGE_LOCKED.give_back(item for item in left if isinstance(item, torch.Tensor))
            for error in (item for item in left if isinstance(item, BaseException)):
                pinned.put(error)

    @staticmethod
    def _checked(pinned: queue.SimpleQueue, item: torch.Tensor | BaseException
                 ) -> torch.Tensor:
        """``item``, taken from ``pinned``, unless it is the pinning's error: then the
        error, left there for the next reader."""
        if isinstance(item, BaseException):
            pinned.put(item)
            raise item
        return item

    def _pin(self) -> None:
        try:
            if self.device is not None:
                torch.cuda.set_device(self.device)
            with PROMPT_HANDOFFS.scope():
                for pinned in (self._firsts, self._seconds):
                    for _ in range(self.pairs):
                        pinned.put(PAGE_LOCKED.take(self.buffer_bytes))
        except BaseException as err:  # handed to every reader that takes a buffer after it
            self._firsts.put(err)
            self._seconds.put(err)


def reader_threads() -> int:
    """How many reader threads a load onto an accelerator reads with (READERS)."""
    return READERS


def start_readers(device: torch.device | str | None) -> None:
    """Start the reader threads of a load onto ``device`` (none for a CPU load), unless
    they are started already: kvikio's (``native_reads``), else moekit's
    (``ReaderPool.keep_one``)."""
    if device is not None and torch.device(device).type == "cuda" and not native_reads(device):
        READER_POOLS.keep_one(READERS)


def pin_ahead(device: torch.device | str | None) -> PinnedBuffers | None:
    """Start pinning the readers' buffers of a load onto ``device`` (None for a CPU load
    or one that kvikio reads), once the readers' threads are started (``start_readers``).

    A load calls this once the checkpoint's headers are read: safetensors maps each file
    to validate its header, and mapping waits for the process's memory map, which
    registering a buffer with CUDA holds (pinning alongside made the headers of a first
    load take 2 to 3 times as long on an H200 host); the plan, made next, maps little."""
    if device is None or torch.device(device).type != "cuda" or native_reads(device):
        return None
    start_readers(device)
    return _take_prepared(READERS, BUFFER_BYTES) or PinnedBuffers(device=with_index(device))


def read_ahead(checkpoint: Checkpoint, device: torch.device | str | None
               ) -> ReadAhead | None:
    """Start reading the first bytes of a load of ``checkpoint`` onto ``device`` (those the
    page cache holds) into a buffer there (``ReadAhead``), once its headers are read and
    while its plan is made: where kvikio reads that load (``native_reads``) and the device
    has room for the checkpoint's files, what is read ahead and the staging; else None."""
    if device is None or torch.device(device).type != "cuda" or not native_reads(device):
        return None
    device = with_index(device)
    spans = spans_of(checkpoint)
    files = sum(identity.size for identity in checkpoint.identities.values())
    if not spans or files + spanned(spans) + SLOTS * BATCH_BYTES > _free_bytes(device):
        return None
    return ReadAhead.start(checkpoint, device, spans)


def prepare_loads(device: torch.device) -> None:
    """Start setting up, in the background, what the first load onto ``device`` would set
    up while it runs: kvikio loaded and warmed up on the device where loads would read
    through it (``native.prepare``), else moekit's reader threads started and their
    buffers pinned (with ``device`` current, where they make CUDA's context), for the
    next load to take (``_take_prepared``): page-locked for every device's copies, they
    serve a load onto any GPU. Nothing for a CPU device."""
    if device.type != "cuda":
        return
    device = with_index(device)
    if prepare_native(device):
        return
    start_readers(device)
    with _PREPARED_LOCK:
        if not _PREPARED:
            _PREPARED.append(PinnedBuffers(device=device))


def _take_prepared(readers: int, buffer_bytes: int) -> PinnedBuffers | None:
    """The buffers ``prepare_loads`` pinned, once, where they are as many and as large as
    a load with ``readers`` readers of ``buffer_bytes`` buffers uses: the load that takes
    them joins them when it is done."""
    with _PREPARED_LOCK:
        if _PREPARED and (_PREPARED[0].pairs, _PREPARED[0].buffer_bytes) == (readers,
                                                                             buffer_bytes):
            return _PREPARED.pop()
    return None


_PREPARED: list[PinnedBuffers] = []
"""The buffers ``prepare_loads`` pins ahead, until a load takes them."""
_PREPARED_LOCK = threading.Lock()


def _forget_prepared() -> None:
    """In a forked child: the pinning threads were not copied, so their buffers never
    come."""
    global _PREPARED_LOCK
    _PREPARED.clear()
    _PREPARED_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_prepared)


_Leaf = list
"""One source region of a batch, as the rows of its source tensor that cover it: [file,
first byte, bytes, the rows' shape, dtype, the index that remains to apply to those rows,
where the rows are staged (a byte offset, set when the batch is laid out)]. A list, not a
class: a load lays out thousands of them."""

_LEAF_FILE, _LEAF_START = itemgetter(0), itemgetter(1)
"""A leaf's file and first byte."""


def _in_file_order(leaves: Iterable[_Leaf]) -> list[_Leaf]:
    """``leaves`` by file, then first byte: sorted by the byte, then (stably) by the file,
    as comparing ints is several times faster than comparing (file, byte) tuples whose
    files are mostly equal, and a load sorts every leaf of the checkpoint."""
    return sorted(sorted(leaves, key=_LEAF_START), key=_LEAF_FILE)


def read_plan(plan: Plan, checkpoint: Checkpoint, device: torch.device | str | None = None,
              wrap_experts: Callable[[torch.Tensor], torch.Tensor] | None = None,
              pinned: PinnedBuffers | None = None, ahead: ReadAhead | None = None
              ) -> dict[str, torch.Tensor]:
    """Every tensor of ``plan`` from ``checkpoint``'s files: through pinned buffers
    (``pin_ahead``'s, when given) or kvikio (with what ``read_ahead`` read, when given)
    onto an accelerator ``device``, or straight from the files on the CPU."""
    if device is not None and torch.device(device).type != "cpu":
        return load_to_device(plan, checkpoint, device, wrap_experts, pinned=pinned,
                              ahead=ahead)
    with FileSource(checkpoint) as source:
        out = run_plan(plan, source, device, wrap_experts)
        source.check_unchanged()
    return out


_CHUNKS = itemgetter(5)
"""A TensorInfo's ``chunks``, as a getter that runs in C (every GPU load asks it of every
tensor of the checkpoint)."""


def _rows_as_blocks(plan: Plan, checkpoint: Checkpoint) -> tuple[Plan, Checkpoint]:
    """``plan`` reading each tensor saved in row chunks (``TensorInfo.chunks``: ranks'
    ``Shard(0)`` DTensors) as the concatenation of its chunks, each a tensor named
    ``KEY/rows_FIRST`` that the returned checkpoint holds too: a batch stages the chunks as
    it stages any tensor, and the recipe joins them on the device, as it joins a tensor
    stored in blocks. ``plan`` and ``checkpoint`` are returned unchanged when the plan
    reads no tensor stored in row chunks."""
    infos = checkpoint.tensors
    if not any(map(_CHUNKS, infos.values())):
        return plan, checkpoint
    keys = {read.key for tensor in plan.tensors for read in reads(tensor.recipe)}
    made, rows = {}, {}
    for key in keys:
        info = infos[key]
        parts, first = [], 0
        for run in info.chunks:
            name = f"{key}/rows_{first}"
            if name in infos:
                raise MoekitError(f"{printable(key)} is saved in row chunks, which moekit "
                                  f"names as {printable(name)}, a tensor of the checkpoint too")
            rows[name] = run._replace(key=name)
            parts.append(Read.whole(name, run))
            first += run.shape[0]
        made[key] = Concat(tuple(parts), 0) if parts else Read.whole(key, info)
    if not rows:
        return plan, checkpoint
    return composed_plan(plan, made), replace(checkpoint, tensors={**infos, **rows})


def load_to_device(plan: Plan, checkpoint: Checkpoint, device: torch.device | str,
                   wrap_experts: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   readers: int = READERS, chunk_bytes: int = CHUNK_BYTES,
                   batch_bytes: int = BATCH_BYTES, slots: int = SLOTS,
                   buffer_bytes: int = BUFFER_BYTES, pinned: PinnedBuffers | None = None,
                   native: bool | None = None, ahead: ReadAhead | None = None
                   ) -> dict[str, torch.Tensor]:
    """Every tensor of ``plan`` on ``device``, read from ``checkpoint``'s files.
    ``wrap_experts`` is applied to the routed-expert tensors (e.g. to make DTensors);
    ``native`` reads through kvikio (by default where ``native_reads``, unless moekit's
    readers were given ``pinned`` buffers; moekit's readers read where kvikio cannot open a
    file); ``pinned`` hands moekit's readers their buffers (``pin_ahead``), else each pins
    its own; ``ahead`` (``read_ahead``) hands over kvikio's handles of the files, which
    then read the load whatever ``native`` says, and the bytes read ahead with them, which
    the batches copy on the device (it is closed where the load would not fit beside it);
    the other arguments tune moekit's readers and the staging (see READERS, CHUNK_BYTES,
    ...).

    Every batch is laid out (from the headers: the reads of each recipe listed once, in a
    few Python operations per source region) before the first byte is read, which is how
    the staging a load needs is known before it starts.

    A CUDA ``device`` named without an index is the calling thread's current device,
    resolved here: the reader threads, whose current device is another, make their streams
    on it, and a stream on another GPU than the copies' would not order them."""
    device = with_index(device)
    plan, checkpoint = _rows_as_blocks(plan, checkpoint)
    batches = [_lay_out(index, tensors, checkpoint, chunk_bytes)
               for index, tensors in enumerate(_batches(plan.tensors, batch_bytes))]
    _taper(batches, readers, min(buffer_bytes, chunk_bytes))
    if device.type == "cuda":
        try:
            _check_room(plan, device, batches, slots)
        except MoekitError:
            if ahead is None:
                raise
            ahead.close()  # what was read ahead takes room the load needs
            ahead = None
            _check_room(plan, device, batches, slots)
    if ahead is not None:
        native = True
    elif native is None:
        native = pinned is None and native_reads(device)
    prepared = None
    if pinned is None and not native and device.type == "cuda":
        pinned = prepared = _take_prepared(readers, buffer_bytes)
    if pinned is not None and (pinned.pairs, pinned.buffer_bytes) != (readers, buffer_bytes):
        pinned = None  # pinned for other readers: each reader pins its own
    try:
        with PROMPT_HANDOFFS.scope(), _Reader(checkpoint, device, readers, slots, buffer_bytes,
                                         pinned, native and device.type == "cuda",
                                         ahead) as reader:
            out = reader.run(batches)
    finally:
        if prepared is not None:
            prepared.join()
    if reader.native is None:
        load_for_later(device)
    if wrap_experts is not None:
        out = {k: wrap_experts(v) if k in plan.expert_tensors else v for k, v in out.items()}
    return out


def _check_room(plan: Plan, device: torch.device, batches: list[_Batch], slots: int) -> None:
    """Refuse, before building anything, a load that cannot fit on the device: its tensors
    plus the ``slots`` largest staging buffers of its ``batches`` and the largest tensor
    once more (a stack gathered from scattered regions is built whole before it is copied
    into place) against the memory free there, counting what PyTorch holds cached but
    unused."""
    sizes = sorted((batch.size for batch in batches), reverse=True)
    staging = sum(sizes[:slots]) + max((tensor.nbytes for tensor in plan.tensors), default=0)
    free = _free_bytes(device)
    if plan.total_bytes + staging > free:
        raise MoekitError(
            f"loading onto {device} needs about {format_size(plan.total_bytes + staging)} "
            f"({format_size(plan.total_bytes)} of tensors and {format_size(staging)} of "
            f"staging and building) but {format_size(free)} is free there: free memory "
            "first, or load a share of the experts per GPU (moekit.load_experts with expert "
            "parallelism)")


def _free_bytes(device: torch.device) -> int:
    """The memory free on a CUDA ``device``, counting what PyTorch holds cached but unused."""
    return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
            - torch.cuda.memory_allocated(device))


PROMPT_HANDOFFS = ScopedSetting(sys.getswitchinterval, sys.setswitchinterval,
                                lambda saved: min(saved, SWITCH_INTERVAL))
"""The GIL switch interval, at most SWITCH_INTERVAL while loads run."""


@dataclass
class _Batch:
    """Tensors staged together: their source regions (by read identity), laid out in the
    staging buffer, the reads that fill it (file, file offset, buffer offset, size) and its
    size. Once submitted: the staging buffer, on CUDA the event after which it may
    be written, and the reads' futures."""

    index: int
    tensors: list[TensorPlan]
    leaves: dict[str | tuple, _Leaf]
    jobs: list[tuple[str, int, int, int]]
    size: int
    staging: torch.Tensor | None = None
    writable: torch.cuda.Event | None = None
    futures: list[Future] = field(default_factory=list)


class _Reader:
    """Reader threads, their buffers and streams, and the batches in flight. Files are
    located (opened, header offsets read) by the main thread; readers only ``pread``. With
    ``native``, kvikio's threads read instead (``NativeFiles``), straight into the staging
    buffer, once the compute stream is done with its memory; moekit's readers read where
    kvikio cannot open a file.

    The main thread gives a batch (laid out, ``_lay_out``) a staging buffer and queues its
    reads, up to ``slots`` batches ahead of the one it evaluates; a batch's buffer is
    released once its evaluation is queued, and the next batch's buffer is allocated after
    it, on the same stream, so that device memory stays at ``slots`` batches. Readers never wait for
    the main thread: their copies into a new buffer are ordered on the GPU after the event
    recorded at its allocation. With ``ahead``, its files and kvikio handles are read
    with, and the bytes it read are copied from its buffer on the compute stream; the
    buffer is dropped once the last batch that copies from it is submitted."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device, readers: int,
                 slots: int = SLOTS, buffer_bytes: int = BUFFER_BYTES,
                 pinned: PinnedBuffers | None = None, native: bool = False,
                 ahead: ReadAhead | None = None) -> None:
        self.pinned = pinned
        self.native_wanted = native
        self.native: NativeFiles | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.ahead = ahead
        self.last_ahead = -1  # the last batch that copies from ``ahead``
        if ahead is not None:
            self.files, self.native = ahead.files, ahead.native
        else:
            self.files = FileSource(checkpoint)
        self.slots = slots
        self.device = device
        self.cuda = device.type == "cuda"
        self.buffer_bytes = buffer_bytes
        self.local = threading.local()
        self.aborted = False
        self.running = 0  # copies under way (``_copy``)
        self.busy = threading.Condition()
        self.compute = torch.cuda.Stream(device) if self.cuda else None
        self.handed: list[torch.Tensor] = []  # the readers' pinned buffers, for the pool
        self.readers = readers

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        with deferred_signals():  # no copy may outlive its staging buffer, even interrupted
            self._settle()

    def _settle(self) -> None:
        """Wait until no read or copy of this load runs, and give back what it took."""
        with self.busy:  # whatever queued the copies, even a submit cut short by an interrupt
            self.aborted = True  # from here on, a copy queued for this load does nothing
            self.busy.wait_for(lambda: not self.running)
        if self.native is not None:
            self.native.drain()
            self.native.close()
        if self.ahead is not None:
            self.ahead.release()
        if self.pool is not None:
            READER_POOLS.give_back(self.readers, self.pool)
        if self.cuda:
            torch.cuda.synchronize(self.device)
            PAGE_LOCKED.give_back(self.handed)
        self.files.close()

    def run(self, batches: list[_Batch]) -> dict[str, torch.Tensor]:
        """The tensors of ``batches`` (consecutive groups of a plan's tensors, laid out)."""
        self._start(batches)
        if self.compute is not None:
            # The tensors are allocated on the caller's stream, as any torch op's are: once
            # the caller frees them, the caching allocator reuses their memory in order
            # with the caller's work on them. (Allocated on the compute stream, a later
            # load could write into them while the caller's copies from them still ran.)
            # They are written on the compute stream, which first waits for the caller's
            # stream, where memory it freed may still be in use.
            self.compute.wait_stream(torch.cuda.current_stream(self.device))
        out: dict[str, torch.Tensor] = {}
        in_flight: deque[_Batch] = deque()
        ahead = min(self.slots, len(batches))
        for at, batch in enumerate(batches):
            if len(in_flight) == self.slots:
                out.update(self._finish(in_flight.popleft()))
            in_flight.append(self._submit(batch))
            if at == ahead - 1 and self.compute is not None:
                # while the first batches' reads run: loading a kernel takes 10 to 30 ms
                # on an H200 host, which would hold back the reads of batches queued after
                with self._on_compute():
                    load_copy_kernels(self.device, {t.recipe.dtype for b in batches
                                                    for t in b.tensors})
        while in_flight:
            out.update(self._finish(in_flight.popleft()))
        if self.compute is not None:
            self.compute.synchronize()
        self.files.check_unchanged()
        return out

    def _start(self, batches: list[_Batch]) -> None:
        """Open the files ``batches`` read with kvikio, where the load reads natively and
        kvikio can open them all (unless ``ahead`` opened them); else take a pool of
        moekit's readers."""
        if self.ahead is not None:
            self.last_ahead = max((batch.index for batch in batches if any(
                self.ahead.holds(file, start, size) for file, start, _, size in batch.jobs)),
                default=-1)
            if self.last_ahead < 0:
                self.ahead.release()
            elif self.compute is not None:  # freed only once the copies from it are done
                self.ahead.buffer.record_stream(self.compute)
        elif self.native_wanted:
            names = {job[0] for batch in batches for job in batch.jobs}
            try:
                self.native = NativeFiles(self.files, names)
            except (OSError, RuntimeError):  # e.g. no /proc, or kvikio refuses the file
                self.native = None
        if self.native is None:
            self.pool = READER_POOLS.take(self.readers)

    def _submit(self, batch: _Batch) -> _Batch:
        """Allocate the batch's staging buffer (on the compute stream, after the
        evaluations queued so far) and queue its reads."""
        with self._on_compute():
            # Whole ALIGN blocks (even for a batch of empty tensors): viewable as any dtype.
            batch.staging = torch.empty(max(batch.size, ALIGN), dtype=torch.uint8,
                                        device=self.device)
            if self.compute is not None:
                batch.writable = torch.cuda.Event()
                batch.writable.record(self.compute)
        if self.native is not None:
            # kvikio copies on streams of its own: its writes wait for nothing on the GPU.
            if batch.writable is not None:
                batch.writable.synchronize()
            if batch.index <= self.last_ahead:  # the bytes it copies from ``ahead`` are read
                for file, start, _, size in batch.jobs:
                    self.ahead.wait(file, start, start + size)
            with deferred_signals():  # every read kvikio queues is recorded, to be waited for
                batch.futures = [read for job in batch.jobs
                                 for read in self._native_job(batch, *job)]
            if batch.index == self.last_ahead:
                self.ahead.release()
            return batch
        batch.futures = [self.pool.submit(self._copy, batch, self.files.descriptor(file), file,
                                          start, offset, size)
                         for file, start, offset, size in batch.jobs]
        return batch

    def _native_job(self, batch: _Batch, file: str, start: int, offset: int, size: int
                    ) -> list[NativeRead]:
        """Queue the kvikio reads of a job of ``batch``; the bytes ``ahead`` holds (read by
        now) are copied from its buffer instead, on the compute stream."""
        staging = batch.staging[offset:offset + size]
        if batch.index > self.last_ahead:
            return [self.native.read(file, staging, start)]
        reads = []
        for first, count, at in self.ahead.segments(file, start, size):
            target = staging[first - start:first - start + count]
            if at is None:
                reads.append(self.native.read(file, target, first))
                continue
            with self._on_compute():
                target.copy_(self.ahead.buffer[at:at + count], non_blocking=True)
        return reads

    def _finish(self, batch: _Batch) -> dict[str, torch.Tensor]:
        """The batch's tensors, once its reads are done; its staging buffer is released."""
        copies = [future.result() for future in batch.futures]
        out = self._evaluate(batch, copies)
        batch.staging = batch.writable = None
        batch.futures.clear()
        return out

    def _copy(self, batch: _Batch, fd: int, file: str, start: int, offset: int, size: int):
        """``_copy_bytes``, counted in ``running``, unless the load has ended: it waits for
        every copy under way before it returns, and none starts after that."""
        with self.busy:
            if self.aborted:
                return None
            self.running += 1
        try:
            return self._copy_bytes(batch, fd, file, start, offset, size)
        finally:
            with self.busy:
                self.running -= 1
                if not self.running:
                    self.busy.notify_all()

    def _copy_bytes(self, batch: _Batch, fd: int, file: str, start: int, offset: int,
                    size: int):
        """Copy ``size`` bytes at ``start`` of ``file`` (open as ``fd``) into the batch's
        staging buffer at ``offset``. On CUDA, the bytes go through this thread's two pinned
        buffers in turn (through its first alone until its second is pinned): read into
        one (once its previous copy is done) while the other is copied to the device,
        asynchronously on this thread's stream, after the staging buffer is writable;
        return (this thread's stream, the last copy's event).

        A reader holds the GIL only between its reads, but 16 of them contend for it
        with the main thread, so this does as few Python-level torch calls as it can: the
        thread's stream is made current once and given to each record (which would
        otherwise look the current stream up in Python), and its two events are recorded
        again and again (a wait on an event waits for its latest record, which is at or
        after the copy that returned it)."""
        staging = batch.staging[offset:offset + size]
        if not self.cuda:
            _read_into(fd, start, memoryview(staging.numpy()), file)
            return None
        local = self._local()
        if local.batch < batch.index:
            local.stream.wait_event(batch.writable)
            local.batch = batch.index
        for done in range(0, size, self.buffer_bytes):
            n = min(self.buffer_bytes, size - done)
            if len(local.buffers) == 1:
                self._take_second(local)
            turn = local.turn = (local.turn + 1) % len(local.buffers)
            event = local.events[turn]
            event.synchronize()
            _read_into(fd, start + done, local.views[turn][:n], file)
            staging[done:done + n].copy_(local.buffers[turn][:n], non_blocking=True)
            event.record(local.stream)
        return local.stream, event

    def _local(self) -> threading.local:
        """This reader thread's pinned buffers (its first only, where ``self.pinned`` has
        yet to pin its second) and memoryviews of them, their copies' events and its
        stream, which is made the thread's current stream, and so its device the thread's
        current device before the thread pins anything (``PinnedBuffers`` says why)."""
        local = self.local
        if not hasattr(local, "buffers"):
            local.stream = torch.cuda.Stream(self.device)
            torch.cuda.set_stream(local.stream)
            local.buffers = [self.pinned.take()] if self.pinned is not None else [
                PAGE_LOCKED.take(self.buffer_bytes) for _ in range(2)]
            self.handed.extend(local.buffers)
            local.views = [memoryview(buffer.numpy()) for buffer in local.buffers]
            local.events = [torch.cuda.Event(), torch.cuda.Event()]
            local.turn = 0
            local.batch = -1
        return local

    def _take_second(self, local: threading.local) -> None:
        """Give this reader its second pinned buffer, if one is pinned yet."""
        second = self.pinned.take_second()
        if second is not None:
            self.handed.append(second)
            local.buffers.append(second)
            local.views.append(memoryview(second.numpy()))

    def _evaluate(self, batch: _Batch, copies: list) -> dict[str, torch.Tensor]:
        """Build the batch's tensors from its staging buffer: allocated on the caller's
        stream, filled (on CUDA) on the compute stream after the last copy of each reader
        stream (a stream's copies complete in order)."""
        source = _StagedSource(batch.staging, batch.leaves)
        out = {t.name: torch.empty(t.recipe.shape, dtype=to_torch(t.recipe.dtype),
                                   device=self.device) for t in batch.tensors}
        if self.compute is not None:  # (kvikio's reads, done, leave nothing to wait for)
            for event in {copy[0]: copy[1] for copy in copies if copy is not None}.values():
                self.compute.wait_event(event)
        with self._on_compute():
            for tensor in batch.tensors:
                fill(tensor.recipe, out[tensor.name], source)
        return out

    def _on_compute(self) -> ContextManager:
        """Make the compute stream current (on CUDA)."""
        return torch.cuda.stream(self.compute) if self.compute is not None else nullcontext()


def _lay_out(index: int, tensors: list[TensorPlan], checkpoint: Checkpoint,
             chunk_bytes: int) -> _Batch:
    """The batch of ``tensors``: their distinct source regions laid out in a staging buffer
    in file order, regions that touch or overlap in a file kept together as one run (read
    as one byte range, in jobs cut at ``chunk_bytes``), each run aligned to ALIGN bytes."""
    leaves = _leaves(tensors, checkpoint)
    jobs: list[tuple[str, int, int, int]] = []
    size, run_file, run_start, run_end = 0, "", 0, 0  # an empty run, which queues nothing
    for leaf in _in_file_order(leaves.values()):
        file, start, end = leaf[0], leaf[1], leaf[1] + leaf[2]
        if file != run_file or start > run_end:
            size = _queue_run(jobs, run_file, run_start, run_end, size, chunk_bytes)
            run_file, run_start, run_end = file, start, end
        elif end > run_end:
            run_end = end
        leaf[6] = size + start - run_start
    size = _queue_run(jobs, run_file, run_start, run_end, size, chunk_bytes)
    return _Batch(index, tensors, leaves, jobs, size)


def _queue_run(jobs: list[tuple[str, int, int, int]], file: str, start: int, end: int,
               offset: int, chunk_bytes: int) -> int:
    """Add the reads of bytes ``[start, end)`` of ``file``, staged from ``offset``, to
    ``jobs``; the staging offset of the next run."""
    jobs += [(file, a, offset + a - start, b - a) for a, b in pieces(start, end, chunk_bytes)]
    return offset + -(-(end - start) // ALIGN) * ALIGN


def _taper(batches: list[_Batch], readers: int, floor: int) -> None:
    """Cut the last reads of a load smaller, so that its readers run dry together: no job
    is larger than the bytes queued after it shared among the readers (guided
    self-scheduling), in whole multiples of ``floor`` (a reader's buffer). With jobs of
    CHUNK_BYTES to the end, the readers that run dry first would wait, at the end of
    every load, while each of the others reads up to a CHUNK_BYTES job on its own."""
    after = 0
    for batch in reversed(batches):
        jobs = []
        for file, start, offset, size in reversed(batch.jobs):
            while size > 0:
                piece = min(size, max(floor, after // readers // floor * floor))
                size -= piece
                jobs.append((file, start + size, offset + size, piece))
                after += piece
        batch.jobs = jobs[::-1]


def _leaves(tensors: list[TensorPlan], checkpoint: Checkpoint) -> dict[str | tuple, _Leaf]:
    """The distinct source regions the tensors' recipes read, by read identity (each
    recipe walked once); a whole tensor, which most are, is its header's entry."""
    infos = checkpoint.tensors
    found: dict[str | tuple, _Leaf] = {}
    for tensor in tensors:
        for read in reads(tensor.recipe):
            region = read.region
            ident = read.ident if region else read.key  # (Read.ident, without its call)
            if ident in found:
                continue
            info = infos[read.key]
            _, file, shape, dtype, offset, chunks = info
            if chunks:  # _rows_as_blocks makes every chunk a tensor of its own
                raise MoekitError(f"internal error: {read.key} is read whole from its first "
                                  "row chunk's place; load it on the CPU")
            found[ident] = _rows_leaf(region, info) if region else [
                file, offset, math.prod(shape) * ITEMSIZES[dtype], shape, dtype, (), 0]
    return found


def _rows_leaf(region: tuple, info: TensorInfo) -> _Leaf:
    """The rows of ``info``'s tensor that cover ``region`` of it."""
    row_bytes = nbytes(info.shape[1:], info.dtype)
    first, rows, rest = _rows(region, info.shape[0] if info.shape else 1)
    return [info.file, info.offset + first * row_bytes, rows * row_bytes,
            (rows, *info.shape[1:]) if info.shape else (), info.dtype, rest, 0]


def _batches(tensors: list[TensorPlan], batch_bytes: int) -> list[list[TensorPlan]]:
    """Consecutive tensors in groups of at least ``batch_bytes`` (or what is left), staged
    and read together. A layer is never split: its experts usually lie next to each other
    in a file, and one batch reads them as one range."""
    batches: list[list[TensorPlan]] = []
    size, layer = batch_bytes, None
    for tensor in tensors:
        match = _LAYER.search(tensor.name)
        current = match[0] if match else tensor.name
        if size >= batch_bytes and current != layer:
            batches.append([])
            size = 0
        batches[-1].append(tensor)
        size += tensor.nbytes
        layer = current
    return batches


_LAYER = re.compile(r"(^|\.)layers\.\d+\.")


class _StagedSource:
    """Serves a recipe's reads as views of the staging buffer."""

    def __init__(self, staging: torch.Tensor, leaves: dict[str | tuple, _Leaf]) -> None:
        self.staging = staging
        self.leaves = leaves
        self.typed: dict[str, torch.Tensor] = {}

    def locate(self, regions: list[Read]
               ) -> tuple[torch.Tensor, list[int], tuple[int, ...]] | None:
        """Where equally shaped regions of whole rows of one dtype lie: (the staging buffer
        as their dtype, each one's element offset, their shape), so that a stack of them is
        gathered without a view per part; None for other regions."""
        leaves = self.leaves
        first = leaves[regions[0].ident]
        shape, dtype = first[3], first[4]
        size = itemsize(dtype)
        starts = []
        for region in regions:  # Read.ident, without its call for a whole tensor
            _, _, _, other, kind, rest, offset = leaves[
                region.ident if region.region else region.key]
            if rest or offset % size or other != shape or kind != dtype:
                return None
            starts.append(offset // size)
        return self._typed(dtype), starts, shape

    def read(self, region: Read) -> torch.Tensor:
        _, _, size, shape, dtype, rest, offset = self.leaves[region.ident]
        item = itemsize(dtype)
        if offset % item:  # copied to memory aligned for its dtype
            raw = self.staging[offset:offset + size].clone().view(to_torch(dtype))
        else:
            raw = self._typed(dtype)[offset // item:(offset + size) // item]
        tensor = raw.view(shape)
        return tensor[rest] if rest else tensor

    def _typed(self, dtype: str) -> torch.Tensor:
        """The staging buffer viewed as ``dtype`` (made once per dtype)."""
        typed = self.typed.get(dtype)
        if typed is None:
            typed = self.typed[dtype] = self.staging.view(to_torch(dtype))
        return typed


def _rows(region: tuple, length: int) -> tuple[int, int, tuple]:
    """The rows of dimension 0 a region covers (first, count) and the region that remains
    to apply to those rows (an int index on dimension 0 becomes 0 there)."""
    if not region:
        return 0, length, ()
    head, rest = region[0], tuple(region[1:])
    if isinstance(head, int):
        return checked_index(head, length), 1, (0, *rest)
    start, stop, step = head.indices(length)
    if step != 1:
        return 0, length, region
    return start, max(stop - start, 0), (slice(None), *rest) if rest else ()


def _read_into(fd: int, start: int, view: memoryview, file: str) -> None:
    """Fill ``view`` (bytes of host memory) with the file's bytes from ``start``; a
    MoekitError naming the file when it ends first or cannot be read (an I/O error in a
    reader thread reaches the caller as this refusal, not as a bare OSError)."""
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], start + done)
        except OSError as err:
            raise unreadable(file, err.strerror or err) from err
        if n <= 0:
            raise truncated(file, start + len(view))
        done += n
