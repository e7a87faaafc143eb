"""Whole-model sharded load on a (dp, ep) mesh, checked against FSDP2's own sharding of a
tiny transformers Qwen3-MoE (spawned ranks, gloo on CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open

from moekit import samples
from moekit.dtypes import ITEMSIZES

from . import sharded_workers

N_EXPERTS = 10


@pytest.fixture(scope="module")
def qwen3_10(tmp_path_factory):
    """A tiny Qwen3-MoE with 10 experts, in several shards."""
    model = samples.build_model("qwen3_moe", num_experts=N_EXPERTS)
    return samples.save_model(model, tmp_path_factory.mktemp("sharded") / "qwen3-10")


def spawn(fn, world: int, store, *args) -> None:
    mp.spawn(fn, args=(world, str(store), *args), nprocs=world, join=True)


def expected_bytes(src, dp: int, ep: int) -> dict[tuple[int, int], int]:
    """(dp rank, ep rank) -> bytes it should read, from the headers by torch.chunk: an
    expert's rows go to the ep rank whose chunk of the experts holds it and, within that
    chunk, to the dp rank whose chunk holds it; another tensor's rows to the dp rank
    whose chunk holds them and, within that chunk, to the ep rank whose chunk holds them."""
    share = {(d, e): 0 for d in range(dp) for e in range(ep)}
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                shape = tensor.get_shape()
                row = math.prod(shape[1:]) * ITEMSIZES[tensor.get_dtype()]
                if ".experts." in key:
                    expert = int(key.split(".experts.")[1].split(".")[0])
                    e = _owner(torch.arange(N_EXPERTS).chunk(ep), expert)
                    mine = torch.arange(N_EXPERTS).chunk(ep)[e]
                    d = _owner(mine.chunk(dp), expert)
                    share[d, e] += shape[0] * row
                    continue
                for d, rows in enumerate(torch.arange(shape[0]).chunk(dp)):
                    for e, part in enumerate(rows.chunk(ep)):
                        share[d, e] += len(part) * row
    return share


def _owner(chunks, value: int) -> int:
    return next(i for i, chunk in enumerate(chunks) if value in chunk.tolist())


@pytest.mark.parametrize("dp,ep", [(1, 1), (1, 2), (3, 1), (2, 2), (4, 2)])
def test_fully_sharded_model_loads_strictly_and_gives_the_same_logits(dp, ep, qwen3_10,
                                                                      tmp_path):
    spawn(sharded_workers.load_into_fsdp, dp * ep, tmp_path / "store", str(qwen3_10),
          str(tmp_path), (dp, ep), N_EXPERTS)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(dp * ep)]
    assert all(r["logits_equal"] for r in results)
    share = expected_bytes(qwen3_10, dp, ep)
    assert [r["bytes"] for r in results] == [share[d, e] for d in range(dp) for e in range(ep)]
    total = sum(f.stat().st_size for f in qwen3_10.glob("*.safetensors"))
    headers = sum(8 + int.from_bytes(f.read_bytes()[:8], "little")
                  for f in qwen3_10.glob("*.safetensors"))
    assert sum(r["bytes"] for r in results) == total - headers
