"""Helpers shared by the benchmarks: synthetic checkpoints, timing, peak RSS of a child,
and the JSON every benchmark writes."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from moekit.checkpoint import INDEX_NAME
from moekit.dtypes import to_safetensors
from moekit.executors.streaming import shard_file_names
from moekit.safetensors_writer import ShardWriter


HEADS, KV_HEADS, VOCAB = 8, 2, 4096


def qwen3_moe_tensors(layers: int, experts: int, hidden: int, inter: int, vocab: int = 4096
                      ) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Qwen3-MoE-shaped checkpoint (HF per-expert keys)."""
    heads, head_dim = HEADS, hidden // HEADS
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(layers):
        p = f"model.layers.{layer}"
        out += [(f"{p}.input_layernorm.weight", (hidden,)),
                (f"{p}.self_attn.q_proj.weight", (heads * head_dim, hidden)),
                (f"{p}.self_attn.q_norm.weight", (head_dim,)),
                (f"{p}.self_attn.k_norm.weight", (head_dim,)),
                (f"{p}.self_attn.k_proj.weight", (KV_HEADS * head_dim, hidden)),
                (f"{p}.self_attn.v_proj.weight", (KV_HEADS * head_dim, hidden)),
                (f"{p}.self_attn.o_proj.weight", (hidden, heads * head_dim)),
                (f"{p}.post_attention_layernorm.weight", (hidden,)),
                (f"{p}.mlp.gate.weight", (experts, hidden))]
        for e in range(experts):
            out += [(f"{p}.mlp.experts.{e}.gate_proj.weight", (inter, hidden)),
                    (f"{p}.mlp.experts.{e}.up_proj.weight", (inter, hidden)),
                    (f"{p}.mlp.experts.{e}.down_proj.weight", (hidden, inter))]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def add_shape_arguments(parser: argparse.ArgumentParser, size_gib: float, experts: int,
                        hidden: int = 1024, inter: int = 256) -> None:
    """The options that shape the synthetic Qwen3-MoE checkpoint of a benchmark."""
    parser.add_argument("--size-gib", type=float, default=size_gib)
    parser.add_argument("--experts", type=int, default=experts)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--inter", type=int, default=inter)


def expert_bytes_per_layer(args: argparse.Namespace) -> int:
    """Bytes of one layer's routed experts (gate, up, down in bf16)."""
    return 2 * 3 * args.experts * args.hidden * args.inter


def build_checkpoint(path: Path, args: argparse.Namespace, full_config: bool = False
                     ) -> tuple[int, int]:
    """Write the synthetic checkpoint ``args`` describe; return (bytes, layers).
    ``full_config`` writes a config.json that transformers can build the model from."""
    layers = max(1, round(args.size_gib * 2**30 / expert_bytes_per_layer(args)))
    config = {"model_type": "qwen3_moe", "num_experts": args.experts,
              "hidden_size": args.hidden, "moe_intermediate_size": args.inter,
              "num_hidden_layers": layers}
    if full_config:
        config.update(architectures=["Qwen3MoeForCausalLM"], vocab_size=VOCAB,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      head_dim=args.hidden // HEADS, intermediate_size=4 * args.inter,
                      num_experts_per_tok=8, tie_word_embeddings=False,
                      max_position_embeddings=4096)
    tensors = qwen3_moe_tensors(layers, args.experts, args.hidden, args.inter)
    return write_synthetic(path, tensors, config), layers


def write_synthetic(path: Path, tensors: list[tuple[str, tuple[int, ...]]], config: dict,
                    shard_bytes: int = 500 * 2**20, dtype: torch.dtype = torch.bfloat16) -> int:
    """Write random tensors as an HF-sharded checkpoint, one tensor in memory at a time;
    return its size in bytes. Each shard holds its tensors in the order safetensors'
    own writer gives them (``save_pretrained``'s, so every Hub checkpoint's): by name
    within a dtype, ``experts.10`` before ``experts.2``."""
    path.mkdir(parents=True)
    size = torch.tensor([], dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in tensors:
        nbytes = size * torch.Size(shape).numel()
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    names = shard_file_names(len(shards))
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(2**24 + 4099, generator=generator).to(dtype)
    for i, (file, shard) in enumerate(zip(names, shards)):
        shard.sort()
        entries = [(n, to_safetensors(dtype), s) for n, s in shard]
        with ShardWriter(path / file, entries, {"format": "pt"}) as writer:
            for j, (name, shape) in enumerate(shard):
                writer.write(name, _random_like(pool, shape, 7919 * i + 104729 * j))
                weight_map[name] = file
                total += size * torch.Size(shape).numel()
    if len(names) > 1:
        (path / INDEX_NAME).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    return total


def _random_like(pool: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Pseudo-random values of ``shape``: a slice of ``pool`` at a seed-dependent offset,
    tiled (writing gigabytes of fresh normal draws would dominate a benchmark's set-up)."""
    n = torch.Size(shape).numel()
    start = seed % 4096
    reps = -(-(n + start) // pool.numel())
    return pool.repeat(reps)[start:start + n].view(shape) if reps > 1 else \
        pool[start:start + n].view(shape).clone()


MEASURE = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""
"""Runs a command and prints its wall seconds, peak RSS (KiB) and exit code. A child's
peak RSS counts the memory of the process it was forked from, so the command is forked
from this small interpreter, not from the benchmark (which holds torch and test data)."""


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Run ``cmd``; return (wall seconds, peak RSS in bytes of that process).

    Dirty pages are flushed first, so that every command starts from the same state: the
    kernel throttles a writer once enough dirty pages pile up, and whichever command ran
    second would otherwise pay for the first one's writes."""
    os.sync()
    done = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True,
                          text=True, check=True)
    seconds, peak_kib, code = done.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr}")
    return float(seconds), int(peak_kib) * 1024


def drop_written(path: Path) -> None:
    """Remove an output folder between repetitions."""
    subprocess.run(["rm", "-rf", str(path)], check=True)


def folder_bytes(path: Path) -> int:
    """Total size of the files in a folder."""
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def leave_process_group() -> None:
    """End a spawned rank: barrier, destroy the group, exit without finalizing Python.

    gloo's worker thread may still release a tensor of an earlier collective after the
    barrier returns; during interpreter finalization that aborts the process (torch 2.13,
    pytorch PR 179291), so the rank leaves with ``os._exit(0)`` once its output is flushed."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (computed on the host)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().view(torch.uint8).numpy()
                          .tobytes()).hexdigest()


def warm_page_cache(path: Path) -> None:
    """Write back what the machine has still to write (a checkpoint just built), then read
    every file of a folder once, so that timed runs start from the page cache and share
    the memory bus with no write-back."""
    os.sync()
    for file in path.iterdir():
        with open(file, "rb") as handle:
            while handle.read(64 * 2**20):
                pass


def commit() -> str:
    """The commit the benchmarked code is at: ``MOEKIT_COMMIT`` when set (a copy of the
    working tree on another machine, whose git folder may be stale), else git's HEAD."""
    if os.environ.get("MOEKIT_COMMIT"):
        return os.environ["MOEKIT_COMMIT"]
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, cwd=Path(__file__).parent)
    return found.stdout.strip() or "unknown"


def add_convert_arguments(parser: argparse.ArgumentParser, to: str, baseline: str) -> None:
    """The options of a benchmark of ``moekit convert --to TO`` against another tool's
    conversion: the synthetic checkpoint's shape, moekit's second ``--max-shard-size``,
    where to work, the JSON file, and ``--TO SRC DST``, which runs the baseline alone."""
    add_shape_arguments(parser, size_gib=0.5, experts=64)
    parser.add_argument("--shard", default="256MB",
                        help="the --max-shard-size of moekit's second run: DCP keeps a "
                             ".distcp file's tensors until the file is written, so this "
                             "bounds moekit's memory (the default, 5GB, holds a smaller "
                             "model whole)")
    parser.add_argument("--workdir", help="where to build the checkpoint (default: a temp dir)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument(f"--{to}", nargs=2, metavar=("SRC", "DST"),
                        help=f"only run {baseline} of SRC into DST (the baseline this script "
                             "measures in a process of its own)")


def compare_convert(args: argparse.Namespace, script: str, baseline: str, to: str,
                    check: Callable[[Path, Path], tuple[int, str]], written: str = "") -> None:
    """Time and measure the peak RSS of the baseline (``script --TO SRC DST``) and of
    ``moekit convert --to TO``, with ``--shard`` and with its default, on the synthetic
    checkpoint, each in a process of its own, page cache warm; print them as ratios to the
    baseline's (measured in the same run: the machines are shared and noisy) and write the
    figures. ``check(theirs, ours)`` (``ours`` the folder under moekit's output named
    ``written``) raises unless both hold the same tensors, and returns how many entries it
    compared and a sentence saying so."""
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="moekit-bench-") as tmp:
        src, theirs, ours = Path(tmp) / "src", Path(tmp) / "baseline", Path(tmp) / "moekit"
        size, layers = build_checkpoint(src, args, full_config=True)
        print(f"checkpoint: {size / 2**30:.2f} GiB, {layers} layers x {args.experts} experts "
              f"(H={args.hidden}, I={args.inter}), bf16")
        warm_page_cache(src)
        moekit = [sys.executable, "-m", "moekit.cli", "convert", str(src), str(ours),
                  "--to", to]
        label = f"moekit convert --to {to}"
        rows = {baseline: run_measured([sys.executable, script, f"--{to}", str(src),
                                        str(theirs)])}
        rows[f"{label} --max-shard-size {args.shard}"] = run_measured(
            [*moekit, "--max-shard-size", args.shard])
        drop_written(ours)
        rows[label] = run_measured(moekit)
        compared, said = check(theirs, ours / written)
    base_seconds, base_rss = rows[baseline]
    width = max(map(len, rows)) + 4
    print(f"{'':{width}}{'seconds':>10}{'ratio':>8}{'peak RSS MiB':>14}{'ratio':>8}")
    for name, (seconds, peak) in rows.items():
        print(f"{name:{width}}{seconds:10.2f}{seconds / base_seconds:8.2f}"
              f"{peak / 2**20:14.0f}{peak / base_rss:8.2f}")
    print(said)
    write_figures(args.json, f"{platform.machine()} {os.cpu_count()} cores",
                  {name: {"seconds": s, "ratio": s / base_seconds, "peak_rss_bytes": rss,
                          "peak_rss_ratio": rss / base_rss,
                          "peak_rss_of_checkpoint": rss / size}
                   for name, (s, rss) in rows.items()},
                  checkpoint_bytes=size, baseline=baseline, entries_compared=compared)


def read_dcp(folder: Path, metadata: dict) -> dict[str, torch.Tensor]:
    """The tensors ``metadata`` (a DCP ``.metadata``'s entries) lists, read from the DCP
    folder ``folder`` by DCP itself."""
    import torch.distributed.checkpoint as dcp

    state = {key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
             for key, entry in metadata.items() if hasattr(entry, "size")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
    return state


def write_figures(path: str | None, machine: str, rows: dict[str, dict[str, float]],
                  **details: object) -> None:
    """Write a benchmark's figures as JSON to ``path`` (when given): the machine, commit,
    date, each row's figures (seconds, throughput, ratio to the baseline) and details."""
    if not path:
        return
    figures = {"machine": machine, "cpus": os.cpu_count(), "python": platform.python_version(),
               "commit": commit(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               **details, "rows": rows}
    Path(path).write_text(json.dumps(figures, indent=2) + "\n")


def copy_limit_gbps(device: torch.device) -> float:
    """GB/s of a copy into the device's memory, best of 5: from a pinned host buffer to a
    GPU (the limit of a load through host memory), or host to host on the CPU."""
    size = 2**31 if device.type == "cuda" else 2**26
    host = torch.empty(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
    target = torch.empty(size, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        target.copy_(host, non_blocking=True)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return size / best / 1e9


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a GPU's; nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def print_table(columns: list[tuple[str, int, str]], rows: list[tuple]) -> None:
    """Print ``rows`` under a header line, each value right-aligned in its column (title,
    width, format spec)."""
    print("".join(f"{title:>{width}}" for title, width, _ in columns))
    for row in rows:
        print("".join(f"{value:>{width}{spec}}" for value, (_, width, spec) in zip(row, columns)))
