"""Reads from a checkpoint's files straight into GPU memory by kvikio's native threads,
where kvikio (RAPIDS' file-to-GPU reader: ``pip install kvikio-cu12`` or ``kvikio-cu13``)
is installed.

kvikio cuts each ``pread`` into tasks of ``task_size`` bytes and runs them on its
own pool of C++ threads, each reading its task through the page cache into a page-locked
bounce buffer and copying that to the device, none of them holding Python's GIL. moekit's
own readers (``device._Reader``'s Python threads) need the GIL around each buffer they move,
and contend for it with the main thread, which queues the reads and builds the tensors.

moekit reads in kvikio's POSIX mode (``KVIKIO_COMPAT_MODE=ON``) unless that variable is set:
GPUDirect Storage reads around the page cache, so a warm load would lose what the cache
gives it. The files are opened through the descriptors moekit holds and has checked
(``/proc/self/fd``), and the handles are checked to be those files.

kvikio is loaded, its threads started and warmed up (``_warm_up``: a read of zeros in as
many tasks as it has threads), by a background thread that starts once a process's first
GPU load is done, or when the program calls ``moekit.prepare_loads`` (``prepare``); a load
that starts before kvikio is ready reads with moekit's readers, which a first load reads
faster with: on an H200 host, 43-51 % of the pinned copy limit for 3 MiB experts against
40-45 % for kvikio's first load, which loads its libraries and pins its buffers, and for
0.5 MiB experts 29-32 % against 23-25 % where kvikio was loaded beside it.

kvikio's thread count (``KVIKIO_NTHREADS``), task size (``KVIKIO_TASK_SIZE``) and bounce
buffer size (``KVIKIO_BOUNCE_BUFFER_SIZE``) are process-wide: moekit sets them once it has loaded
kvikio, each unless its variable is set, and leaves them as they are where the program
imported kvikio itself (reading through it there only if it has more than one thread).
``MOEKIT_KVIKIO=0`` turns the native reads off; a process forked from one that started
loading kvikio reads with moekit's readers, since kvikio's threads are not copied into it.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import sys
import threading
import warnings
from types import ModuleType

import torch

from ..cores import sharing_processes, usable_cpus
from ..sources import FileSource, truncated, unreadable

TASK_BYTES = 8 * 2**20
"""Bytes of one of kvikio's read tasks, and of each of its bounce buffers (a bounce buffer
larger than a task is never filled, and the first load in a process pins one for each of
kvikio's threads). On a 16-core H200 host, the load's reading and building ran at 85 % of
the pinned copy limit with 8 MiB tasks against 81 % with kvikio's default of 4 MiB and 71 %
with 16 MiB (3 MiB experts; 76, 73 and 60 % with 0.5 MiB experts)."""
SWITCH = "MOEKIT_KVIKIO"
"""The environment variable that, set to 0, makes GPU loads read with moekit's readers."""


def native_reader_count(cpus: int, processes: int = 1) -> int:
    """kvikio threads for a process that can keep ``cpus`` cores busy, one of ``processes``
    on the machine: its share of the cores, at most 16. Native threads take no core from
    the main thread while they wait for the GIL, as Python readers do (``reader_count``
    gives those half the share); on a 16-core H200 host 16 threads read a checkpoint's
    files to the GPU at 86 % of the pinned copy limit, 12 at 79 % and 24 at 81 %."""
    return max(1, min(16, cpus // processes))


NATIVE_READERS = native_reader_count(usable_cpus(), sharing_processes())
"""kvikio's threads, where moekit sets their count (``native_reader_count``)."""


class _Native:
    """The process's kvikio: loaded and set up (``_configure``) by a background thread,
    started once; its module, or None where it is missing, cannot load, or a fork has left
    its threads behind."""

    def __init__(self) -> None:
        self.module: ModuleType | None = None
        self.loaded = threading.Event()
        self.thread: threading.Thread | None = None
        self.forked = False
        self.lock = threading.Lock()
        self.device: torch.device | None = None  # where the loads read to, to warm up on

    def ready(self) -> ModuleType | None:
        """kvikio if it is loaded, else None."""
        return None if self.forked or not self.loaded.is_set() else self.module

    def get(self) -> ModuleType | None:
        """kvikio, once it is loaded (loading it, or waiting for it), or None."""
        if self.forked:
            return None
        self.start()
        self.loaded.wait()
        return self.module

    def start(self, device: torch.device | None = None) -> None:
        """Start loading kvikio in the background (and warming it up on ``device``, where
        given: ``_warm_up``), unless that is started already."""
        with self.lock:
            if self.thread is None:
                self.device = device
                self.thread = threading.Thread(target=self._load, name="moekit-kvikio",
                                               daemon=True)
                self.thread.start()

    def _load(self) -> None:
        try:
            ours = "kvikio" not in sys.modules  # (a program's own kvikio is left as it is)
            self.module = _loaded()
            if self.module is not None and ours and self.device is not None:
                _warm_up(self.module, self.device)
        finally:
            self.loaded.set()

    def settle(self, seconds: float = 60) -> None:
        """Wait (up to ``seconds``) for a loading that has started: at the interpreter's
        exit, so that kvikio's libraries are not torn down while its threads start."""
        thread = self.thread
        if thread is not None and not self.forked:
            thread.join(seconds)

    def after_fork(self) -> None:
        if self.thread is not None:  # a child of one that never loaded kvikio may load it
            self.forked = True
        self.lock = threading.Lock()


def _loaded() -> ModuleType | None:
    """kvikio, imported and set up (``_configure``), or as the program set it up where it
    imported kvikio itself; None where it is not installed or the program's kvikio reads
    with one thread (kvikio's default), and, with a warning, where it cannot load (its
    libraries missing) or refuses its settings (a ``KVIKIO_`` variable it cannot read):
    the loads then read with moekit's readers."""
    ours = "kvikio" not in sys.modules
    try:
        import kvikio
        import kvikio.defaults  # noqa: F401 (the settings ``_configure`` makes)

        if ours:
            _configure(kvikio)
        elif kvikio.defaults.get("num_threads") < 2:
            return None
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != "kvikio":
            _warn(err)
        return None
    except Exception as err:  # a library it loads is missing or broken: any error type
        _warn(err)
        return None
    return kvikio


WARM_UP_SOURCE = "/dev/zero"
"""What ``_warm_up`` reads: zeros, from no file of the user's."""


def kvikio_writable(size: int, device: torch.device) -> torch.Tensor:
    """``size`` bytes of ``device``'s memory that kvikio may write at once. kvikio writes on
    streams of its own, which wait for nothing, and PyTorch hands a block freed on a stream
    straight back to the next allocation on that stream, though work queued there earlier
    may still use it. So the memory is allocated on a side stream (not on the caller's,
    whose queued work could be long: a model being built) and that stream is waited for."""
    if torch.device(device).type != "cuda":
        return torch.empty(size, dtype=torch.uint8, device=device)
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        buffer = torch.empty(size, dtype=torch.uint8, device=device)
    side.synchronize()
    return buffer


def _warm_up(kvikio: ModuleType, device: torch.device) -> int:
    """Read zeros into ``device``'s memory through kvikio, in as many tasks as it has
    threads, each of at most one bounce buffer; the bytes read (0 where the warm-up failed:
    the first load then pays for it). kvikio pins the bounce buffers of its pool and makes
    each thread's stream for the device as its reads first need them, which would
    otherwise be the first load's wait (on an H200 host, 25 to 40 ms more before its first
    batch was read than the loads after it)."""
    try:
        get = kvikio.defaults.get
        task = min(get("task_size"), get("bounce_buffer_size"))
        size = get("num_threads") * task
        target = kvikio_writable(size, device)
        handle = _handle(kvikio, WARM_UP_SOURCE)
    except Exception:  # e.g. no /dev/zero, or a device that is gone
        return 0
    try:
        done = handle.pread(target, size, 0, task).get()
    except Exception:  # some of its tasks may still write: memory and handle are kept
        STRANDED.append((target, handle))
        return 0
    with contextlib.suppress(Exception):  # (the bytes are read)
        handle.close()
    return done


STRANDED: list[tuple[torch.Tensor, object]] = []
"""The target memory (a view, which keeps the whole staging buffer it is part of) and the
handles of kvikio reads that failed, kept for the process's life: kvikio reports the first
failed task of a read while the read's other tasks may still be writing into that memory
through that handle (kvikio 26.10's ``parallel_io`` gathers a read's tasks one after
another and stops at the first error), so freeing either could let them write into memory
reused since, or read another file opened under the same descriptor."""


def _warn(err: Exception) -> None:
    """Warn that kvikio cannot be used, and why."""
    try:
        warnings.warn(f"kvikio cannot be used ({type(err).__name__}: {err}): loading with "
                      "moekit's readers", stacklevel=3)
    except Exception:  # warnings made errors (-W error): no caller in this thread to tell
        pass


_THREAD_VARIABLES = ("KVIKIO_NTHREADS", "KVIKIO_NUM_THREADS")
"""The environment variables that set kvikio's thread count (the second is its alias)."""


def _configure(kvikio: ModuleType) -> None:
    """Give kvikio NATIVE_READERS threads, and tasks and bounce buffers of TASK_BYTES, each
    unless its environment variable says otherwise (or it is so already: setting the
    thread count restarts kvikio's threads)."""
    wanted = {"num_threads": (_THREAD_VARIABLES, NATIVE_READERS),
              "task_size": (("KVIKIO_TASK_SIZE",), TASK_BYTES),
              "bounce_buffer_size": (("KVIKIO_BOUNCE_BUFFER_SIZE",), TASK_BYTES)}
    for name, (variables, value) in wanted.items():
        if not any(v in os.environ for v in variables) and kvikio.defaults.get(name) != value:
            kvikio.defaults.set(name, value)


NATIVE = _Native()
"""The process's kvikio."""
os.register_at_fork(after_in_child=NATIVE.after_fork)
atexit.register(NATIVE.settle)


def native_reads(device: torch.device | str | None) -> bool:
    """Whether a load onto ``device`` reads through kvikio: a CUDA device, ``MOEKIT_KVIKIO``
    is not 0, and kvikio is loaded (``_Native.ready``: not waiting for it)."""
    return _wanted(device) and NATIVE.ready() is not None


def load_for_later(device: torch.device | str | None) -> None:
    """Once a load onto ``device`` is done with moekit's readers: start loading kvikio in
    the background, for the later loads (where they would read through it)."""
    if _wanted(device) and not NATIVE.forked:
        NATIVE.start(with_index(device))


def with_index(device: torch.device | str) -> torch.device:
    """``device`` with its index: a CUDA device named without one is the calling thread's
    current device, which another thread (whose current device is the first GPU) could
    not tell."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def prepare(device: torch.device) -> bool:
    """Start loading kvikio for the loads onto ``device`` (``load_for_later``) where they
    would read through it: it is installed, not switched off, and has not failed to load;
    whether that is so."""
    if not _wanted(device) or NATIVE.forked or not _installed():
        return False
    load_for_later(device)
    return not NATIVE.loaded.is_set() or NATIVE.module is not None


def _installed() -> bool:
    """Whether kvikio is imported or can be found (without importing it)."""
    try:
        return "kvikio" in sys.modules or importlib.util.find_spec("kvikio") is not None
    except (ImportError, ValueError):
        return False


def _wanted(device: torch.device | str | None) -> bool:
    """Whether loads onto ``device`` would read through kvikio, if it is loaded."""
    return (device is not None and torch.device(device).type == "cuda"
            and os.environ.get(SWITCH, "1").strip() != "0")


_OPENING = threading.Lock()
"""Held while a handle is opened: kvikio's compatibility mode is process-wide, and a handle
takes the mode set when it is opened."""


def _handle(kvikio: ModuleType, path: str) -> object:
    """A kvikio handle reading ``path``, in POSIX mode unless ``KVIKIO_COMPAT_MODE`` says."""
    if "KVIKIO_COMPAT_MODE" in os.environ:
        return kvikio.CuFile(path, "r")
    with _OPENING, kvikio.defaults.set("compat_mode", kvikio.CompatMode.ON):
        return kvikio.CuFile(path, "r")


class NativeFiles:
    """kvikio handles of a load's files and the reads queued on them. Each handle is opened
    through the descriptor ``files`` holds for its file (so it reads the file whose header
    moekit read, whatever has been renamed since) and checked to be that file."""

    def __init__(self, files: FileSource, names: set[str]) -> None:
        self.kvikio = NATIVE.get()
        self.pending: list[NativeRead] = []
        self.handles: dict[str, object] = {}
        # moekit's own descriptors first: where too few are left for kvikio's (two a file),
        # its open fails, and moekit's readers read with these
        descriptors = {name: files.descriptor(name) for name in sorted(names)}
        try:
            for name, fd in descriptors.items():
                self.handles[name] = self._opened(fd)
        except BaseException:
            self.close()
            raise

    def _opened(self, fd: int) -> object:
        """A kvikio handle (``_handle``) of the file open as ``fd``; OSError where it is
        not the same file."""
        path = f"/proc/self/fd/{fd}"
        handle = _handle(self.kvikio, path)
        ours, theirs = os.fstat(fd), os.fstat(handle.fileno())
        if (ours.st_dev, ours.st_ino) != (theirs.st_dev, theirs.st_ino):
            handle.close()
            raise OSError(f"{path} opened another file")
        return handle

    def read(self, name: str, target: torch.Tensor, start: int) -> "NativeRead":
        """Queue the read of ``target.numel()`` bytes at ``start`` of file ``name`` into the
        device tensor ``target`` (contiguous bytes)."""
        size = target.numel()
        pending = NativeRead(name, start, size, target)
        self.pending.append(pending)
        try:
            pending.future = self.handles[name].pread(target, size, start)
        except Exception as err:  # a read below kvikio's threshold runs here, and fails here
            pending.error = err
            pending.target = None
        return pending

    def drain(self) -> None:
        """Wait for every read queued (none may write into memory freed after the load);
        a read kvikio queued that failed keeps its memory and its file's handle
        (``STRANDED``)."""
        for pending in self.pending:
            pending.wait()
            if pending.error is not None and pending.future is not None:
                STRANDED.append((pending.target, self.handles.pop(pending.name, None)))
        self.pending.clear()

    def close(self) -> None:
        """Close every handle, each even where closing another failed (the first failure
        is raised once all are closed); closing again does nothing."""
        handles, self.handles = list(self.handles.values()), {}
        failed = None
        for handle in handles:
            try:
                handle.close()
            except Exception as err:  # kvikio reports a failed close as RuntimeError
                failed = failed or err
        if failed is not None:
            raise failed


class NativeRead:
    """One queued kvikio read: ``result`` waits for it (once) and refuses a short or failed
    read, naming the file. It holds its target memory until the read is done, and, where
    the read failed, for ``NativeFiles.drain`` to keep (``STRANDED``)."""

    __slots__ = ("name", "start", "size", "target", "future", "done", "error")

    def __init__(self, name: str, start: int, size: int, target: torch.Tensor) -> None:
        self.name, self.start, self.size, self.target = name, start, size, target
        self.future = None
        self.done: int | None = None
        self.error: BaseException | None = None

    def wait(self) -> None:
        """Wait for the read, keeping its byte count or its error."""
        if self.future is None or self.done is not None or self.error is not None:
            return
        try:
            self.done = self.future.get()
        except Exception as err:  # kvikio reports I/O errors as RuntimeError
            self.error = err
        else:
            self.target = None  # every task of the read is done with it

    def result(self) -> None:
        """None once the bytes are on the device; MoekitError naming the file otherwise."""
        self.wait()
        reason = None if self.error is None else _reason(self.error)
        if self.done != self.size and (reason is None or "EOF" in reason.split()):
            raise truncated(self.name, self.start + self.size)
        if reason is not None:
            raise unreadable(self.name, reason) from None


def _reason(error: Exception) -> str:
    """The cause kvikio's message for a failed read gives, without where in its sources
    it failed (``KvikIO failure at: FILE:LINE: POSIX error on pread: EOF`` says EOF)."""
    text = str(error).strip().split("\n")[0]
    return text.rsplit(": ", 1)[-1] or type(error).__name__
