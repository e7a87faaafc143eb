"""Helpers shared by the benchmarks: synthetic checkpoints, timing, peak RSS of a child."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch

from moekit.checkpoint import INDEX_NAME
from moekit.dtypes import to_safetensors
from moekit.executors.streaming import shard_file_names
from moekit.safetensors_writer import ShardWriter


def qwen3_moe_tensors(layers: int, experts: int, hidden: int, inter: int, vocab: int = 4096
                      ) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Qwen3-MoE-shaped checkpoint (HF per-expert keys)."""
    heads, head_dim = 8, hidden // 8
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(layers):
        p = f"model.layers.{layer}"
        out += [(f"{p}.input_layernorm.weight", (hidden,)),
                (f"{p}.self_attn.q_proj.weight", (heads * head_dim, hidden)),
                (f"{p}.self_attn.k_proj.weight", (2 * head_dim, hidden)),
                (f"{p}.self_attn.v_proj.weight", (2 * head_dim, hidden)),
                (f"{p}.self_attn.o_proj.weight", (hidden, heads * head_dim)),
                (f"{p}.post_attention_layernorm.weight", (hidden,)),
                (f"{p}.mlp.gate.weight", (experts, hidden))]
        for e in range(experts):
            out += [(f"{p}.mlp.experts.{e}.gate_proj.weight", (inter, hidden)),
                    (f"{p}.mlp.experts.{e}.up_proj.weight", (inter, hidden)),
                    (f"{p}.mlp.experts.{e}.down_proj.weight", (hidden, inter))]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def write_synthetic(path: Path, tensors: list[tuple[str, tuple[int, ...]]], config: dict,
                    shard_bytes: int = 500 * 2**20, dtype: torch.dtype = torch.bfloat16) -> int:
    """Write random tensors as an HF-sharded checkpoint, one tensor in memory at a time;
    return its size in bytes."""
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
    for file, shard in zip(names, shards):
        entries = [(n, to_safetensors(dtype), s) for n, s in shard]
        with ShardWriter(path / file, entries, {"format": "pt"}) as writer:
            for name, shape in shard:
                writer.write(name, torch.randn(shape, generator=generator).to(dtype))
                weight_map[name] = file
                total += size * torch.Size(shape).numel()
    if len(names) > 1:
        (path / INDEX_NAME).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    return total


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Run ``cmd``; return (wall seconds, peak RSS in bytes of that process)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return elapsed, usage.ru_maxrss * 1024


def drop_written(path: Path) -> None:
    """Remove an output folder between repetitions."""
    subprocess.run(["rm", "-rf", str(path)], check=True)
