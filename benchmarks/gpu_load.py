"""Benchmark loading grouped experts onto a GPU, against the pinned host->device copy limit.

Builds a synthetic Qwen3-MoE-shaped bf16 checkpoint (default 8 GiB, 128 experts of
Qwen3-30B-A3B's shape: hidden 2048, expert intermediate 768), reads it once so that every
run starts from the page cache, then times, in one run:

  (a) pinned host -> device copies of the same number of bytes (the limit),
  (b) ``moekit.load(..., "nemo", device="cuda")``: grouped nemo tensors on the GPU, read
      by kvikio's threads where kvikio is installed, and (b1) the first call of a new
      process, which also pins its host buffers, starts its reader threads and grows
      PyTorch's device memory pool (what a training job that loads once sees: the
      process imports ``moekit``, byte-compiled as pip installs it, makes its CUDA
      context and spends --setup-seconds on its own set-up, as a job sets up its process
      group and builds its model, then loads); (b1p) the same, the process having called
      ``moekit.prepare_loads("cuda")`` as it started; and, where kvikio reads (b), (bm)
      the same read by moekit's own reader threads (``MOEKIT_KVIKIO=0``),
  (c) transformers ``from_pretrained(..., device_map="cuda")``,
  (d) safetensors ``load_file(device="cuda")`` of every shard + a naive stack into nemo,
  (r) for reference, moekit's number of reader threads reading the files into pinned
      buffers, 64 MiB at a time through two buffers each, without (r) and with (r+) an
      asynchronous copy of each buffer to the GPU: a plain reader of the page cache that
      builds nothing (moekit's readers, which copy 8 MiB pieces, can outrun it),
  (e) cold: ``moekit.load`` once the files' pages are dropped from the page cache
      (``posix_fadvise(DONTNEED)``), against (e0) ``cat`` of the files, dropped likewise:
      what the disk gives,

and prints each (the best of --repeat runs; the first calls the median of --repeat new
processes of each kind and the cold reads the median of --repeat of each, both started in
turns; transformers once) as GB/s and as a ratio to (a); ``--json FILE`` writes them as
JSON too, with every first call and cold read. Then checks that every grouped tensor of
(b) equals (d)'s on the GPU and has the same checksum as moekit's CPU path.

    python benchmarks/gpu_load.py [--size-gib 8] [--experts 128] [--hidden 2048] [--inter 768]
                                  [--setup-seconds 1] [--skip-transformers] [--json FILE]
"""

from __future__ import annotations

import argparse
import compileall
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common import (add_shape_arguments, build_checkpoint, digest, warm_page_cache,
                    write_figures)

import moekit
from moekit import load, prepare_loads
from moekit.executors.device import reader_threads
from moekit.executors.native import SWITCH, native_reads

CHUNK_BYTES = 64 * 2**20
"""Bytes each thread of the (r) rows reads at a time."""


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    """The best of ``repeat`` runs of ``fn`` in seconds, the GPU's work included, and the
    last run's result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        result = None
        gc.collect()
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def pinned_copy(nbytes: int, chunk: int = 2**30) -> None:
    """Copy ``nbytes`` from pinned host memory to the GPU, ``chunk`` at a time."""
    host = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(chunk, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for done in range(0, nbytes, chunk):
        n = min(chunk, nbytes - done)
        device[:n].copy_(host[:n], non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def parallel_read(path: Path, to_device: bool, threads: int = reader_threads(),
                  chunk: int = CHUNK_BYTES) -> float:
    """Seconds to read every shard into pinned host buffers with ``threads`` threads, each
    buffer then copied to the GPU asynchronously when ``to_device`` (two buffers a thread,
    64 MiB a read): what reading through the page cache costs, with nothing built."""
    jobs = [(file, start, min(chunk, file.stat().st_size - start))
            for file in sorted(path.glob("*.safetensors"))
            for start in range(0, file.stat().st_size, chunk)]
    local = threading.local()
    fds = {file: os.open(file, os.O_RDONLY) for file, _, _ in jobs}
    target = torch.empty(chunk, dtype=torch.uint8, device="cuda") if to_device else None

    def read(job: tuple[Path, int, int]) -> None:
        if not hasattr(local, "buffers"):
            local.buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
                             for _ in range(2)]
            local.copied = [None, None]
            local.stream = torch.cuda.Stream()
        buffer, copied = local.buffers[0], local.copied[0]
        if copied is not None:
            copied.synchronize()
        file, start, size = job
        os.preadv(fds[file], [memoryview(buffer.numpy())[:size]], start)
        if target is not None:
            with torch.cuda.stream(local.stream):
                target[:size].copy_(buffer[:size], non_blocking=True)
                local.copied[0] = torch.cuda.Event()
                local.copied[0].record(local.stream)
        local.buffers.reverse()
        local.copied.reverse()

    torch.cuda.synchronize()
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, jobs))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    for fd in fds.values():
        os.close(fd)
    return seconds


def moekit_readers(path: Path, repeat: int) -> float:
    """Seconds of the best of ``repeat`` loads read by moekit's reader threads."""
    os.environ[SWITCH] = "0"
    try:
        load(path, "nemo", device="cuda")  # their threads started and buffers pinned
        return timed(lambda: load(path, "nemo", device="cuda"), repeat)[0]
    finally:
        del os.environ[SWITCH]


def first_loads(path: Path, setup: float, runs: int) -> dict[bool, list[float]]:
    """Seconds of the first load of ``runs`` new processes (``first_load_child``) that do
    not call ``prepare_loads`` (False) and of ``runs`` that do (True), started in turns.

    moekit is byte-compiled first, as pip installs it: otherwise, where bytecode is not
    written (``PYTHONDONTWRITEBYTECODE``), each process would compile the modules its
    first load imports while the load is timed."""
    if not compileall.compile_dir(Path(moekit.__file__).parent, quiet=1):
        raise SystemExit("cannot byte-compile moekit for the first-load processes")
    found: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(runs):
        for prepare in found:
            command = [sys.executable, __file__, "--first-child", str(path),
                       "--setup-seconds", str(setup), *(["--prepare"] if prepare else [])]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"a first-load process failed:\n{done.stderr}")
            found[prepare].append(float(done.stdout.split()[-1]))
    return found


def first_load_child(path: Path, prepare: bool, setup: float) -> None:
    """Print the seconds of this process's first load, made once it has its CUDA context
    and has spent ``setup`` seconds on its own set-up (after calling ``prepare_loads``
    where ``prepare``)."""
    if prepare:
        prepare_loads("cuda")
    torch.empty(1, device="cuda")
    time.sleep(setup)
    print(timed(lambda: load(path, "nemo", device="cuda"))[0])


def naive_nemo(path: Path, layers: int, experts: int) -> dict[str, torch.Tensor]:
    """What a user writes without moekit: load every shard to the GPU, stack the experts."""
    from safetensors.torch import load_file

    loaded: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        loaded.update(load_file(file, device="cuda"))
    for layer in range(layers):
        p = f"model.layers.{layer}.mlp"
        gate = [loaded.pop(f"{p}.experts.{e}.gate_proj.weight") for e in range(experts)]
        up = [loaded.pop(f"{p}.experts.{e}.up_proj.weight") for e in range(experts)]
        down = [loaded.pop(f"{p}.experts.{e}.down_proj.weight") for e in range(experts)]
        loaded[f"{p}.experts.gate_and_up_projs"] = torch.stack(
            [torch.cat([g.T, u.T], dim=1) for g, u in zip(gate, up)])
        loaded[f"{p}.experts.down_projs"] = torch.stack([d.T for d in down])
        del gate, up, down
    return loaded


def drop_cached(path: Path) -> None:
    """Drop the page-cache pages of every file of ``path`` (written back first)."""
    os.sync()
    for file in path.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold(path: Path, fn: Callable[[], object]) -> float:
    """Seconds of ``fn`` once ``path``'s files are out of the page cache."""
    drop_cached(path)
    seconds = timed(fn)[0]
    warm_page_cache(path)
    return seconds


def cold_reads(path: Path, runs: int) -> dict[str, list[float]]:
    """Seconds of ``runs`` cold ``moekit.load``s (e) and ``cat``s (e0) of ``path``, in
    turns (the disk may be shared: a run of one kind alone could meet another load)."""
    found: dict[str, list[float]] = {"(e)": [], "(e0)": []}
    for _ in range(runs):
        found["(e)"].append(cold(path, lambda: load(path, "nemo", device="cuda")))
        found["(e0)"].append(cold(path, lambda: cat(path)))
    return found


def cat(path: Path) -> None:
    """Read every shard with ``cat`` (the disk's sequential speed when cold)."""
    subprocess.run(["sh", "-c", 'cat "$@" >/dev/null', "cat",
                    *map(str, sorted(path.glob("*.safetensors")))], check=True)


def transformers_load(path: Path) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda", dtype=torch.bfloat16)
    del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser, size_gib=8.0, experts=128, hidden=2048, inter=768)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", help="where to build the checkpoint (default: a temp dir)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--setup-seconds", type=float, default=1.0,
                        help="(b1), (b1p): a new process's own set-up before its first load")
    parser.add_argument("--first-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.first_child is not None:
        first_load_child(args.first_child, args.prepare, args.setup_seconds)
        return

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="moekit-gpu-") as tmp:
        path = Path(tmp) / "ckpt"
        size, layers = build_checkpoint(path, args, full_config=True)
        warm_page_cache(path)
        firsts = first_loads(path, args.setup_seconds, args.repeat)
        load(path, "nemo", device="cuda")  # the first call of this process
        print(f"checkpoint: {size / 2**30:.2f} GiB, {layers} layers x {args.experts} experts "
              f"(H={args.hidden}, I={args.inter}), bf16; GPU {torch.cuda.get_device_name()}")
        rows = [("(a) pinned host->device copy",
                 min(pinned_copy(size) for _ in range(args.repeat))),
                (f"(r) page cache -> pinned, {reader_threads()} thr",
                 min(parallel_read(path, False) for _ in range(args.repeat))),
                (f"(r+) ... -> GPU, {reader_threads()} thr",
                 min(parallel_read(path, True) for _ in range(args.repeat)))]
        seconds, ours = timed(lambda: load(path, "nemo", device="cuda"), args.repeat)
        native = native_reads("cuda")
        rows += [(f"(b) moekit.load nemo cuda{', kvikio' if native else ''}", seconds),
                 ("(b1) ... first call", statistics.median(firsts[False])),
                 ("(b1p) ... first, prepared", statistics.median(firsts[True]))]
        if native:
            rows.append(("(bm) ... moekit's readers", moekit_readers(path, args.repeat)))
        if not args.skip_transformers:
            rows.append(("(c) transformers cuda", timed(lambda: transformers_load(path))[0]))
        seconds, naive = timed(lambda: naive_nemo(path, layers, args.experts), args.repeat)
        rows.append(("(d) safetensors + stack", seconds))
        colds = cold_reads(path, args.repeat)
        rows += [("(e) moekit.load, cold page cache", statistics.median(colds["(e)"])),
                 ("(e0) cat, cold page cache", statistics.median(colds["(e0)"]))]

        limit = rows[0][1]
        print(f"{'':32}{'seconds':>9}{'GB/s':>8}{'of (a)':>8}")
        for name, s in rows:
            print(f"{name:32}{s:9.2f}{size / s / 1e9:8.1f}{limit / s:8.1%}")
        grouped = [k for k in ours if "experts." in k]
        if not all(torch.equal(ours[k], naive[k]) for k in ours):
            raise SystemExit("moekit's tensors differ from the naive GPU stack's")
        del naive
        cpu = load(path, "nemo")
        same = all(digest(ours[k]) == digest(cpu[k]) for k in grouped)
        print(f"{len(grouped)} grouped tensors: equal to the naive GPU stack; "
              f"sha256 {'identical' if same else 'DIFFERENT'} to moekit's CPU path")
        write_figures(args.json, torch.cuda.get_device_name(),
                      {name: {"seconds": s, "gb_per_s": size / s / 1e9, "of_limit": limit / s}
                       for name, s in rows},
                      checkpoint_bytes=size, expert_tensor_bytes=2 * args.hidden * args.inter,
                      baseline="(a) pinned host->device copy", repeat=args.repeat,
                      setup_seconds=args.setup_seconds,
                      first_calls={"(b1)": firsts[False], "(b1p)": firsts[True]},
                      cold_reads=colds,
                      kvikio_reads=native,
                      equal_to_naive=True, same_as_cpu=same)


if __name__ == "__main__":
    main()
