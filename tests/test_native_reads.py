"""GPU loads through kvikio's native reader threads (``moekit.executors.native``).

Which loads read natively, and with what settings, is tested everywhere; the reads
themselves need a CUDA GPU and kvikio (``pip install kvikio-cu12`` or ``kvikio-cu13``).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import os
import subprocess
import sys
import threading
import warnings
from types import SimpleNamespace

import pytest
import torch

import moekit
from moekit import MoekitError
from moekit.executors import device, native
from moekit.executors.device import load_to_device
from moekit.planner import analyse_checkpoint, build_plan
from moekit.layouts import layout_named
from moekit.sources import FileSource

from .test_device_load import _reference, checksums

kvikio_reads = pytest.mark.skipif(
    not torch.cuda.is_available() or native.NATIVE.get() is None,
    reason="needs a CUDA GPU and kvikio")


@pytest.mark.parametrize("cpus, processes, threads", [
    (1, 1, 1), (2, 1, 2), (16, 1, 16), (32, 1, 16), (128, 1, 16), (32, 2, 16), (64, 8, 8),
    (16, 8, 2), (16, 3, 5), (4, 8, 1)])
def test_kvikio_reads_with_a_process_share_of_the_cores_at_most_16(cpus, processes, threads):
    assert native.native_reader_count(cpus, processes) == threads


@pytest.fixture
def kvikio_loads(monkeypatch) -> None:
    """kvikio counts as loaded (whether or not it is installed here)."""
    monkeypatch.setattr(native.NATIVE, "ready", lambda: sys)  # a loaded module
    monkeypatch.delenv(native.SWITCH, raising=False)


@pytest.mark.parametrize("switch, expected", [(None, True), ("1", True), ("0", False),
                                               (" 0 ", False)])
def test_gpu_loads_read_natively_unless_switched_off(switch, expected, kvikio_loads,
                                                     monkeypatch):
    if switch is not None:
        monkeypatch.setenv(native.SWITCH, switch)
    assert native.native_reads("cuda") is expected
    assert native.native_reads(torch.device("cuda", 0)) is expected
    assert not native.native_reads("cpu") and not native.native_reads(None)


def test_a_gpu_load_that_reads_natively_starts_none_of_moekits_readers(kvikio_loads,
                                                                       monkeypatch):
    monkeypatch.setattr(device, "READER_POOLS", device.ReaderPool())
    monkeypatch.setattr(device, "PinnedBuffers", lambda: pytest.fail("pinned moekit's buffers"))
    device.start_readers("cuda")
    assert device.pin_ahead("cuda") is None
    assert not device.READER_POOLS._free


def test_kvikio_is_loaded_in_the_background_once_a_load_is_done(monkeypatch):
    # Loading kvikio beside a process's first load slows that load down more than kvikio's
    # reads would speed it up: the first load reads with moekit's readers, and kvikio is
    # loaded after it, for the later loads.
    monkeypatch.delenv(native.SWITCH, raising=False)
    monkeypatch.setattr(native, "NATIVE", native._Native())
    loading, loaded = threading.Event(), threading.Event()
    monkeypatch.setattr(native, "_loaded", lambda: loading.set() or loaded.wait(30) and sys)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert not native.native_reads("cuda") and native.NATIVE.thread is None
    native.load_for_later("cpu")
    monkeypatch.setenv(native.SWITCH, "0")
    native.load_for_later("cuda")
    assert native.NATIVE.thread is None
    monkeypatch.delenv(native.SWITCH)
    native.load_for_later("cuda")
    assert loading.wait(30) and not native.native_reads("cuda")  # loading, not waited for
    loaded.set()
    assert native.NATIVE.get() is sys and native.native_reads("cuda")


@pytest.fixture
def warm_ups(monkeypatch) -> list[tuple]:
    """kvikio loads (as ``sys``) in a fresh ``NATIVE``; each warm-up is recorded as (module,
    device, whether loads read natively meanwhile)."""
    monkeypatch.delenv(native.SWITCH, raising=False)
    monkeypatch.setattr(native, "NATIVE", native._Native())
    monkeypatch.setattr(native, "_loaded", lambda: sys)
    monkeypatch.delitem(sys.modules, "kvikio", raising=False)  # (not the program's own)
    warmed: list[tuple] = []
    monkeypatch.setattr(native, "_warm_up", lambda module, device: warmed.append(
        (module, device, native.native_reads(device))))
    return warmed


@pytest.mark.parametrize("device, current, warmed_on", [
    (torch.device("cuda", 1), 0, torch.device("cuda", 1)),
    ("cuda", 2, torch.device("cuda", 2))])
def test_kvikio_is_warmed_up_on_the_loads_device_before_loads_read_through_it(
        device, current, warmed_on, warm_ups, monkeypatch):
    # kvikio sets its threads up for a device at their first reads: a read of zeros in the
    # background, before loads may read through kvikio, spares the first of them that. On
    # the device the load read to: the loading thread's current device is the first GPU.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    native.load_for_later(device)
    assert native.NATIVE.get() is sys
    assert warm_ups == [(sys, warmed_on, False)]


def test_a_programs_own_kvikio_is_not_warmed_up(warm_ups, monkeypatch):
    # Its settings (the compatibility mode the warm-up's handle is opened in) are the
    # program's to change at any time.
    monkeypatch.setitem(sys.modules, "kvikio", sys)
    native.load_for_later(torch.device("cuda", 0))
    assert native.NATIVE.get() is sys and not warm_ups


@pytest.fixture
def prepared(monkeypatch) -> list[torch.device]:
    """Fresh reader pools and prepared buffers; pinning makes tiny buffers, and the devices
    the pinning threads make current are recorded."""
    monkeypatch.setattr(device, "READER_POOLS", device.ReaderPool())
    monkeypatch.setattr(device, "PAGE_LOCKED", device.PageLockedPool())
    monkeypatch.setattr(device, "_PREPARED", [])
    monkeypatch.setattr(device, "_page_locked", lambda size: torch.empty(1, dtype=torch.uint8))
    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    return current


def test_prepared_loads_have_kvikio_loaded_and_warmed_up_on_their_device(
        warm_ups, prepared, monkeypatch):
    # A training job sets up for seconds before its first load: kvikio's loading, done
    # meanwhile, is not the first load's to wait for, and that load reads through it.
    monkeypatch.setattr(native, "_installed", lambda: True)
    monkeypatch.setattr(device, "PinnedBuffers", lambda **kw: pytest.fail("pinned buffers"))
    device.prepare_loads(torch.device("cuda", 1))
    assert native.NATIVE.get() is sys and native.native_reads("cuda")
    assert warm_ups == [(sys, torch.device("cuda", 1), False)]
    assert not device.READER_POOLS._free and not device._PREPARED


@pytest.mark.parametrize("kvikio", ["missing", "failed to load", "switched off"])
def test_prepared_loads_without_kvikio_have_moekits_readers_started_and_pinned(
        kvikio, prepared, monkeypatch):
    monkeypatch.setattr(native, "NATIVE", native._Native())
    monkeypatch.setattr(native, "_installed", lambda: kvikio != "missing")
    monkeypatch.delenv(native.SWITCH, raising=False)
    if kvikio == "failed to load":
        monkeypatch.setattr(native, "_loaded", lambda: None)
        native.NATIVE.start()
        assert native.NATIVE.get() is None
    elif kvikio == "switched off":
        monkeypatch.setenv(native.SWITCH, "0")
    on = torch.device("cuda", 1)
    device.prepare_loads(on)
    assert device.READER_POOLS._free.get(device.READERS)
    [ahead] = device._PREPARED
    device.prepare_loads(on)  # pins nothing more
    assert device._PREPARED == [ahead]
    # The next load's, whatever its GPU: the buffers are page-locked for every device.
    assert device.pin_ahead("cuda:0") is ahead and not device._PREPARED
    later = device.pin_ahead("cuda:0")
    assert later is not ahead
    assert ahead.take() is not None
    ahead.join(), later.join()
    assert prepared == [on, torch.device("cuda", 0)]
    assert native.NATIVE.thread is None or kvikio == "failed to load"


def test_prepare_loads_checks_its_device_and_prepares_nothing_for_the_cpu(prepared,
                                                                          monkeypatch):
    monkeypatch.setattr(native, "NATIVE", native._Native())
    moekit.prepare_loads("cpu")
    assert native.NATIVE.thread is None and not device.READER_POOLS._free
    if not torch.cuda.is_available():
        with pytest.raises(MoekitError, match="'cuda:7' is not on this machine"):
            moekit.prepare_loads("cuda:7")


class _FakeKvikio:
    """What ``native`` uses of kvikio: its settings, and handles whose reads fill the target
    with 7s (or whose futures raise ``fails``) and record (path, compatibility mode, target,
    size, offset, task size)."""

    class CompatMode:
        ON = "ON"

    def __init__(self, threads: int, task_size: int, bounce_buffer_size: int,
                 fails: Exception | None = None, at_once: bool = False) -> None:
        self.settings = {"num_threads": threads, "task_size": task_size,
                         "bounce_buffer_size": bounce_buffer_size, "compat_mode": None}
        self.reads: list[tuple] = []
        self.closed: list[str] = []
        self.fails = fails
        self.at_once = at_once  # a failing read raises when queued (kvikio then runs none)
        self.defaults = SimpleNamespace(get=self.settings.__getitem__, set=self._set)

    @contextlib.contextmanager
    def _set(self, name: str, value: object):
        saved, self.settings[name] = self.settings[name], value
        try:
            yield
        finally:
            self.settings[name] = saved

    def CuFile(self, path: str, mode: str) -> SimpleNamespace:
        mode_then = self.settings["compat_mode"]
        fd = os.open(path, os.O_RDONLY) if path.startswith("/proc/") else -1

        def pread(target: torch.Tensor, size: int, offset: int, task_size=None):
            self.reads.append((path, mode_then, target, size, offset, task_size))
            if self.fails is not None and self.at_once:
                raise self.fails
            if self.fails is not None:
                return SimpleNamespace(get=lambda: (_ for _ in ()).throw(self.fails))
            target[:size].fill_(7)
            return SimpleNamespace(get=lambda: size)

        def close() -> None:
            self.closed.append(path)
            if fd >= 0:
                os.close(fd)

        return SimpleNamespace(pread=pread, close=close, fileno=lambda: fd)


@pytest.fixture
def stranded(monkeypatch) -> list:
    """``native.STRANDED``, empty for the test."""
    monkeypatch.setattr(native, "STRANDED", [])
    return native.STRANDED


def test_the_warm_up_reads_a_task_a_thread_from_dev_zero_in_posix_mode(monkeypatch,
                                                                       stranded):
    monkeypatch.delenv("KVIKIO_COMPAT_MODE", raising=False)
    fake = _FakeKvikio(threads=3, task_size=8192, bounce_buffer_size=4096)
    assert native._warm_up(fake, torch.device("cpu")) == 3 * 4096
    [(path, mode, target, size, offset, task)] = fake.reads
    assert (path, mode, size, offset, task) == ("/dev/zero", "ON", 3 * 4096, 0, 4096)
    assert target.device.type == "cpu" and target.numel() == size and bool((target == 7).all())
    assert fake.closed == ["/dev/zero"] and not stranded


def test_a_warm_up_that_cannot_open_reads_nothing(monkeypatch, stranded):
    fake = _FakeKvikio(threads=2, task_size=4096, bounce_buffer_size=4096)
    monkeypatch.setattr(fake, "CuFile", lambda path, mode: (_ for _ in ()).throw(
        RuntimeError(f"cannot open {path}")))
    assert native._warm_up(fake, torch.device("cpu")) == 0 and not stranded


def test_a_warm_up_read_that_fails_keeps_its_memory_and_handle(stranded):
    # kvikio reports a read's first failed task while its other tasks may still write.
    fake = _FakeKvikio(threads=2, task_size=4096, bounce_buffer_size=4096,
                       fails=RuntimeError("KvikIO failure at: x.hpp:1: POSIX error: EIO"))
    assert native._warm_up(fake, torch.device("cpu")) == 0
    [(target, handle)] = stranded
    assert target is fake.reads[0][2] and not fake.closed


@pytest.mark.parametrize("fails, at_once", [
    (None, False), (RuntimeError("KvikIO failure at: a.hpp:9: EIO"), False),
    (RuntimeError("KvikIO failure at: a.hpp:9: EIO"), True)],
    ids=["read", "failed", "failed when queued"])
def test_a_failed_native_read_keeps_its_memory_and_its_files_handle(fails, at_once, qwen3,
                                                                    stranded, monkeypatch):
    # A read kvikio queued that fails may still have tasks writing: its memory (the staging
    # buffer it is a view of) and its file's handle outlive the load. A read done, or one
    # that failed before any task was queued, holds neither.
    fake = _FakeKvikio(threads=2, task_size=4096, bounce_buffer_size=4096, fails=fails,
                       at_once=at_once)
    monkeypatch.setattr(native.NATIVE, "get", lambda: fake)
    checkpoint, _ = _plan(qwen3)
    names = sorted({info.file for info in checkpoint.tensors.values()})
    with FileSource(checkpoint) as source:
        files = native.NativeFiles(source, set(names))
        target = torch.empty(64, dtype=torch.uint8)
        pending = files.read(names[0], target, 0)
        if fails is None:  # as the device executor does: each read's result, then drain
            assert pending.result() is None
        else:
            with pytest.raises(MoekitError, match="EIO"):
                pending.result()
        files.drain()
        files.close()
    if fails is None or at_once:
        assert pending.target is None and not stranded and len(fake.closed) == len(names)
    else:
        [(kept, handle)] = stranded
        assert kept is target and len(fake.closed) == len(names) - 1
        handle.close()  # (the fake's descriptor)


class _Refused(importlib.abc.MetaPathFinder):
    """Makes ``import kvikio`` raise ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "kvikio":
            raise self.error
        return None


@pytest.fixture
def refused_import(monkeypatch):
    """Make ``import kvikio`` raise the error given to the returned function."""
    for name in [m for m in sys.modules if m.split(".")[0] == "kvikio"]:
        monkeypatch.delitem(sys.modules, name)

    def refuse(error: Exception) -> None:
        monkeypatch.setattr(sys, "meta_path", [_Refused(error), *sys.meta_path])

    return refuse


def test_kvikio_not_installed_reads_with_moekits_readers_quietly(refused_import, recwarn):
    refused_import(ModuleNotFoundError("No module named 'kvikio'", name="kvikio"))
    assert native._loaded() is None
    assert not recwarn.list


@pytest.mark.parametrize("error", [OSError("libcufile.so.0: cannot open shared object file"),
                                   ModuleNotFoundError("No module named 'cuda'", name="cuda"),
                                   RuntimeError("libkvikio.so: undefined symbol")])
def test_kvikio_that_cannot_load_is_a_warning_and_moekits_readers_read(error, refused_import):
    refused_import(error)
    with pytest.warns(UserWarning, match=r"kvikio cannot be used .*: loading with moekit's "
                                         r"readers"):
        assert native._loaded() is None


def test_a_warning_made_an_error_does_not_escape_the_loading_thread(refused_import):
    refused_import(OSError("libcufile.so.0: cannot open shared object file"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native._loaded() is None


def test_a_forked_child_reads_with_moekits_readers(monkeypatch):
    # kvikio's threads are not copied into a child: a read queued there would never run.
    monkeypatch.setattr(native.NATIVE, "thread", threading.current_thread())
    monkeypatch.setattr(native.NATIVE, "loaded", threading.Event())
    monkeypatch.setattr(native.NATIVE, "module", sys)  # a loaded module
    native.NATIVE.loaded.set()
    child = os.fork()
    if child == 0:
        os._exit(0 if native.NATIVE.get() is None else 1)
    assert os.waitpid(child, 0)[1] == 0
    assert native.NATIVE.get() is sys


def test_a_child_of_a_process_that_never_loaded_kvikio_may_load_it(monkeypatch):
    monkeypatch.setattr(native, "NATIVE", native._Native())
    monkeypatch.setattr(native, "_loaded", lambda: sys)
    child = os.fork()
    if child == 0:
        native.NATIVE.after_fork()  # (the hook registered at import runs for the real one)
        os._exit(0 if native.NATIVE.get() is sys else 1)
    assert os.waitpid(child, 0)[1] == 0


@pytest.mark.parametrize("message, expected", [
    ("KvikIO failure at: /a/posix_io.hpp:173: POSIX error on pread: EOF", "truncated"),
    ("KvikIO failure at: /a/posix_io.hpp:90: pread(O_DIRECT): unexpected EOF within the "
     "requested range", "truncated"),
    ("KvikIO failure at: /a/posix_io.hpp:173: POSIX error on pread: EIO", "cannot read f: EIO"),
    ("KvikIO failure at: /a/posix_io.hpp:12: POSIX error: Bad file descriptor",
     "cannot read f: Bad file descriptor"),
    ("CUDA error at: /a/b.cpp:7: CUDA_ERROR_ILLEGAL_ADDRESS", "cannot read f: CUDA_ERROR_")])
def test_a_failed_native_read_is_one_message_naming_the_file(message, expected):
    pending = native.NativeRead("f", 0, 10, torch.empty(10, dtype=torch.uint8))
    pending.error = RuntimeError(message)
    with pytest.raises(MoekitError) as raised:
        pending.result()
    assert expected in str(raised.value) and "KvikIO" not in str(raised.value)
    assert "posix_io" not in str(raised.value)


def _plan(path):
    checkpoint, analysis = analyse_checkpoint(path)
    return checkpoint, build_plan(analysis, layout_named("nemo"))


@kvikio_reads
def test_cuda_warm_up_reads_a_bounce_buffer_of_zeros_for_each_kvikio_thread():
    kvikio = native.NATIVE.get()
    get = kvikio.defaults.get
    task = min(get("task_size"), get("bounce_buffer_size"))
    assert native._warm_up(kvikio, torch.device("cuda")) == get("num_threads") * task > 0


@kvikio_reads
def test_cuda_load_reads_through_kvikio(family_checkpoints, monkeypatch):
    read, used = native.NativeFiles.read, []
    monkeypatch.setattr(native.NativeFiles, "read", lambda self, *args: used.append(
        args[0]) or read(self, *args))
    monkeypatch.setattr(device, "READER_POOLS", device.ReaderPool())
    path = family_checkpoints["qwen3_moe"]
    assert checksums(moekit.load(path, "nemo", device="cuda")) == checksums(
        moekit.load(path, "nemo"))
    assert used and not device.READER_POOLS._free  # none of moekit's readers ran


@kvikio_reads
def test_cuda_load_reads_with_moekits_readers_where_kvikio_cannot_open_a_file(
        family_checkpoints, monkeypatch):
    def cannot(self, fd):
        raise RuntimeError("KvikIO failure: cannot open")

    monkeypatch.setattr(native.NativeFiles, "_opened", cannot)
    monkeypatch.setattr(device, "READER_POOLS", device.ReaderPool())
    checkpoint, plan = _plan(family_checkpoints["qwen3_moe"])
    staged = load_to_device(plan, checkpoint, "cuda", readers=3, native=True)
    assert checksums(staged) == checksums(_reference(checkpoint, plan))
    assert device.READER_POOLS._free.get(3)  # moekit's readers read


@kvikio_reads
def test_cuda_native_read_past_a_file_truncated_once_opened_names_it(family_checkpoints,
                                                                     tmp_path):
    import shutil

    path = shutil.copytree(family_checkpoints["qwen3_moe"], tmp_path / "copy")
    checkpoint, _ = _plan(path)
    name = checkpoint.files[0]
    size = checkpoint.identities[name].size
    target = torch.empty(4096, dtype=torch.uint8, device="cuda")
    with FileSource(checkpoint) as files:
        handles = native.NativeFiles(files, {name})
        try:
            os.truncate(path / name, size - 100)
            pending = handles.read(name, target, size - 4096)
            with pytest.raises(MoekitError, match=rf"{name} ends before byte {size}: the file "
                                                  "is truncated"):
                pending.result()
        finally:
            handles.drain()
            handles.close()


@kvikio_reads
def test_cuda_native_handles_read_the_file_moekit_opened(family_checkpoints, tmp_path):
    import shutil

    path = shutil.copytree(family_checkpoints["qwen3_moe"], tmp_path / "copy")
    checkpoint, _ = _plan(path)
    name = checkpoint.files[0]
    expected = (path / name).read_bytes()[:4096]
    target = torch.empty(4096, dtype=torch.uint8, device="cuda")
    with FileSource(checkpoint) as files:
        handles = native.NativeFiles(files, {name})
        os.rename(path / name, tmp_path / "moved")
        (path / name).write_bytes(b"\0" * len(expected))  # another file under the old name
        try:
            handles.read(name, target, 0).result()
        finally:
            handles.close()
    assert bytes(target.cpu().numpy()) == expected


@kvikio_reads
@pytest.mark.parametrize("variables, imported, threads, task, bounce", [
    ({}, False, native.NATIVE_READERS, native.TASK_BYTES, native.TASK_BYTES),
    ({"KVIKIO_NTHREADS": "3"}, False, 3, native.TASK_BYTES, native.TASK_BYTES),
    ({"KVIKIO_NUM_THREADS": "3"}, False, 3, native.TASK_BYTES, native.TASK_BYTES),
    ({"KVIKIO_TASK_SIZE": str(2**20)}, False, native.NATIVE_READERS, 2**20, native.TASK_BYTES),
    ({"KVIKIO_BOUNCE_BUFFER_SIZE": str(2**20)}, False, native.NATIVE_READERS,
     native.TASK_BYTES, 2**20),
    # the program's own kvikio keeps its settings (kvikio 26.10's defaults): one thread,
    ({}, True, 1, 4 * 2**20, 16 * 2**20),
    ({"KVIKIO_NTHREADS": "3"}, True, 3, 4 * 2**20, 16 * 2**20)])  # which moekit does not read with
def test_kvikio_settings_are_moekits_unless_its_variables_or_the_program_say(
        variables, imported, threads, task, bounce, family_checkpoints):
    script = (f"{'import kvikio; ' if imported else ''}"
              "import moekit, sys; from moekit.executors.native import NATIVE, native_reads; "
              "assert NATIVE.thread is None; moekit.load(sys.argv[1], device='cuda'); "
              "assert NATIVE.thread is not None; NATIVE.get(); import kvikio.defaults as d; "
              "print(d.get('num_threads'), d.get('task_size'), d.get('bounce_buffer_size'), "
              "native_reads('cuda'))")
    assert _run(script, family_checkpoints, variables).stdout.split() == [
        str(threads), str(task), str(bounce), str(threads > 1)]


@kvikio_reads
def test_kvikio_refusing_its_variables_is_a_warning_and_moekits_readers_read(
        family_checkpoints):
    script = ("import moekit, sys; from moekit.executors.native import NATIVE; "
              "first = moekit.load(sys.argv[1], device='cuda'); "
              "assert NATIVE.get() is None; again = moekit.load(sys.argv[1], device='cuda'); "
              "assert all(first[k].equal(again[k]) for k in first); print('read')")
    result = _run(script, family_checkpoints, {"KVIKIO_TASK_SIZE": "0"})
    assert result.stdout.split() == ["read"]
    assert "kvikio cannot be used" in result.stderr and "Traceback" not in result.stderr


def _run(script: str, family_checkpoints, variables: dict[str, str]
         ) -> subprocess.CompletedProcess:
    """``script`` run by a fresh Python with a checkpoint's path as its argument, with
    ``variables`` as the only ``KVIKIO_`` ones set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVIKIO_")}
    return subprocess.run([sys.executable, "-c", script, str(family_checkpoints["qwen3_moe"])],
                          env={**env, **variables}, capture_output=True, text=True,
                          check=True)
