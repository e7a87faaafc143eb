"""The device executor (reader threads -> staging buffer -> recipes on the device).

On CI (no GPU) it runs with the CPU device, which exercises the same byte ranges,
chunking, staging slots and recipe evaluation; the CUDA tests run where a GPU is present
and check that the GPU path gives bit-identical tensors.
"""

from __future__ import annotations

import errno
import json
import gc
import itertools
import math
import mmap
import os
import random
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import moekit
from moekit import MoekitError, convert
from moekit.planner import analyse_checkpoint
from moekit.executors import device
from moekit.executors.device import load_to_device
from moekit.executors import evaluate
from moekit.executors.evaluate import fill, stacked_regions
from moekit.executors.memory import run_plan
from moekit.executors.native import NATIVE
from moekit.layouts import layout_named
from moekit.plan import DequantizeMXFP4, Read
from moekit.planner import build_plan
from moekit.sources import FileSource

from .conftest import digest, load_all
from .test_input_trust import checkpoint, moe_tensors

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def moekit_readers(monkeypatch):
    """GPU loads read with moekit's readers, also where kvikio is installed."""
    monkeypatch.setenv("MOEKIT_KVIKIO", "0")


def _reads(native: bool) -> bool:
    """``native``, skipping the test where kvikio cannot read (once it is loaded)."""
    if native and NATIVE.get() is None:
        pytest.skip("needs kvikio")
    return native


def _plan(path, layout, experts=None):
    checkpoint, analysis = analyse_checkpoint(path)
    return checkpoint, build_plan(analysis, layout_named(layout), experts=experts)


def _reference(checkpoint, plan):
    with FileSource(checkpoint) as source:
        return run_plan(plan, source)


def _assert_same(found: dict, expected: dict) -> None:
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert found[key].dtype == value.dtype and torch.equal(found[key].cpu(), value), key


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "deepseek_v3", "phimoe"])
@pytest.mark.parametrize("layout", ["nemo", "transformers", "vllm", "hf"])
def test_staged_loading_equals_the_file_executor(family, layout, family_checkpoints):
    checkpoint, plan = _plan(family_checkpoints[family], layout)
    # Tiny chunks, batches and three readers: tensors are split across threads, chunks
    # and batches, and staging buffers are released and allocated again.
    staged = load_to_device(plan, checkpoint, "cpu", readers=3, chunk_bytes=1000,
                            batch_bytes=5000)
    _assert_same(staged, _reference(checkpoint, plan))


def test_staged_loading_reads_grouped_sources_and_expert_ranges(family_checkpoints, tmp_path):
    grouped = tmp_path / "nemo"
    moekit.convert(family_checkpoints["qwen3_moe"], grouped, "nemo", max_shard_size="40KB")
    for layout, experts in (("hf", None), ("vllm", range(2, 5)), ("nemo", range(5, 6))):
        checkpoint, plan = _plan(grouped, layout, experts)
        staged = load_to_device(plan, checkpoint, "cpu", readers=2, chunk_bytes=777,
                                batch_bytes=3000)
        _assert_same(staged, _reference(checkpoint, plan))


@pytest.mark.parametrize("layout", ["nemo", "transformers", "vllm"])
def test_experts_misaligned_in_their_shard_are_staged_one_by_one(layout, tmp_path):
    """An odd-sized byte tensor between two experts leaves the second expert's floats at
    byte offsets no float is aligned to, so its stacks (and their concatenated pieces)
    cannot be views of the staging buffer: they are copied part by part."""
    tensors = list(moe_tensors().items())  # embedding, router, expert 0, expert 1
    src = checkpoint(tmp_path / "model", dict(tensors[:5] + [("model.odd", ("U8", (3,)))]
                                              + tensors[5:]))
    checkpoint_, plan = _plan(src, layout)
    staged = load_to_device(plan, checkpoint_, "cpu", readers=2)
    _assert_same(staged, _reference(checkpoint_, plan))


def _joined(jobs: list[tuple[str, int, int, int]]) -> list[tuple[str, int, int, int]]:
    """Jobs that follow on in both the file and the staging buffer, joined."""
    out: list[tuple[str, int, int, int]] = []
    for file, start, offset, size in jobs:
        if out and out[-1][0] == file and out[-1][1] + out[-1][3] == start and \
                out[-1][2] + out[-1][3] == offset:
            out[-1] = (file, out[-1][1], out[-1][2], out[-1][3] + size)
        else:
            out.append((file, start, offset, size))
    return out


def test_the_last_reads_of_a_load_are_cut_so_that_the_readers_end_together():
    mib, readers, floor = 2**20, 4, 8 * 2**20
    runs = [[("a", 100, 0, 200 * mib), ("b", 0, 200 * mib + 256, 3 * mib)],
            [("b", 5 * mib, 0, 64 * mib)], [("c", 7, 0, 90 * mib + 3)]]
    batches = [device._Batch(i, [], {}, list(jobs), 0) for i, jobs in enumerate(runs)]
    for batch in batches:  # as _lay_out queues them: cut at CHUNK_BYTES
        batch.jobs = [(f, s + a, o + a, min(64 * mib, n - a)) for f, s, o, n in batch.jobs
                      for a in range(0, n, 64 * mib)]
    device._taper(batches, readers, floor)
    # The same bytes, to the same staging offsets, in the same order.
    assert [_joined(batch.jobs) for batch in batches] == runs
    pieces = [size for batch in batches for *_, size in batch.jobs]
    after = [sum(pieces[i + 1:]) for i in range(len(pieces))]
    assert all(size <= max(floor, rest // readers) for size, rest in zip(pieces, after))
    assert pieces[-readers:] == [2 * mib + 3, floor, floor, floor]
    assert max(pieces) == 64 * mib


def test_a_batch_of_empty_tensors_is_staged(tmp_path):
    tensors = {**moe_tensors(), "model.empty": ("F32", (0, 3))}  # read last, on its own
    checkpoint_, plan = _plan(checkpoint(tmp_path / "model", tensors), "nemo")
    staged = load_to_device(plan, checkpoint_, "cpu", readers=2, batch_bytes=1)
    _assert_same(staged, _reference(checkpoint_, plan))


def _stacked(base: torch.Tensor, starts: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """``stacked_regions``' pieces put together, each checked to sit where it says."""
    pieces = stacked_regions(base, starts, shape)
    assert [first for first, _ in pieces] == list(
        itertools.accumulate([len(piece) for _, piece in pieces[:-1]], initial=0))
    return torch.cat([piece for _, piece in pieces])


@pytest.mark.parametrize("starts, pieces", [
    ([3, 15, 27, 39], 1), ([3, 15, 40, 27], 3), ([5], 1), ([40, 3, 15, 27, 39], 2),
    (list(range(200, 0, -20)), 1)],
    ids=["even steps: a view", "uneven: a view a run", "one region", "runs after one",
         "falling: gathered"])
def test_regions_of_a_staging_buffer_stack_as_the_regions_do(starts, pieces):
    base = torch.arange(256, dtype=torch.int32)
    expected = torch.stack([base[s:s + 12].view(3, 4) for s in starts])
    assert torch.equal(_stacked(base, starts, (3, 4)), expected)
    assert len(stacked_regions(base, starts, (3, 4))) == pieces


def test_experts_in_name_order_are_copied_in_runs_and_a_shuffle_is_gathered():
    # safetensors files order a layer's experts by name: 0, 1, 10, 100, ..., 109, 11, ...
    region = 6
    for experts, runs in ((128, 15), (256, 29), (64, 9), (32, 6), (8, 1)):
        by_name = sorted(range(experts), key=str)
        starts = [by_name.index(e) * 3 * region for e in range(experts)]
        base = torch.arange(3 * region * experts, dtype=torch.int16)
        assert len(stacked_regions(base, starts, (2, 3))) == runs
        assert torch.equal(_stacked(base, starts, (2, 3)),
                           torch.stack([base[s:s + region].view(2, 3) for s in starts]))
    shuffled = random.Random(0).sample(range(128), 128)
    starts = [e * region for e in shuffled]
    base = torch.arange(region * 128, dtype=torch.int16)
    assert len(stacked_regions(base, starts, (2, 3))) == 1
    assert torch.equal(_stacked(base, starts, (2, 3)),
                       torch.stack([base[s:s + region].view(2, 3) for s in starts]))


def test_load_gives_the_grouped_state_dict(family_checkpoints):
    path = family_checkpoints["olmoe"]
    expected = moekit.convert_state_dict(load_all(path), "hf", "transformers", family="olmoe")
    _assert_same(moekit.load(path, "transformers"), expected)


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_staging_memory_is_bounded_by_the_slots(slots, family_checkpoints, monkeypatch):
    checkpoint, plan = _plan(family_checkpoints["qwen3_moe"], "nemo")
    live, most = [], []
    submit, finish = device._Reader._submit, device._Reader._finish

    def counted_submit(self, batch):
        live.append(batch.index)
        most.append(len(live))
        return submit(self, batch)

    def counted_finish(self, batch):
        out = finish(self, batch)
        assert batch.staging is None
        live.remove(batch.index)
        return out

    monkeypatch.setattr(device._Reader, "_submit", counted_submit)
    monkeypatch.setattr(device._Reader, "_finish", counted_finish)
    staged = load_to_device(plan, checkpoint, "cpu", readers=2, chunk_bytes=2000,
                            batch_bytes=1, slots=slots)
    assert len(most) > slots and max(most) == slots and not live
    _assert_same(staged, _reference(checkpoint, plan))


def test_a_load_that_cannot_fit_on_the_gpu_is_refused_before_reading(family_checkpoints,
                                                                       monkeypatch):
    checkpoint, plan = _plan(family_checkpoints["qwen3_moe"], "nemo")
    # Free memory is what the driver reports plus what PyTorch caches unused (1000 bytes).
    room = {"free": plan.total_bytes}  # the tensors fit, the staging does not
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (room["free"] - 1000, 0))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2000)
    monkeypatch.setattr(device, "_Reader", None)  # nothing may be read
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(MoekitError, match=r"loading onto cuda:0 needs about .* of staging and "
                                          r"building\) but .* is free there.*load_experts"):
        load_to_device(plan, checkpoint, "cuda")
    # The sample is one batch, staged once, and its largest tensor may be gathered whole.
    room["free"] = 2 * plan.total_bytes + max(t.nbytes for t in plan.tensors) + 1000
    batches = [device._lay_out(0, plan.tensors, checkpoint, device.CHUNK_BYTES)]
    device._check_room(plan, torch.device("cuda"), batches, device.SLOTS)
    room["free"] -= 2000
    with pytest.raises(MoekitError):
        device._check_room(plan, torch.device("cuda"), batches, device.SLOTS)


def test_a_truncated_shard_is_named(qwen3):
    shard = sorted(qwen3.glob("*.safetensors"))[-1]
    checkpoint, plan = _plan(qwen3, "nemo")
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(MoekitError, match=shard.name):
        load_to_device(plan, checkpoint, "cpu", readers=2, chunk_bytes=4096)


def test_a_shard_the_disk_cannot_read_is_named(qwen3, monkeypatch):
    """An I/O error in a reader thread (a failing disk, a network file system gone away)
    is refused naming the file, not raised as a bare OSError."""
    checkpoint, plan = _plan(qwen3, "nemo")

    def failing(fd, buffers, offset):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(device.os, "preadv", failing)
    with pytest.raises(MoekitError, match=r"cannot read .*model-.*\.safetensors.*Input/output"):
        load_to_device(plan, checkpoint, "cpu", readers=2, chunk_bytes=4096)


def _reading_threads(monkeypatch, fail_first: bool = False, seconds: float = 0.0
                     ) -> tuple[set, list]:
    """Record the threads that read and how many reads are running; with ``fail_first``
    the first read fails at once and every other one takes 0.2 s (else ``seconds``)."""
    threads, running, calls, lock = set(), [0], [0], threading.Lock()
    read_into = device._read_into

    def recorded(*args):
        with lock:
            threads.add(threading.get_ident())
            calls[0] += 1
            failing = fail_first and calls[0] == 1
            running[0] += 1
        try:
            if failing:
                raise MoekitError("the first read fails")
            time.sleep(0.2 if fail_first else seconds)
            read_into(*args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(device, "_read_into", recorded)
    return threads, running


def _reader_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("moekit-read")}


def test_later_loads_read_with_the_first_loads_threads(family_checkpoints, monkeypatch):
    checkpoint, plan = _plan(family_checkpoints["qwen3_moe"], "nemo")
    load_to_device(plan, checkpoint, "cpu", readers=5, chunk_bytes=1000)
    started = _reader_threads()
    threads, _ = _reading_threads(monkeypatch)
    _assert_same(load_to_device(plan, checkpoint, "cpu", readers=5, chunk_bytes=1000),
                 _reference(checkpoint, plan))
    assert not _reader_threads() - started  # no thread started
    assert threads and threads <= {t.ident for t in started}


@pytest.mark.parametrize("batch_bytes", [device.BATCH_BYTES, 5000])
def test_a_failed_load_returns_once_no_read_runs_and_its_threads_serve_the_next(
        batch_bytes, family_checkpoints, monkeypatch):
    # A read still running after the load has given up would write into a staging buffer
    # already freed, and the reader threads would be handed to the next load while busy.
    checkpoint, plan = _plan(family_checkpoints["qwen3_moe"], "nemo")
    load_to_device(plan, checkpoint, "cpu", readers=4, chunk_bytes=1000)
    started = _reader_threads()
    _, running = _reading_threads(monkeypatch, fail_first=True)
    with pytest.raises(MoekitError, match="the first read fails"):
        load_to_device(plan, checkpoint, "cpu", readers=4, chunk_bytes=1000,
                       batch_bytes=batch_bytes)
    assert running[0] == 0
    monkeypatch.undo()
    threads, _ = _reading_threads(monkeypatch)
    _assert_same(load_to_device(plan, checkpoint, "cpu", readers=4, chunk_bytes=1000),
                 _reference(checkpoint, plan))
    assert threads <= {t.ident for t in started} and not _reader_threads() - started


def test_a_load_cut_short_while_queueing_reads_returns_once_no_read_runs(family_checkpoints,
                                                                         monkeypatch):
    # A file that cannot be opened part-way through a batch's reads, and an interrupt in
    # the middle of queueing one read (after the pool took it, before the load noted it).
    checkpoint, plan = _plan(family_checkpoints["qwen3_moe"], "nemo")
    descriptor, calls = FileSource.descriptor, []

    def failing(self, file):
        calls.append(file)
        if len(calls) == 5:
            raise MoekitError("cannot open the fifth")
        return descriptor(self, file)

    _, running = _reading_threads(monkeypatch, fail_first=False, seconds=0.2)
    monkeypatch.setattr(FileSource, "descriptor", failing)
    with pytest.raises(MoekitError, match="cannot open the fifth"):
        load_to_device(plan, checkpoint, "cpu", readers=4, chunk_bytes=1000, batch_bytes=5000)
    assert running[0] == 0
    monkeypatch.setattr(FileSource, "descriptor", descriptor)

    adjust = ThreadPoolExecutor._adjust_thread_count

    def interrupted(self):
        time.sleep(0.01)  # an idle reader takes the read just queued
        raise KeyboardInterrupt

    monkeypatch.setattr(ThreadPoolExecutor, "_adjust_thread_count", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_to_device(plan, checkpoint, "cpu", readers=4, chunk_bytes=1000)
    monkeypatch.setattr(ThreadPoolExecutor, "_adjust_thread_count", adjust)
    assert running[0] == 0


def test_loads_at_once_take_a_pool_of_readers_each(family_checkpoints, monkeypatch):
    pools = device.ReaderPool()
    monkeypatch.setattr(device, "READER_POOLS", pools)
    first = pools.take(2)
    pools.give_back(2, first)
    again, other = pools.take(2), pools.take(2)
    assert again is first and other is not first
    pools.give_back(2, other)
    pools.give_back(2, again)  # one idle pool a reader count is kept; the other ends
    new = [pools.take(2), pools.take(2)]
    assert new[0] is other and new[1] not in (first, other)
    for pool in (first, *new):
        pool.shutdown(wait=True)
    checkpoint, plan = _plan(family_checkpoints["qwen3_moe"], "nemo")
    with ThreadPoolExecutor(2) as callers:
        loads = [callers.submit(load_to_device, plan, checkpoint, "cpu", readers=2,
                                chunk_bytes=1000) for _ in range(2)]
        expected = _reference(checkpoint, plan)
        for load in loads:
            _assert_same(load.result(), expected)


def test_a_reader_thread_that_cannot_start_leaves_none_of_its_pool_waiting(monkeypatch):
    start, starts, barriers = threading.Thread.start, [], []

    def failing(self):
        starts.append(self)
        if len(starts) == 3:
            raise RuntimeError("can't start new thread")
        start(self)

    class Recorded(threading.Barrier):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            barriers.append(self)

    before = set(threading.enumerate())
    monkeypatch.setattr(threading.Thread, "start", failing)
    monkeypatch.setattr(threading, "Barrier", Recorded)
    try:
        with pytest.raises(RuntimeError, match="can't start new thread"):
            device._started_pool(4)
    finally:
        monkeypatch.undo()
        started = [thread for thread in threading.enumerate() if thread not in before]
        for thread in started:
            thread.join(timeout=10)
        for barrier in barriers:  # free the threads should the pool have left them waiting
            barrier.abort()
    assert not any(thread.is_alive() for thread in started)


def test_keep_one_starts_a_pool_only_where_none_is_free(family_checkpoints, monkeypatch):
    monkeypatch.setattr(device, "READER_POOLS", device.ReaderPool())
    device.READER_POOLS.keep_one(7)
    started = _reader_threads()
    device.READER_POOLS.keep_one(7)
    checkpoint, plan = _plan(family_checkpoints["qwen3_moe"], "nemo")
    load_to_device(plan, checkpoint, "cpu", readers=7, chunk_bytes=1000)
    assert not _reader_threads() - started


def test_a_gpu_load_starts_its_reader_threads_before_it_pins(monkeypatch, moekit_readers):
    # Pinning holds the process's memory map, which starting a thread waits for.
    order = []
    started = device._started_pool
    monkeypatch.setattr(device, "READER_POOLS", device.ReaderPool())
    monkeypatch.setattr(device, "_started_pool", lambda n: order.append("threads") or started(n))
    monkeypatch.setattr(device, "PinnedBuffers", lambda device: order.append("pinning"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    device.pin_ahead("cuda")
    device.pin_ahead("cuda")
    assert order == ["threads", "pinning", "pinning"]


def test_a_gpu_load_pins_once_the_headers_are_read_and_its_readers_are_started(
        family_checkpoints, monkeypatch, moekit_readers):
    # Validating a header maps its file, which waits while pinning holds the memory map.
    import moekit.executors.memory as memory
    from moekit.checkpoint import Checkpoint

    order = []
    opened, started = Checkpoint.open.__func__, device._started_pool
    monkeypatch.setattr(device, "READER_POOLS", device.ReaderPool())
    monkeypatch.setattr(device, "_started_pool", lambda n: order.append("threads") or started(n))
    monkeypatch.setattr(Checkpoint, "open", classmethod(
        lambda cls, path, config: order.append("headers") or opened(cls, path, config)))
    monkeypatch.setattr(device, "PinnedBuffers", lambda device: order.append("pinning"))
    monkeypatch.setattr(memory, "checked_device", torch.device)  # a machine without a GPU
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(device, "read_plan", lambda *args, **kwargs: order.append("reading"))
    moekit.load(family_checkpoints["qwen3_moe"], device="cuda")
    assert order == ["threads", "headers", "pinning", "reading"]


def test_a_forked_child_takes_none_of_the_buffers_its_parent_prepared(monkeypatch):
    # Their pinning thread was not copied: a load waiting for them would wait forever.
    monkeypatch.setattr(device, "_PREPARED", [_Prepared()])
    child = os.fork()
    if child == 0:
        os._exit(0 if device._take_prepared(device.READERS, device.BUFFER_BYTES) is None
                 else 1)
    assert os.waitpid(child, 0)[1] == 0 and device._PREPARED


def test_a_forked_child_keeps_none_of_its_parents_reader_threads(family_checkpoints):
    checkpoint, plan = _plan(family_checkpoints["qwen3_moe"], "nemo")
    load_to_device(plan, checkpoint, "cpu", readers=3, chunk_bytes=1000)
    assert device.READER_POOLS._free.get(3)
    child = os.fork()
    if child == 0:  # the pools' threads were not copied: taking one would wait forever
        os._exit(0 if not device.READER_POOLS._free else 1)
    assert os.waitpid(child, 0)[1] == 0


@pytest.mark.parametrize("cpus, processes, readers", [
    (1, 1, 1), (2, 1, 1), (16, 1, 8), (20, 1, 10), (32, 1, 16), (128, 1, 16),
    (32, 2, 8), (128, 8, 8), (16, 8, 1), (16, 3, 2)])
def test_readers_are_half_a_process_share_of_the_cores_at_most_16(cpus, processes, readers):
    assert device.reader_count(cpus, processes) == readers


@pytest.mark.parametrize("affinity, readers", [(64, 4), (16, 8)])
def test_each_process_torchrun_starts_reads_with_its_share_of_the_cores(affinity, readers,
                                                                         tmp_path):
    # 8 processes on a 64-core machine: each may run on every core (they share them), or is
    # bound to 16 of its own (its share already).
    script = ("import os; os.cpu_count = lambda: 64; "
              f"os.sched_getaffinity = lambda pid: set(range({affinity})); "
              f"import moekit.cores as c; c.PROC_CGROUP = c.Path({str(tmp_path / 'none')!r}); "
              "from moekit.executors import device; print(device.READERS)")
    env = {**os.environ, "LOCAL_WORLD_SIZE": "8"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, check=True)
    assert result.stdout.split() == [str(readers)]


def checksums(state: dict) -> dict[str, str]:
    """sha256 of every tensor's bytes (computed on the host)."""
    return {k: digest(v) for k, v in state.items()}


@cuda
@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("layout", ["nemo", "transformers", "vllm"])
def test_cuda_loading_is_bit_identical_to_the_cpu(layout, native, family_checkpoints,
                                                  monkeypatch):
    monkeypatch.setenv("MOEKIT_KVIKIO", str(int(_reads(native))))
    for family in ("qwen3_moe", "deepseek_v3", "mixtral"):
        path = family_checkpoints[family]
        on_gpu = moekit.load(path, layout, device="cuda")
        assert all(t.device.type == "cuda" for t in on_gpu.values())
        assert checksums(on_gpu) == checksums(moekit.load(path, layout))


def saved_by_two_ranks(src: Path, out: Path, dim: int, least: int = 2) -> Path:
    """``src``'s tensors as two ranks save them with DCP's HuggingFaceStorageWriter (one
    safetensors file each, the chunks placed by DCP_SHARDING_INFO): each tensor of at
    least ``least`` dimensions split in halves along ``dim`` (rows as FSDP2 splits them,
    columns as tensor parallelism does), the others whole in the first file."""
    out.mkdir()
    files: list[dict] = [{}, {}]
    for key, value in load_all(src).items():
        if value.dim() < max(least, dim + 1):
            files[0][key] = (value, [0] * value.dim())
            continue
        half = value.shape[dim] // 2
        for rank, part in enumerate((value.narrow(dim, 0, half),
                                     value.narrow(dim, half, value.shape[dim] - half))):
            files[rank][key] = (part.contiguous(), [half * rank if d == dim else 0
                                                    for d in range(value.dim())])
    for rank, chunks in enumerate(files, 1):
        info = {key: {"saved_offsets": offsets} for key, (_, offsets) in chunks.items()}
        save_file({key: chunk for key, (chunk, _) in chunks.items()},
                  out / f"shard-{rank:05d}-model-00001-of-00001.safetensors",
                  metadata={"DCP_SHARDING_INFO": json.dumps(info)})
    (out / "config.json").write_bytes((src / "config.json").read_bytes())
    return out


@pytest.mark.parametrize("bias", [0.0, -0.0, 0.5])
def test_a_zeros_check_over_row_chunks_is_staged(bias, family_checkpoints, tmp_path):
    """torchtitan's expert_bias_E, which HF files have no place for and which is dropped
    only when all zero bits, saved by two ranks in row chunks like every other tensor: the
    device executor's staging checks it over its chunks and loads what the CPU path reads,
    or refuses a non-zero one naming it, as the CPU path does."""
    titan = tmp_path / "titan"
    convert(family_checkpoints["qwen3_moe"], titan, "torchtitan", format="safetensors")
    folder = saved_by_two_ranks(titan, tmp_path / "ranks", 0, least=1)
    key = "layers.1.moe.expert_bias_E"
    shard = next(folder.glob("shard-00002-*"))
    with safe_open(shard, framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = handle.metadata()
    tensors[key][0] = bias
    save_file(tensors, shard, metadata=metadata)
    checkpoint, analysis = analyse_checkpoint(folder, "torchtitan")
    plan = build_plan(analysis, layout_named("hf"))
    if bias == 0.0 and math.copysign(1, bias) > 0:
        staged = load_to_device(plan, checkpoint, "cpu", readers=2, chunk_bytes=1000)
        assert checksums(staged) == checksums(_reference(checkpoint, plan))
        return
    for load in (lambda: _reference(checkpoint, plan),
                 lambda: load_to_device(plan, checkpoint, "cpu", readers=2)):
        with pytest.raises(MoekitError, match=f"{key}.* holds non-zero values"):
            load()


@cuda
@pytest.mark.parametrize("dim", [0, 1], ids=["rows", "columns"])
def test_cuda_loading_of_tensors_saved_in_chunks_is_bit_identical(dim, family_checkpoints,
                                                                  tmp_path):
    """Tensors saved by ranks in row chunks (each chunk staged as a tensor of its own) or
    in column blocks (concatenated on the device) load onto the GPU as the source does."""
    src = family_checkpoints["qwen3_moe"]
    folder = saved_by_two_ranks(src, tmp_path / "ranks", dim)
    for layout in ("nemo", "transformers"):
        expected = checksums(moekit.load(src, layout))
        assert checksums(moekit.load(folder, layout)) == expected
        assert checksums(moekit.load(folder, layout, device="cuda")) == expected


@cuda
@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("slots", [1, 2, 3])
def test_cuda_staging_in_many_small_batches_is_bit_identical(slots, native,
                                                             family_checkpoints):
    # Tiny chunks, pinned buffers and batches: each chunk goes through both pinned buffers,
    # each reader stream copies into several staging buffers in turn and re-records its
    # events many times, and staging memory is reused on the GPU (kvikio's reads into it
    # wait for the evaluations that used it before).
    for family in ("qwen3_moe", "mixtral"):
        checkpoint, plan = _plan(family_checkpoints[family], "nemo")
        staged = load_to_device(plan, checkpoint, "cuda", readers=3, chunk_bytes=1000,
                                batch_bytes=5000, slots=slots, buffer_bytes=300,
                                native=_reads(native))
        assert checksums(staged) == checksums(_reference(checkpoint, plan))


@cuda
@pytest.mark.parametrize("slots", [1, 3])
def test_cuda_copy_kernels_are_loaded_once_the_first_batches_are_all_queued(
        slots, family_checkpoints, monkeypatch):
    # Loading a kernel takes tens of milliseconds: loaded between the first batch's reads
    # and the next batches', it would hold those back (their readers idle meanwhile).
    events, submit = [], device._Reader._submit
    monkeypatch.setattr(device._Reader, "_submit",
                        lambda self, batch: events.append("submit") or submit(self, batch))
    monkeypatch.setattr(device, "load_copy_kernels",
                        lambda where, dtypes: events.append("kernels"))
    checkpoint, plan = _plan(family_checkpoints["qwen3_moe"], "nemo")
    staged = load_to_device(plan, checkpoint, "cuda", batch_bytes=1, slots=slots)
    assert events.index("kernels") == slots < events.count("submit")
    assert checksums(staged) == checksums(_reference(checkpoint, plan))


@cuda
def test_cuda_gathers_are_queued_without_waiting_for_the_stream():
    # Hub files order experts by name, so most stacks are gathered: a gather that waited
    # for the stream would hold up the thread queueing the next batch behind every read.
    base = torch.arange(64, dtype=torch.int32, device="cuda")
    starts = [3, 15, 40, 27]
    torch.cuda.set_sync_debug_mode("error")
    try:
        stacked = _stacked(base, starts, (3, 4))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(stacked, torch.stack([base[s:s + 12].view(3, 4) for s in starts]))


@cuda
def test_cuda_mxfp4_dequantization_is_queued_without_waiting_and_equals_the_cpu():
    # GPT-OSS experts dequantized on the way to the GPU: its FP4 table, like a gather's
    # index, must not hold the queueing thread until the stream has caught up.
    generator = torch.Generator().manual_seed(0)
    tensors = {"blocks": torch.randint(0, 256, (6, 2, 16), dtype=torch.uint8, generator=generator),
               "scales": torch.randint(120, 134, (6, 2), dtype=torch.uint8, generator=generator)}
    recipe = DequantizeMXFP4(Read.whole("blocks", _Meta(tensors["blocks"])),
                             Read.whole("scales", _Meta(tensors["scales"])))
    on_gpu = {key: value.cuda() for key, value in tensors.items()}
    out = torch.empty(recipe.shape, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fill(recipe, out, _Tensors(on_gpu))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = torch.empty(recipe.shape, dtype=torch.bfloat16)
    fill(recipe, expected, _Tensors(tensors))
    assert torch.equal(out.cpu().view(torch.int16), expected.view(torch.int16))


class _Meta:
    """A tensor's shape and dtype as a plan reads them (``TensorMeta``)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.shape = tuple(tensor.shape)
        self.dtype = {torch.uint8: "U8"}[tensor.dtype]


class _Tensors:
    """A source serving whole reads from a dict of tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def read(self, region: Read) -> torch.Tensor:
        return self.tensors[region.key]


@cuda
def test_cuda_readers_given_buffers_pinned_ahead_load_the_same_bytes(family_checkpoints):
    checkpoint, plan = _plan(family_checkpoints["qwen3_moe"], "nemo")
    pinned = device.PinnedBuffers(pairs=3, buffer_bytes=300)
    staged = load_to_device(plan, checkpoint, "cuda", readers=3, chunk_bytes=1000,
                            buffer_bytes=300, pinned=pinned, native=False)
    pinned.join()
    assert checksums(staged) == checksums(_reference(checkpoint, plan))


@cuda
def test_cuda_readers_read_on_their_first_buffer_until_their_second_is_pinned(
        family_checkpoints, monkeypatch):
    # The seconds are pinned only once the readers have read through their firsts alone;
    # then each reader takes its second mid-load and alternates between the two.
    checkpoint, plan = _plan(family_checkpoints["qwen3_moe"], "nemo")
    reads, alone = [0], threading.Event()
    read_into, page_locked = device._read_into, device._page_locked

    def counted(*args):
        read_into(*args)
        reads[0] += 1
        if reads[0] == 12:
            alone.set()

    def pin(size):
        if len(made) == 3:
            assert alone.wait(30)
        made.append(page_locked(size))
        return made[-1]

    made, seconds = [], []
    monkeypatch.setattr(device, "PAGE_LOCKED", device.PageLockedPool())
    monkeypatch.setattr(device, "_page_locked", pin)
    monkeypatch.setattr(device, "_read_into", counted)
    pinned = device.PinnedBuffers(pairs=3, buffer_bytes=300)
    take_second = pinned.take_second

    def taken_second():
        second = take_second()
        if second is not None:
            seconds.append(second)
        return second

    monkeypatch.setattr(pinned, "take_second", taken_second)
    staged = load_to_device(plan, checkpoint, "cuda", readers=3, chunk_bytes=1000,
                            buffer_bytes=300, pinned=pinned, native=False)
    pinned.join()
    assert checksums(staged) == checksums(_reference(checkpoint, plan))
    assert seconds  # taken mid-load, after 12 reads through the firsts alone


@pytest.mark.parametrize("fails_at", [0, 1, 3])
def test_a_pinning_error_reaches_every_reader_that_takes_a_buffer_after_it(fails_at,
                                                                          monkeypatch):
    made = []

    def pin(size):
        if len(made) == fails_at:  # a first buffer (0, 1) or a second one (3)
            raise RuntimeError("cannot pin memory")
        made.append(torch.empty(size, dtype=torch.uint8))
        return made[-1]

    monkeypatch.setattr(device, "PAGE_LOCKED", device.PageLockedPool())
    monkeypatch.setattr(device, "_page_locked", pin)
    pinned = device.PinnedBuffers(pairs=2, buffer_bytes=64)
    pinned.join()
    for take in (pinned.take, pinned.take_second) * 2:
        with pytest.raises(RuntimeError, match="cannot pin memory"):
            take()


def test_every_readers_first_buffer_is_pinned_before_any_second(monkeypatch):
    made, second_pinned = [], threading.Event()

    def pin(size):
        if len(made) == 3:
            assert second_pinned.wait(10)
        made.append(torch.empty(size, dtype=torch.uint8))
        return made[-1]

    pool = device.PageLockedPool()
    monkeypatch.setattr(device, "PAGE_LOCKED", pool)
    monkeypatch.setattr(device, "_page_locked", pin)
    pinned = device.PinnedBuffers(pairs=3, buffer_bytes=64)
    assert [id(pinned.take()) for _ in range(3)] == [id(buffer) for buffer in made[:3]]
    assert pinned.take_second() is None and len(made) == 3
    second_pinned.set()
    pinned.join()  # gives the seconds no reader took to the pool
    assert {id(pool.take(64)) for _ in range(3)} == {id(buffer) for buffer in made[3:]}
    assert len(made) == 6


@pytest.mark.parametrize("named, current, expected", [
    ("cuda", 2, torch.device("cuda", 2)), (torch.device("cuda", 1), 0, torch.device("cuda", 1))])
def test_buffers_pinned_ahead_are_pinned_with_the_loads_device_current(
        named, current, expected, monkeypatch, moekit_readers):
    # Registering memory makes a context on the thread's current device where it has none:
    # a new thread's is the first GPU, where a load onto another would leave a context.
    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(
        (torch.device(d), threading.current_thread().name)))
    monkeypatch.setattr(device, "READER_POOLS", device.ReaderPool())
    monkeypatch.setattr(device, "PAGE_LOCKED", device.PageLockedPool())
    monkeypatch.setattr(device, "_PREPARED", [])
    monkeypatch.setattr(device, "_page_locked", lambda size: calls.append(
        threading.current_thread().name) or torch.empty(1, dtype=torch.uint8))
    device.pin_ahead(named).join()
    assert calls == [(expected, "moekit-pin")] + ["moekit-pin"] * (2 * device.READERS)


class _Stop(Exception):
    """Raised by a stand-in for ``_Reader`` once it has seen what a load gives it."""


class _Prepared:
    """A stand-in for the buffers ``prepare_loads`` pins, recording its join."""

    pairs, buffer_bytes = device.READERS, device.BUFFER_BYTES

    def __init__(self) -> None:
        self.joined = False

    def join(self) -> None:
        self.joined = True


def test_a_cuda_load_takes_the_callers_current_device_and_the_buffers_prepared_for_it(
        family_checkpoints, monkeypatch):
    # Named "cuda", the load is onto the caller's current device (GPU 1 here): the reader
    # threads, whose current device is another, make their streams on the one resolved,
    # and a load that was given no buffers (load_experts, load_sharded) takes those
    # prepare_loads pinned for that device, and joins them.
    seen = []

    def reader(checkpoint, on, readers, slots, buffer_bytes, pinned, native, ahead):
        seen.append((on, pinned))
        raise _Stop

    ours = _Prepared()
    monkeypatch.setattr(device, "_PREPARED", [ours])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(device, "_check_room", lambda *args: None)
    monkeypatch.setattr(device, "_Reader", reader)
    checkpoint, plan = _plan(family_checkpoints["qwen3_moe"], "nemo")
    with pytest.raises(_Stop):  # readers of other buffers leave them to another load
        load_to_device(plan, checkpoint, "cuda", native=False, buffer_bytes=2**20)
    assert seen == [(torch.device("cuda", 1), None)] and device._PREPARED == [ours]
    with pytest.raises(_Stop):
        load_to_device(plan, checkpoint, "cuda", native=False)
    assert seen[1] == (torch.device("cuda", 1), ours) and ours.joined
    assert not device._PREPARED


def test_a_reader_makes_its_stream_and_so_its_device_current_before_it_pins(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda d: calls.append(("stream", d)) or "s")
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: calls.append(("current", s)))
    monkeypatch.setattr(torch.cuda, "Event", lambda: None)
    monkeypatch.setattr(device, "PAGE_LOCKED", device.PageLockedPool())
    monkeypatch.setattr(device, "_page_locked", lambda size: calls.append(("pin", size)) or
                        torch.empty(size, dtype=torch.uint8))
    on = torch.device("cuda", 1)
    reader = types.SimpleNamespace(local=threading.local(), pinned=None, buffer_bytes=64,
                                   handed=[], device=on)
    device._Reader._local(reader)
    assert calls == [("stream", on), ("current", "s"), ("pin", 64), ("pin", 64)]


def test_page_locked_buffers_given_back_are_taken_again_by_size(monkeypatch):
    made = []
    monkeypatch.setattr(device, "_page_locked",
                        lambda size: made.append(torch.empty(size, dtype=torch.uint8)) or made[-1])
    pool = device.PageLockedPool()
    first, other = pool.take(64), pool.take(128)
    pool.give_back([first, other])
    assert pool.take(64) is first and pool.take(128) is other
    assert pool.take(64) is not first and len(made) == 3


class Registers:
    """A CUDA runtime that registers any memory."""

    @staticmethod
    def cudaHostRegister(pointer, size, flags):  # noqa: N802 (CUDA's name)
        return 0


LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's /proc")
THP = pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").is_dir(),
                         reason="a kernel with transparent huge pages")


def vma_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds ``address``."""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = line.split()[0]
        if "-" in span and all(c in "0123456789abcdef-" for c in span):
            first, end = (int(x, 16) for x in span.split("-"))
            inside = first <= address < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return []


@LINUX
@THP
@pytest.mark.parametrize("spare", [0, 3, 4])
def test_buffers_are_of_huge_pages_only_where_the_kernel_has_them_to_spare(spare, monkeypatch):
    monkeypatch.setattr(torch.cuda, "cudart", lambda: Registers)
    monkeypatch.setattr(device, "_spare_huge_pages", lambda: spare)
    size = 4 * device.HUGE_PAGE
    buffer = device._page_locked(size)
    buffer.fill_(7)
    assert buffer.numel() == size and int(buffer.sum()) == 7 * size
    huge = spare >= 4
    assert ("hg" in vma_flags(buffer.data_ptr())) == huge
    if huge:
        assert buffer.data_ptr() % device.HUGE_PAGE == 0


@LINUX
def test_a_kernel_that_refuses_huge_pages_gives_a_buffer_of_small_pages(monkeypatch):
    class Refusing(mmap.mmap):
        def madvise(self, *args):
            raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Registers)
    monkeypatch.setattr(device, "_spare_huge_pages", lambda: 10**6)
    monkeypatch.setattr(mmap, "mmap", Refusing)
    size = 2 * device.HUGE_PAGE
    buffer = device._page_locked(size)
    assert buffer.numel() == size and "hg" not in vma_flags(buffer.data_ptr())


@LINUX
def test_spare_huge_pages_are_the_free_blocks_of_two_mib_and_more_of_the_poorest_node(
        tmp_path, monkeypatch):
    monkeypatch.setattr(mmap, "PAGESIZE", 4096)  # as on x86-64 (AArch64 may have 64 KiB)
    buddyinfo = tmp_path / "buddyinfo"
    buddyinfo.write_text(
        "Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3\n"
        "Node 0, zone    DMA32    357    403    408    364    298    201    109     66     39     35    695\n"
        "Node 0, zone   Normal  21327  24125  26885  26913  19594  13022   7555   3596   2024   1157   1915\n"
        "Node 1, zone   Normal      5      1      0      0      0      0      0      0      0    900    300\n"
        "Node 1, zone  Movable      5      1      0      0      0      0      0      0      0      4      1\n")
    # Order 9 blocks are 2 MiB, order 10 blocks 4 MiB; DMA and DMA32 are not counted.
    poorest = min(1157 + 1915 * 2, 900 + 300 * 2 + 4 + 1 * 2)
    assert device._spare_huge_pages(str(buddyinfo)) == poorest - device.SPARE_HUGE_PAGES
    assert device._spare_huge_pages(str(tmp_path / "absent")) == 0
    for malformed in ("Node 0, zone Normal 0 0 0 0 0 0 0 0 0 x 1\n", "Node 0,\n"):
        buddyinfo.write_text(malformed)
        assert device._spare_huge_pages(str(buddyinfo)) == 0
    monkeypatch.setattr(mmap, "PAGESIZE", 65536)
    assert device._spare_huge_pages("/proc/buddyinfo") == 0


@pytest.mark.parametrize("runtime", ["refuses", "lacks the call"])
def test_memory_cuda_cannot_register_is_pinned_by_pytorch_instead(runtime, monkeypatch):
    class Runtime:
        @staticmethod
        def cudaHostRegister(pointer, size, flags):  # noqa: N802 (CUDA's name)
            if runtime == "lacks the call":
                raise AttributeError("cudaHostRegister")
            return 1  # cudaErrorInvalidValue

    pinned = []
    empty = torch.empty
    monkeypatch.setattr(torch.cuda, "cudart", lambda: Runtime)
    monkeypatch.setattr(torch, "empty", lambda size, dtype, pin_memory: pinned.append(
        size) or empty(size, dtype=dtype))
    assert device._page_locked(4096).numel() == 4096 and pinned == [4096]


@cuda
def test_cuda_a_load_after_prepare_loads_reads_through_the_buffers_it_pinned(
        family_checkpoints, monkeypatch, moekit_readers):
    path = family_checkpoints["qwen3_moe"]
    monkeypatch.setattr(device, "_PREPARED", [])
    moekit.prepare_loads("cuda")
    assert device._PREPARED
    loaded = moekit.load(path, "nemo", device="cuda")
    assert not device._PREPARED
    assert checksums(loaded) == checksums(moekit.load(path, "nemo"))


@cuda
def test_cuda_later_loads_pin_nothing_and_their_buffers_are_page_locked(
        family_checkpoints, monkeypatch, moekit_readers):
    path = family_checkpoints["qwen3_moe"]
    first = moekit.load(path, "nemo", device="cuda")
    pinned = []
    monkeypatch.setattr(device, "_page_locked", lambda size: pinned.append(size))
    again = moekit.load(path, "nemo", device="cuda")
    assert pinned == [] and checksums(again) == checksums(first)
    buffers = device.PAGE_LOCKED.take(device.BUFFER_BYTES)
    assert buffers.is_pinned()
    device.PAGE_LOCKED.give_back([buffers])


@cuda
def test_cuda_state_dict_conversion_is_built_on_the_gpu(family_checkpoints):
    hf = load_all(family_checkpoints["qwen3_moe"])
    on_gpu = moekit.convert_state_dict({k: v.cuda() for k, v in hf.items()}, "hf", "nemo")
    assert all(t.device.type == "cuda" for t in on_gpu.values())
    assert checksums(on_gpu) == checksums(moekit.convert_state_dict(hf, "hf", "nemo"))
    back = moekit.ExpertAdapter("nemo").to_hf(on_gpu)
    assert checksums(back) == checksums(hf)


@cuda
def test_load_experts_onto_the_gpu_equals_the_cpu_rows(family_checkpoints, tmp_path):
    import torch.multiprocessing as mp

    from . import ep_workers

    src = family_checkpoints["qwen3_moe"]
    result = str(tmp_path / "result")
    mp.spawn(ep_workers.cuda_load, args=(1, str(tmp_path / "store"), str(src), result),
             nprocs=1, join=True)
    found = torch.load(f"{result}.0")
    assert found["devices"] == {"cuda"}
    assert found["sums"] == checksums(moekit.load(src, "nemo"))


def test_loads_run_without_gc_pauses_and_restore_the_collector(family_checkpoints,
                                                                monkeypatch):
    during = []
    read_plan = device.read_plan
    monkeypatch.setattr(device, "read_plan", lambda *args, **kwargs: during.append(
        gc.isenabled()) or read_plan(*args, **kwargs))
    assert gc.isenabled()
    moekit.load(family_checkpoints["qwen2_moe"], "nemo")
    assert during == [False] and gc.isenabled()
    gc.disable()
    try:
        moekit.load(family_checkpoints["qwen2_moe"], "nemo")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_gil_switch_interval_is_restored_after_a_load(family_checkpoints):
    checkpoint, plan = _plan(family_checkpoints["qwen2_moe"], "nemo")
    before = sys.getswitchinterval()
    load_to_device(plan, checkpoint, "cpu", readers=2)
    assert sys.getswitchinterval() == before


def test_overlapping_loads_restore_the_switch_interval_and_collector_when_the_last_ends():
    """Two loads in two threads, the first ending while the second still runs: the
    second keeps the changed settings, and the originals come back when it ends."""
    from moekit.gc_pauses import COLLECTOR_OFF

    before = sys.getswitchinterval()
    first_in, second_in, first_out = (threading.Event() for _ in range(3))
    seen = []

    def first() -> None:
        with COLLECTOR_OFF.scope(), device.PROMPT_HANDOFFS.scope():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second() -> None:
        first_in.wait(5)
        with COLLECTOR_OFF.scope(), device.PROMPT_HANDOFFS.scope():
            second_in.set()
            first_out.wait(5)
            seen.append((gc.isenabled(), sys.getswitchinterval()))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == [(False, pytest.approx(min(before, device.SWITCH_INTERVAL)))]
    assert gc.isenabled() and sys.getswitchinterval() == before


class _Buffer:
    """A LocatingSource whose read keys are element offsets into one flat buffer."""

    def __init__(self, base: torch.Tensor) -> None:
        self.base = base

    def read(self, region: Read) -> torch.Tensor:
        start = int(region.key)
        return self.base[start:start + math.prod(region.shape)].view(region.shape)

    def locate(self, regions: list[Read]) -> tuple[torch.Tensor, list[int], tuple[int, ...]]:
        return self.base, [int(region.key) for region in regions], regions[0].shape


@pytest.mark.parametrize("starts", [[0, 6, 12], [12, 0, 6, 18, 30, 24, 42, 36, 48]],
                         ids=["one run", "runs"])
def test_a_stack_that_does_not_fit_its_place_is_refused_naming_its_tensor(starts):
    base = torch.arange(64, dtype=torch.int16)
    parts = tuple(Read(str(start), (), (2, 3), "I16") for start in starts)
    fits = torch.empty((len(starts), 2, 3), dtype=torch.int16)
    assert evaluate._gather_into([parts], [fits], _Buffer(base))
    assert torch.equal(fits, torch.stack([base[s:s + 6].view(2, 3) for s in starts]))
    for place in (torch.empty((len(starts) + 1, 2, 3), dtype=torch.int16),
                  torch.empty((len(starts), 2, 3), dtype=torch.int32)):
        with pytest.raises(MoekitError, match=f"^{starts[0]} gave .* where the plan expects"):
            evaluate._gather_into([parts], [place], _Buffer(base))


@cuda
def test_cuda_copy_kernels_are_loaded_once_a_device_and_dtype(monkeypatch):
    monkeypatch.setattr(evaluate, "_COPIES_LOADED", set())
    made, empty = [], torch.empty

    def counted(*args, **kwargs):
        made.append(kwargs["dtype"])
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", counted)
    evaluate.load_copy_kernels(torch.device("cuda"), ["BF16", "BOOL", "BF16"])
    evaluate.load_copy_kernels(torch.device("cuda", torch.cuda.current_device()), ["BF16"])
    assert sorted(made, key=str) == [torch.bfloat16] * 2 + [torch.uint8] * 2
