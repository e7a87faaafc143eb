"""The streaming executor: plan -> sharded safetensors files, one tensor in memory at a time."""

from __future__ import annotations

import json
from collections.abc import Mapping
from math import prod
from pathlib import Path

from ..checkpoint import INDEX_NAME, SINGLE_NAME
from ..plan import Plan, TensorPlan
from ..progress import progress
from ..safetensors_writer import ShardWriter
from ..sources import FileSource
from .evaluate import materialize

def shard_tensors(tensors: list[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a tensor larger
    than that gets a shard of its own), as ``save_pretrained`` does."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return [s for s in shards if s]


def shard_file_names(n: int) -> list[str]:
    """HF names: ``model.safetensors`` alone, else ``model-0000i-of-0000n.safetensors``."""
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_plan(plan: Plan, source: FileSource, folder: Path, max_shard_bytes: int,
               metadata: Mapping[str, str], show_progress: bool | None = None) -> None:
    """Write every tensor of ``plan`` into ``folder`` as HF-sharded safetensors + index."""
    shards = shard_tensors(plan.tensors, max_shard_bytes)
    names = shard_file_names(len(shards))
    weight_map: dict[str, str] = {}
    with progress(plan.total_bytes, f"{plan.src_layout} -> {plan.dst_layout}", show_progress) as bar:
        for name, shard in zip(names, shards):
            entries = [(t.name, t.dtype, t.shape) for t in shard]
            with ShardWriter(folder / name, entries, metadata) as writer:
                for tensor in shard:
                    writer.write(tensor.name, materialize(tensor.recipe, source))
                    weight_map[tensor.name] = name
                    bar.update(tensor.nbytes)
    if len(shards) > 1:
        _write_index(folder, plan, weight_map)


def _write_index(folder: Path, plan: Plan, weight_map: dict[str, str]) -> None:
    index = {
        "metadata": {"total_size": plan.total_bytes,
                     "total_parameters": sum(prod(t.shape) for t in plan.tensors)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
