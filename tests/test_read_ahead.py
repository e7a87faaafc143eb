"""Reading a checkpoint's first bytes while its load is planned (``moekit.executors.ahead``).

What is read ahead, and how the device executor's batches use it, is tested everywhere
with a kvikio stand-in that reads the files' bytes into host memory; a load through kvikio
onto a CUDA GPU is tested where there is one (``test_native_reads``'s marker)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import moekit
from moekit import MoekitError
from moekit.checkpoint import INDEX_NAME, TensorInfo
from moekit.executors import ahead as ahead_module
from moekit.executors import device, native
from moekit.executors.ahead import (PIECE_BYTES, ReadAhead, Span, cached_prefix, spanned,
                                   spans_of)
from moekit.executors.device import load_to_device
from moekit.layouts import layout_named
from moekit.plan import nbytes
from moekit.planner import analyse_checkpoint, build_plan

from .conftest import load_all
from .test_device_load import _assert_same, _reference
from .test_native_reads import kvikio_reads


def _checkpoint(entries: list[tuple[str, str, int, int]], sizes: dict[str, int],
                chunks: tuple = (), made: dict | None = None) -> SimpleNamespace:
    """What ``spans_of`` reads of a checkpoint: its header entries (name, file, offset,
    bytes), the last one with ``chunks``, its files' sizes and the tensors it ``made``."""
    tensors = {key: TensorInfo(key, file, (size,), "U8", offset, ())
               for key, file, offset, size in entries}
    last = entries[-1][0]
    tensors[last] = tensors[last]._replace(chunks=chunks)
    return SimpleNamespace(tensors=tensors, made=made or {}, identities={
        name: SimpleNamespace(size=size) for name, size in sizes.items()})


A, B = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


@pytest.mark.parametrize("budget, expected", [
    (1000, [Span(B, 100, 130, 0), Span(A, 50, 55, 30)]),
    (35, [Span(B, 100, 130, 0), Span(A, 50, 55, 30)]),
    (32, [Span(B, 100, 130, 0), Span(A, 50, 52, 30)]),
    (10, [Span(B, 100, 110, 0)])])
def test_what_is_read_ahead_is_each_files_data_section_in_the_order_of_the_tensors(
        budget, expected):
    checkpoint = _checkpoint([("a", B, 100, 10), ("b", B, 110, 20), ("c", A, 50, 5)],
                             {A: 55, B: 130})
    assert spans_of(checkpoint, budget) == expected


def test_nothing_is_read_ahead_of_dcp_files_nor_of_tensors_made_or_in_row_chunks():
    dcp = _checkpoint([("a", "__0_0.distcp", 0, 10)], {"__0_0.distcp": 40})
    assert spans_of(dcp, 1000) == []
    chunk = TensorInfo("c/rows_0", A, (5,), "U8", 50, ())
    chunked = _checkpoint([("a", B, 100, 10), ("c", A, 50, 5)], {A: 55, B: 110}, (chunk,))
    assert spans_of(chunked, 1000) == []
    made = _checkpoint([("a", B, 100, 10)], {B: 110}, made={"w": "a recipe"})
    assert spans_of(made, 1000) == []
    assert spans_of(_checkpoint([("a", B, 100, 10)], {}), 1000) == []


def _ahead(spans: list[Span]) -> ReadAhead:
    return ReadAhead(SimpleNamespace(), SimpleNamespace(), torch.empty(0), spans)


@pytest.mark.parametrize("start, size, expected", [
    (0, 10, [(0, 10, None)]),  # before every span
    (100, 20, [(100, 20, 0)]),  # inside the first
    (90, 20, [(90, 10, None), (100, 10, 0)]),  # across its start
    (140, 40, [(140, 10, 40), (150, 10, None), (160, 20, 50)]),  # across a gap
    (170, 40, [(170, 10, 60), (180, 30, None)]),  # across the end of the last
])
def test_segments_split_a_read_into_what_the_buffer_holds_and_what_it_does_not(
        start, size, expected):
    ahead = _ahead([Span("f", 100, 150, 0), Span("g", 100, 150, 50), Span("f", 160, 180, 50)])
    assert ahead.segments("f", start, size) == expected
    assert ahead.holds("f", start, size) == any(at is not None for _, _, at in expected)
    assert ahead.segments("h", start, size) == [(start, size, None)]


class _ReadingKvikio:
    """What ``native`` uses of kvikio, reading the files' bytes into the target when a read
    is waited for (kvikio's reads run on its threads: the bytes are there only then), or
    failing then for reads of ``failing`` offsets. Records (path, offset, size) of every
    read, of every read waited for, and the paths of the handles closed."""

    class CompatMode:
        ON = "ON"

    def __init__(self, failing: set[int] = frozenset()) -> None:
        self.defaults = SimpleNamespace(set=lambda *a: contextlib.nullcontext())
        self.failing = failing
        self.reads: list[tuple[str, int, int]] = []
        self.waited: list[tuple[str, int, int]] = []
        self.closed: list[str] = []

    def CuFile(self, path: str, mode: str) -> SimpleNamespace:  # noqa: N802 (kvikio's name)
        fd = os.open(path, os.O_RDONLY)

        def pread(target: torch.Tensor, size: int, offset: int) -> SimpleNamespace:
            read = (os.readlink(path), offset, size)
            self.reads.append(read)

            def get() -> int:
                self.waited.append(read)
                if offset in self.failing:
                    raise RuntimeError("KvikIO failure at: posix.hpp:9: POSIX error: EIO")
                target[:size].copy_(torch.frombuffer(bytearray(os.pread(fd, size, offset)),
                                                     dtype=torch.uint8))
                return size

            return SimpleNamespace(get=get)

        def close() -> None:
            self.closed.append(path)
            os.close(fd)

        return SimpleNamespace(pread=pread, close=close, fileno=lambda: fd)


def _wrap_handles(kvikio: _ReadingKvikio, monkeypatch, method: str, wrap) -> None:
    """Give every handle ``kvikio`` opens ``wrap(its method)`` as its ``method``."""
    opened = kvikio.CuFile

    def wrapped(path: str, mode: str) -> SimpleNamespace:
        handle = opened(path, mode)
        setattr(handle, method, wrap(getattr(handle, method)))
        return handle

    monkeypatch.setattr(kvikio, "CuFile", wrapped)


@pytest.fixture
def reading_kvikio(monkeypatch) -> _ReadingKvikio:
    monkeypatch.delenv("KVIKIO_COMPAT_MODE", raising=False)
    monkeypatch.setattr(native, "STRANDED", [])
    fake = _ReadingKvikio()
    monkeypatch.setattr(native.NATIVE, "get", lambda: fake)
    return fake


@pytest.fixture
def sharded(family_checkpoints, tmp_path) -> Path:
    """The Qwen3-MoE sample in three files with an index, the last named first by it
    (as a Hub index that lists ``lm_head.weight`` first does)."""
    tensors = load_all(family_checkpoints["qwen3_moe"])
    names = sorted(tensors)
    folder = tmp_path / "sharded"
    folder.mkdir()
    files = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    thirds = [names[i::3] for i in range(3)]
    weight_map = {name: files[2] for name in thirds[2]}
    for file, keys in zip(files, thirds):
        save_file({key: tensors[key] for key in keys}, folder / file, {"format": "pt"})
        weight_map.update({key: file for key in keys})
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = family_checkpoints["qwen3_moe"] / "config.json"
    (folder / "config.json").write_bytes(config.read_bytes())
    return folder


def _plan(path: Path):
    checkpoint, analysis = analyse_checkpoint(path)
    return checkpoint, build_plan(analysis, layout_named("nemo"))


@pytest.mark.parametrize("share", [0, 0.01, 0.5, 2], ids=["1 byte", "1%", "half", "all"])
def test_a_load_copies_what_was_read_ahead_and_reads_only_the_rest(share, sharded,
                                                                   reading_kvikio):
    checkpoint, plan = _plan(sharded)
    stored = sum(nbytes(info.shape, info.dtype) for info in checkpoint.tensors.values())
    budget = max(1, int(share * stored))
    spans = spans_of(checkpoint, budget)
    assert spans[0].file.startswith("model-00003") and len(spans) <= 3  # one span a file
    if share in (0, 2):
        assert len(spans) == {0: 1, 2: 3}[share]
    ahead = ReadAhead.start(checkpoint, torch.device("cpu"), spans)
    read_ahead = list(reading_kvikio.reads)
    found = load_to_device(plan, checkpoint, torch.device("cpu"), ahead=ahead,
                           batch_bytes=4096, chunk_bytes=4096)
    _assert_same(found, _reference(checkpoint, plan))
    held = {(os.path.basename(path), offset, size) for path, offset, size in read_ahead}
    for path, offset, size in reading_kvikio.reads[len(read_ahead):]:
        assert not ahead.holds(os.path.basename(path), offset, size), (path, offset, size)
    assert sum(size for _, _, size in held) == min(budget, stored)
    assert ahead.buffer is None and not ahead.files._fds
    assert len(reading_kvikio.closed) == 3 and set(reading_kvikio.waited) == set(
        reading_kvikio.reads)


def test_a_failed_read_ahead_fails_the_load_naming_its_file_and_keeps_its_memory(
        sharded, reading_kvikio):
    checkpoint, plan = _plan(sharded)
    spans = spans_of(checkpoint, 2**40)
    reading_kvikio.failing = {spans[0].start}
    ahead = ReadAhead.start(checkpoint, torch.device("cpu"), spans)
    buffer = ahead.buffer.data_ptr()
    with pytest.raises(MoekitError, match=f"cannot read {spans[0].file}: EIO"):
        load_to_device(plan, checkpoint, torch.device("cpu"), ahead=ahead)
    [(kept, handle)] = native.STRANDED  # kvikio's other tasks of the read may still write
    assert kept.data_ptr() == buffer and handle is not None
    assert not ahead.files._fds and ahead.buffer is None


def test_reads_ahead_that_no_load_takes_are_waited_for_and_their_files_closed(
        sharded, reading_kvikio):
    checkpoint, _ = _plan(sharded)
    ahead = ReadAhead.start(checkpoint, torch.device("cpu"), spans_of(checkpoint, 2**40))
    ahead.close()
    assert set(reading_kvikio.waited) == set(reading_kvikio.reads)
    assert len(reading_kvikio.closed) == 3 and not ahead.files._fds and ahead.buffer is None
    ahead.close()  # closing again does nothing
    assert len(reading_kvikio.closed) == 3


def _descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_file_changed_before_it_is_read_ahead_is_refused_and_nothing_stays_open(
        sharded, reading_kvikio):
    checkpoint, _ = _plan(sharded)
    changed = sorted(checkpoint.identities)[-1]
    os.utime(sharded / changed, ns=(1, 1))
    before = _descriptors()
    with pytest.raises(MoekitError, match=changed):
        ReadAhead.start(checkpoint, torch.device("cpu"), spans_of(checkpoint))
    assert _descriptors() <= before and not reading_kvikio.reads


def test_no_memory_for_what_would_be_read_ahead_reads_nothing_ahead(sharded, reading_kvikio,
                                                                     monkeypatch):
    checkpoint, _ = _plan(sharded)

    def no_memory(size, on):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(ahead_module, "kvikio_writable", no_memory)
    before = _descriptors()
    assert ReadAhead.start(checkpoint, torch.device("cpu"), spans_of(checkpoint)) is None
    assert _descriptors() <= before and len(reading_kvikio.closed) == 3
    assert not reading_kvikio.reads


def test_an_interrupt_while_reads_are_queued_waits_for_them_and_closes_the_files(
        sharded, reading_kvikio, monkeypatch):
    checkpoint, _ = _plan(sharded)
    _wrap_handles(reading_kvikio, monkeypatch, "pread", lambda read: lambda *args: os.kill(
        os.getpid(), signal.SIGINT) or read(*args))
    before = _descriptors()
    with pytest.raises(KeyboardInterrupt):
        ReadAhead.start(checkpoint, torch.device("cpu"), spans_of(checkpoint))
    assert reading_kvikio.reads and set(reading_kvikio.waited) == set(reading_kvikio.reads)
    assert _descriptors() <= before and len(reading_kvikio.closed) == 3


def test_closing_what_a_failed_load_took_waits_for_its_reads_and_closes_its_files(
        sharded, reading_kvikio, monkeypatch):
    checkpoint, plan = _plan(sharded)
    ahead = ReadAhead.start(checkpoint, torch.device("cpu"), spans_of(checkpoint))

    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(device, "_Reader", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        load_to_device(plan, checkpoint, torch.device("cpu"), ahead=ahead)
    ahead.close()  # as moekit.load does, whatever happened
    assert set(reading_kvikio.waited) == set(reading_kvikio.reads)
    assert not ahead.files._fds and len(reading_kvikio.closed) == 3


def test_nothing_is_read_ahead_where_kvikio_cannot_open_a_file(sharded, reading_kvikio,
                                                               monkeypatch):
    checkpoint, _ = _plan(sharded)
    monkeypatch.setattr(reading_kvikio, "CuFile", lambda path, mode: (_ for _ in ()).throw(
        RuntimeError("cannot open")))
    before = _descriptors()
    assert ReadAhead.start(checkpoint, torch.device("cpu"), spans_of(checkpoint)) is None
    assert _descriptors() <= before


@pytest.mark.parametrize("kvikio_reads_it, room, started", [
    (True, 0, True), (True, -1, False), (False, 0, False)],
    ids=["room", "one byte short", "kvikio does not read it"])
def test_a_gpu_load_reads_ahead_where_kvikio_reads_it_and_the_gpu_has_room_for_all(
        kvikio_reads_it, room, started, sharded, monkeypatch):
    checkpoint, _ = _plan(sharded)
    spans = spans_of(checkpoint)
    needed = (sum(identity.size for identity in checkpoint.identities.values())
              + spanned(spans) + device.SLOTS * device.BATCH_BYTES)
    monkeypatch.setattr(device, "native_reads", lambda on: kvikio_reads_it)
    monkeypatch.setattr(device, "with_index", lambda on: torch.device("cuda", 0))
    monkeypatch.setattr(device, "_free_bytes", lambda on: needed + room)
    monkeypatch.setattr(ReadAhead, "start", classmethod(lambda cls, *args: args))
    assert device.read_ahead(checkpoint, "cuda") == (
        (checkpoint, torch.device("cuda", 0), spans) if started else None)
    assert device.read_ahead(checkpoint, None) is None
    assert device.read_ahead(checkpoint, "cpu") is None


@kvikio_reads
def test_cuda_loads_read_ahead_through_kvikio_and_equal_the_cpu_path(sharded):
    checkpoint, plan = _plan(sharded)
    ahead = device.read_ahead(checkpoint, "cuda")
    assert ahead is not None and ahead.buffer.device.type == "cuda"
    found = device.load_to_device(plan, checkpoint, "cuda", ahead=ahead)
    assert ahead.buffer is None and not ahead.files._fds
    _assert_same(found, _reference(checkpoint, plan))


@kvikio_reads
def test_a_cuda_load_without_room_for_what_was_read_ahead_drops_it_and_loads(
        sharded, monkeypatch):
    checkpoint, plan = _plan(sharded)
    ahead = device.read_ahead(checkpoint, "cuda")
    checked = []
    check = device._check_room

    def first_refused(*args):
        checked.append(ahead.buffer is None)
        if len(checked) == 1:
            raise MoekitError("no room")
        check(*args)

    monkeypatch.setattr(device, "_check_room", first_refused)
    found = device.load_to_device(plan, checkpoint, "cuda", ahead=ahead)
    assert checked == [False, True] and not ahead.files._fds
    _assert_same(found, _reference(checkpoint, plan))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_memory_read_ahead_is_written_only_once_the_callers_queued_work_is_done(
        sharded, reading_kvikio, monkeypatch):
    # kvikio writes on streams of its own; a block the caller freed while its work on it
    # was still queued goes straight back to the caller's stream, where the buffer is
    # allocated: written at once, it would be overwritten by that work (or spoil it).
    side, opened = torch.cuda.Stream(), reading_kvikio.CuFile

    def on_a_stream_of_its_own(path, mode):
        handle = opened(path, mode)
        fd = handle.fileno()

        def pread(target, size, offset):
            host = torch.frombuffer(bytearray(os.pread(fd, size, offset)), dtype=torch.uint8)
            with torch.cuda.stream(side):
                target[:size].copy_(host.pin_memory(), non_blocking=True)
            side.synchronize()
            return SimpleNamespace(get=lambda: size)

        handle.pread = pread
        return handle

    monkeypatch.setattr(reading_kvikio, "CuFile", on_a_stream_of_its_own)
    checkpoint, plan = _plan(sharded)
    spans = spans_of(checkpoint)
    freed = torch.empty(spanned(spans), dtype=torch.uint8, device="cuda")
    freed.fill_(1)  # its kernel loaded now (loading one waits for the whole GPU)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # the caller's queued work ...
    freed.fill_(0xAB)  # ... that writes the memory, freed next
    del freed
    found = load_to_device(plan, checkpoint, "cuda", ahead=ReadAhead.start(
        checkpoint, torch.device("cuda", torch.cuda.current_device()), spans))
    _assert_same(found, _reference(checkpoint, plan))


def test_a_handle_that_fails_to_close_leaves_the_files_closed_and_the_buffer_dropped(
        sharded, reading_kvikio, monkeypatch):
    checkpoint, _ = _plan(sharded)
    _wrap_handles(reading_kvikio, monkeypatch, "close", lambda close: lambda: close() or (
        _ for _ in ()).throw(RuntimeError("deregister")))
    before = _descriptors()
    ahead = ReadAhead.start(checkpoint, torch.device("cpu"), spans_of(checkpoint))
    with pytest.raises(RuntimeError, match="deregister"):
        ahead.close()
    assert not ahead.files._fds and ahead.buffer is None and _descriptors() <= before


def test_a_load_whose_read_ahead_fails_to_close_still_joins_its_pinning(sharded, monkeypatch):
    joined = []

    def interrupted() -> None:
        raise KeyboardInterrupt  # as deferred_signals raises one held while it closed

    monkeypatch.setattr(device, "pin_ahead", lambda on: SimpleNamespace(
        join=lambda: joined.append(on)))
    monkeypatch.setattr(device, "read_ahead", lambda checkpoint, on: SimpleNamespace(
        close=interrupted))
    monkeypatch.setattr(device, "read_plan", lambda *args, **kwargs: {})
    with pytest.raises(KeyboardInterrupt):
        moekit.load(sharded, "nemo", device="cpu")
    assert joined == ["cpu"]


@pytest.mark.parametrize("uncached, expected", [
    (None, [Span(B, 100, 100 + 3 * PIECE_BYTES, 0), Span(A, 0, 50, 3 * PIECE_BYTES)]),
    ((A, 0), [Span(B, 100, 100 + 3 * PIECE_BYTES, 0)]),
    ((B, 2 * PIECE_BYTES - 1), [Span(B, 100, PIECE_BYTES, 0)]),  # a piece's last byte
    ((B, 100), [])])
def test_only_what_the_page_cache_holds_is_read_ahead_up_to_the_first_piece_it_lacks(
        uncached, expected, monkeypatch):
    spans = [Span(B, 100, 100 + 3 * PIECE_BYTES, 0), Span(A, 0, 50, 3 * PIECE_BYTES)]
    monkeypatch.setattr(ahead_module, "_cached", lambda fd, offset: (fd, offset) != uncached)
    assert cached_prefix(spans, SimpleNamespace(descriptor=lambda name: name)) == expected


def test_a_file_out_of_the_page_cache_is_not_read_ahead(sharded, reading_kvikio):
    checkpoint, _ = _plan(sharded)
    spans = spans_of(checkpoint)
    second = sharded / spans[1].file
    fd = os.open(second, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if ahead_module._cached(fd, spans[1].start):
            pytest.skip("this file system keeps the file in memory")
    finally:
        os.close(fd)
    ahead = ReadAhead.start(checkpoint, torch.device("cpu"), spans)
    try:
        assert list(ahead.by_file) == [spans[0].file] and ahead.buffer.numel() == spanned(
            spans[:1])
    finally:
        ahead.close()
