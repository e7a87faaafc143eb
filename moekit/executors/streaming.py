"""The streaming executor: plan -> sharded safetensors files, one tensor in memory at a time."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from math import prod
from pathlib import Path

from ..checkpoint import INDEX_NAME, SINGLE_NAME
from ..plan import Concat, Expr, Plan, Read, Stack, TensorPlan
from ..progress import progress
from ..safetensors_writer import ShardWriter
from ..sources import FileSource, TensorSource
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
               metadata: Mapping[str, str], show_progress: bool | None = None,
               finished: Callable[[Path], object] = lambda path: None) -> None:
    """Write every tensor of ``plan`` into ``folder`` as HF-sharded safetensors + index;
    ``finished(path)`` is called with each file once it is written and closed (so that it
    can be synced while the next is written: ``OutputFolder.sync_soon``)."""
    shards = shard_tensors(plan.tensors, max_shard_bytes)
    names = shard_file_names(len(shards))
    weight_map: dict[str, str] = {}
    with progress(plan.total_bytes, f"{plan.src_layout} -> {plan.dst_layout}", show_progress) as bar:
        for name, shard in zip(names, shards):
            write_shard(folder / name, shard, source, metadata, bar.update)
            finished(folder / name)
            weight_map.update({t.name: name for t in shard})
    if len(shards) > 1:
        write_index(folder, plan.tensors, weight_map)
        finished(folder / INDEX_NAME)


def write_shard(path: Path, tensors: list[TensorPlan], source: TensorSource,
                metadata: Mapping[str, str], done: Callable[[int], object] = lambda n: None
                ) -> None:
    """Write one safetensors file holding ``tensors``, built one at a time from ``source``;
    ``done(nbytes)`` is called after each tensor.

    A shard whose every tensor is a concatenation of source byte ranges is copied by the
    kernel; one with tensors to build is written around the page cache (direct I/O, where
    the file system allows), its writes overlapping the building of the next tensors."""
    entries = [(t.name, t.dtype, t.shape) for t in tensors]
    ranges = [_byte_ranges(t.recipe, source) for t in tensors]
    direct = any(r is None for r in ranges)
    with ShardWriter(path, entries, metadata, direct) as writer:
        for tensor, tensor_ranges in zip(tensors, ranges):
            if tensor_ranges is not None:
                writer.copy_ranges(tensor.name, tensor_ranges)
            else:
                writer.write(tensor.name, materialize(tensor.recipe, source))
            done(tensor.nbytes)


def _byte_ranges(expr: Expr, source: TensorSource) -> list[tuple[int, int, int]] | None:
    """The file byte ranges whose concatenation is the tensor ``expr`` describes, when it
    is one (pass-through tensors; stacks and outer concatenations of contiguous regions,
    as HF <-> vllm/transformers conversions are), so that the kernel copies them; else
    None."""
    locate = getattr(source, "byte_range", None)
    if locate is None:
        return None
    if isinstance(expr, Read):
        found = locate(expr)
        return None if found is None else [found]
    if isinstance(expr, Stack) or (isinstance(expr, Concat) and not expr.interleave
                                   and all(n == 1 for n in expr.shape[:expr.dim % len(expr.shape)])):
        ranges: list[tuple[int, int, int]] = []
        for part in expr.parts:
            inner = _byte_ranges(part, source)
            if inner is None:
                return None
            ranges += inner
        return ranges
    return None


def write_index(folder: Path, tensors: list[TensorPlan], weight_map: dict[str, str]) -> None:
    """Write ``model.safetensors.index.json`` for ``tensors`` stored as ``weight_map`` says."""
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors),
                     "total_parameters": sum(prod(t.shape) for t in tensors)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
