"""The device executor's staging against an oracle that is not moekit's: random plans of
the recipe shapes layouts build, over random bytes in files that the safetensors library
reads, each recipe evaluated by plain torch indexing, stacking and concatenation of the
tensors ``safetensors.torch.load_file`` gives, all as integers of the elements' width (so
that NaN payloads, the sign of zero and bool bytes other than 0 and 1 count).

Each plan mixes what staging has to get right: regions that are row slices of a grouped
tensor (an expert, a range of experts, an expert's columns, every other row), regions
that touch, overlap or are read twice by different recipes, stacks in file order, out of
order and with repeats (views of the staging buffer or gathered), stacks of
concatenations and interleavings of transposed reads, 0-d and empty tensors, experts at
byte offsets their dtype is not aligned to (after odd-sized byte tensors), and tensors
spread over two files; read by three readers in tiny chunks and batches.
"""

from __future__ import annotations

import json
import math
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moekit import MoekitError
from moekit.checkpoint import Checkpoint
from moekit.dtypes import ITEMSIZES, to_torch
from moekit.executors.device import load_to_device
from moekit.executors.memory import run_plan
from moekit.plan import Concat, Expr, Plan, Read, Stack, TensorPlan, Transpose
from moekit.sources import FileSource

DTYPES = ("BF16", "F32", "F8_E4M3", "BOOL", "U8", "I64")
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _write(path: Path, tensors: list[tuple[str, str, tuple[int, ...]]],
           rng: random.Random) -> None:
    """A safetensors file of random bytes, its tensors in the order given."""
    header, data = {}, bytearray()
    for key, dtype, shape in tensors:
        size = math.prod(shape) * ITEMSIZES[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape),
                       "data_offsets": [len(data), len(data) + size]}
        data += rng.randbytes(size)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _checkpoint(folder: Path, rng: random.Random, dtype: str, experts: int, rows: int,
                cols: int) -> dict[str, tuple[int, ...]]:
    """Experts g{e}, u{e} [rows, cols] and d{e} [cols, rows], a grouped [experts, rows,
    2 cols], a 0-d and an empty tensor, shuffled over two files with odd-sized byte
    tensors between some; their shapes by name."""
    shapes = {f"{p}{e}": (rows, cols) if p != "d" else (cols, rows)
              for e in range(experts) for p in "gud"}
    shapes.update(grouped=(experts, rows, 2 * cols), scalar=(), empty=(0, cols))
    files: list[list] = [[], []]
    for i, (key, shape) in enumerate(shapes.items()):
        file = files[rng.randrange(2)]
        if rng.random() < 0.4:
            file.append((f"odd{i}", "U8", (rng.randint(1, 7),)))
        file.append((key, dtype, shape))
    weight_map = {}
    for i, tensors in enumerate(files):
        rng.shuffle(tensors)
        _write(folder / f"model-{i}.safetensors", tensors, rng)
        weight_map.update({key: f"model-{i}.safetensors" for key, _, _ in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return shapes


def _recipes(shapes: dict[str, tuple[int, ...]], dtype: str, experts: int,
             rng: random.Random) -> list[Expr]:
    """Recipes of the shapes layouts build, over the experts in a random order."""
    def whole(key: str) -> Read:
        return Read(key, (), shapes[key], dtype)

    def grouped(region: tuple, shape: tuple[int, ...]) -> Read:
        return Read("grouped", region, shape, dtype)

    _, rows, cols2 = shapes["grouped"]
    order = rng.choice([list(range(experts)), rng.sample(range(experts), experts),
                        rng.choices(range(experts), k=experts)])  # in order, not, repeated
    first, last = sorted(rng.sample(range(experts + 1), 2))
    interleave = rng.random() < 0.5
    return [
        Stack(tuple(whole(f"g{e}") for e in order)),
        Stack(tuple(Transpose(whole(f"d{e}")) for e in order)),
        Stack(tuple(Concat((Transpose(whole(f"g{e}")), Transpose(whole(f"u{e}"))), -1,
                           interleave) for e in order)),
        Stack(tuple(Concat((whole(f"g{e}"), whole(f"u{e}")), 0, interleave) for e in order)),
        grouped((slice(first, last),), (last - first, rows, cols2)),
        Stack(tuple(Transpose(grouped((e,), (rows, cols2))) for e in range(first, last))),
        Stack(tuple(grouped((e - experts,), (rows, cols2)) for e in order)),  # from the end
        Stack(tuple(grouped((e, slice(None), slice(cols2 // 2, None)), (rows, cols2 // 2))
                    for e in order)),
        grouped((slice(first, experts, 2),), (len(range(first, experts, 2)), rows, cols2)),
        Concat((grouped((slice(0, 1),), (1, rows, cols2)),
                grouped((slice(0, experts),), (experts, rows, cols2))), 0),
        Stack((whole("scalar"), whole("scalar"))),
        whole("empty"),
        Stack((whole("empty"), whole("empty"))),
    ]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(BITS[tensor.element_size()])


def _oracle(expr: Expr, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The recipe's value by plain torch, in integer bits."""
    if isinstance(expr, Read):
        value = _bits(tensors[expr.key])
        return value[expr.region] if expr.region else value
    if isinstance(expr, Transpose):
        return _oracle(expr.part, tensors).transpose(-2, -1)
    parts = [_oracle(part, tensors) for part in expr.parts]
    if isinstance(expr, Stack):
        return torch.stack(parts)
    dim = expr.dim % parts[0].dim()
    if expr.interleave:
        return torch.stack(parts, dim + 1).flatten(dim, dim + 1)
    return torch.cat(parts, dim)


@pytest.mark.parametrize("seed", range(12))
def test_staged_recipes_equal_torch_over_the_safetensors_librarys_tensors(seed, tmp_path):
    rng = random.Random(seed)
    dtype, experts = DTYPES[seed % len(DTYPES)], rng.randint(1, 5)
    shapes = _checkpoint(tmp_path, rng, dtype, experts, rng.randint(1, 5), rng.randint(1, 6))
    recipes = _recipes(shapes, dtype, experts, rng)
    plan = Plan("test", "", "", [TensorPlan(f"model.layers.{i % 3}.t{i}", recipe)
                                 for i, recipe in enumerate(recipes)])
    tensors = {k: v for file in sorted(tmp_path.glob("*.safetensors"))
               for k, v in load_file(file).items()}
    checkpoint = Checkpoint.open(tmp_path)
    loaded = load_to_device(plan, checkpoint, "cpu", readers=3,
                            chunk_bytes=rng.choice([7, 64, 1000]), batch_bytes=rng.choice([1, 300]),
                            slots=rng.randint(1, 3), buffer_bytes=300)
    with FileSource(checkpoint) as source:  # the file executor, for the CPU and streaming
        read = run_plan(plan, source)
    for tensor in plan.tensors:
        expected = _oracle(tensor.recipe, tensors)
        for found in (loaded[tensor.name], read[tensor.name]):
            assert found.dtype == to_torch(dtype), tensor.name
            assert torch.equal(_bits(found), expected), tensor.recipe


@pytest.mark.parametrize("region,shape", [((5,), (3,)), ((-6,), (3,)), ((0, 3), ()),
                                          ((slice(None), -4), (5,))])
def test_a_region_beyond_its_tensor_is_refused_by_every_executor(region, shape, tmp_path):
    """No layout reads past a dimension; were one to, each executor refuses (torch's
    IndexError for a later dimension) rather than return the bytes stored next."""
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"t": "model-0.safetensors", "u": "model-0.safetensors"}}))
    _write(tmp_path / "model-0.safetensors", [("t", "F32", (5, 3)), ("u", "F32", (5, 3))],
           random.Random(0))
    plan = Plan("test", "", "", [TensorPlan("x", Read("t", region, shape, "F32"))])
    checkpoint = Checkpoint.open(tmp_path)
    with pytest.raises((MoekitError, IndexError)):
        load_to_device(plan, checkpoint, "cpu", readers=1)
    with FileSource(checkpoint) as source, pytest.raises((MoekitError, IndexError)):
        run_plan(plan, source)
