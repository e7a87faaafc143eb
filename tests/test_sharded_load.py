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
from moekit.expert_parallel.report import ep_report

from . import sharded_workers
from .conftest import load_all

N_EXPERTS = 10


@pytest.fixture(scope="module")
def qwen3_10(tmp_path_factory):
    """A tiny Qwen3-MoE with 10 experts, in several shards."""
    model = samples.build_model("qwen3_moe", num_experts=N_EXPERTS)
    return samples.save_model(model, tmp_path_factory.mktemp("sharded") / "qwen3-10")


def spawn(fn, world: int, store, *args) -> None:
    mp.spawn(fn, args=(world, str(store), *args), nprocs=world, join=True)


def headers(src) -> dict[str, tuple[list[int], int]]:
    """Tensor name -> (shape, bytes of a row), read with the safetensors library."""
    found = {}
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                shape = tensor.get_shape()
                found[key] = shape, math.prod(shape[1:]) * ITEMSIZES[tensor.get_dtype()]
    return found


def expected_bytes(src, dp: int, ep: int, replicate: tuple[str, ...]
                   ) -> dict[tuple[int, int], int]:
    """(dp rank, ep rank) -> bytes it should read, from the headers by torch.chunk: an
    expert's rows go to the ep rank whose chunk of the experts holds it and, within that
    chunk, to the dp rank whose chunk holds it; another tensor's rows to the dp rank
    whose chunk holds them and, within that chunk, to the ep rank whose chunk holds them;
    a replicated tensor to every rank."""
    share = {(d, e): 0 for d in range(dp) for e in range(ep)}
    for key, (shape, row) in headers(src).items():
        if key in replicate:
            for rank in share:
                share[rank] += shape[0] * row
        elif ".experts." in key:
            expert = int(key.split(".experts.")[1].split(".")[0])
            e = _owner(torch.arange(N_EXPERTS).chunk(ep), expert)
            d = _owner(torch.arange(N_EXPERTS).chunk(ep)[e].chunk(dp), expert)
            share[d, e] += shape[0] * row
        else:
            for d, rows in enumerate(torch.arange(shape[0]).chunk(dp)):
                for e, part in enumerate(rows.chunk(ep)):
                    share[d, e] += len(part) * row
    return share


def _owner(chunks, value: int) -> int:
    return next(i for i, chunk in enumerate(chunks) if value in chunk.tolist())


@pytest.mark.parametrize("dp,ep,replicate", [
    (1, 1, ()), (3, 1, ("lm_head.weight",)), (2, 2, ()), (4, 2, ())],
    ids=["1x1", "3x1-lm_head-replicated", "2x2", "4x2"])
def test_fully_sharded_model_loads_strictly_and_gives_the_same_logits(dp, ep, replicate,
                                                                      qwen3_10, tmp_path):
    spawn(sharded_workers.load_into_fsdp, dp * ep, tmp_path / "store", str(qwen3_10),
          str(tmp_path), (dp, ep), ("qwen3_moe", {"num_experts": N_EXPERTS}), replicate)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(dp * ep)]
    assert all(r["logits_equal"] for r in results)
    share = expected_bytes(qwen3_10, dp, ep, replicate)
    assert [r["bytes"] for r in results] == [share[d, e] for d in range(dp) for e in range(ep)]
    sizes = headers(qwen3_10)
    once = sum(shape[0] * row for shape, row in sizes.values())
    again = sum(sizes[key][0][0] * sizes[key][1] for key in replicate) * (dp * ep - 1)
    assert sum(r["bytes"] for r in results) == once + again
    if not replicate:
        planned = ep_report(qwen3_10, ep, "transformers", dp_size=dp)
        assert [(p.read_bytes, p.held_bytes) for p in planned] == \
            [(r["bytes"], r["held"]) for r in results]


def test_fully_sharded_deepseek_v3_loads_strictly_and_gives_the_same_logits(tmp_path):
    """DeepSeek-V3 (a dense leading layer, shared experts, the router's score-correction
    bias: a buffer, which FSDP2 leaves whole, hence replicated) on a 2 x 2 mesh."""
    src = samples.save_model(samples.build_model("deepseek_v3"), tmp_path / "deepseek-v3")
    replicate = ("*.e_score_correction_bias",)
    spawn(sharded_workers.load_into_fsdp, 4, tmp_path / "store", str(src), str(tmp_path),
          (2, 2), ("deepseek_v3", {}), replicate)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(4)]
    assert all(r["logits_equal"] for r in results)
    sizes = headers(src)
    once = sum(shape[0] * row for shape, row in sizes.values())
    again = sum(shape[0] * row for key, (shape, row) in sizes.items()
                if key.endswith(".e_score_correction_bias")) * 3
    assert sum(r["bytes"] for r in results) == once + again


def test_a_missing_expert_or_a_mesh_without_the_named_dimensions_fails_every_rank(qwen3_10,
                                                                                  tmp_path):
    import shutil

    from .test_bad_input import edit_checkpoint

    src = shutil.copytree(qwen3_10, tmp_path / "broken")
    edit_checkpoint(src, lambda t: {k: v for k, v in t.items()
                                    if "layers.2.mlp.experts.9.down_proj" not in k})
    spawn(sharded_workers.load_expecting_error, 2, tmp_path / "store", str(src),
          str(tmp_path), (1, 2))
    outcomes = [(tmp_path / f"{r}.txt").read_text() for r in range(2)]
    assert "load_sharded failed on another rank: rank 1: EP rank 1 of 2 (experts 5-9)" \
        in outcomes[0]
    assert outcomes[1].startswith("EP rank 1 of 2 (experts 5-9)")
    assert all("layer 2: expert 9 lacks down_proj" in text for text in outcomes)
    for rank in range(2):
        message = (tmp_path / f"{rank}.mesh.txt").read_text()
        assert "dimensions 'dp' (FSDP) and 'tp' (experts); this one has ('dp', 'ep')" in message


def test_what_is_not_a_mesh_is_refused():
    from moekit import MoekitError, load_sharded

    with pytest.raises(MoekitError, match="device_mesh is a NoneType"):
        load_sharded("unused", None)


@pytest.mark.parametrize("family,shapes", [
    ("qwen3_moe", [(3, 1), (1, 3)]), ("qwen3_moe", [(2, 2), (4, 1), (1, 4)]),
    ("gpt_oss", [(2, 1), (1, 2)])], ids=["world3", "world4", "gpt_oss-world2"])
def test_saved_back_from_the_mesh_each_byte_by_one_rank(family, shapes, qwen3_10, tmp_path):
    """save_sharded of what load_sharded gave, at meshes of 3 and 4 ranks (10 experts:
    uneven splits over ep and dp; lm_head replicated on every rank), and of a GPT-OSS at
    2 (whose HF checkpoint holds its experts grouped: each rank writes its rows of a
    tensor): the safetensors checkpoint holds every source tensor byte for byte (read
    with the safetensors library), transformers loads it and gives the source's logits,
    and the ranks wrote its tensor bytes once between them (lm_head too); both it and the
    DCP folder read back with load_sharded (and DCP's own load) as first loaded, the DCP
    folder on the meshes of other shapes too."""
    src = qwen3_10 if family == "qwen3_moe" else samples.save_model(
        samples.build_model(family), tmp_path / family)
    world = shapes[0][0] * shapes[0][1]
    spawn(sharded_workers.load_save_reload, world, tmp_path / "store", str(src),
          str(tmp_path), shapes)
    written = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(world)]
    source = load_all(src)
    ids = samples.sample_input(96)
    for at, (dp, ep) in enumerate(shapes):
        saved = tmp_path / f"{dp}x{ep}" / "safetensors"
        tensors = load_all(saved)
        assert tensors.keys() == source.keys()
        assert all(tensors[k].dtype == v.dtype and torch.equal(tensors[k], v)
                   for k, v in source.items())
        assert sum(w[at] for w in written) == sum(v.nbytes for v in source.values())
        assert (saved / "model.safetensors.index.json").is_file()
        assert (saved / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert torch.equal(samples.logits(saved, ids), samples.logits(src, ids))


def test_a_rank_that_cannot_write_or_holds_a_misplaced_tensor_fails_every_rank(qwen3_10,
                                                                              tmp_path):
    """Nothing is written, and every rank raises naming the rank and the cause (any error
    of a rank's planning included)."""
    spawn(sharded_workers.save_expecting_errors, 2, tmp_path / "store", str(qwen3_10),
          str(tmp_path))
    assert (tmp_path / "1.bug.txt").read_text() == "RuntimeError: a planner bug"
    assert (tmp_path / "0.bug.txt").read_text() == (
        "save_sharded failed on another rank: rank 1: a planner bug")
    for rank in range(2):
        write = (tmp_path / f"{rank}.write.txt").read_text()
        assert write == "save_sharded failed, nothing was written: rank 1: disk full"
        placement = (tmp_path / f"{rank}.placement.txt").read_text()
        assert placement.endswith("model.layers.0.mlp.experts.down_proj: this rank holds 4 "
                                  "of its 10 rows; torch.chunk's rule gives it rows 5-9")
        assert placement.startswith("save_sharded failed on another rank: rank 1: ") == \
            (rank == 0)
        gap = (tmp_path / f"{rank}.gap.txt").read_text()
        assert gap.startswith("save_sharded: the ranks would write ") and gap.endswith(
            ", where each must be written by exactly one rank; nothing was written"), gap
        assert (tmp_path / f"{rank}.dp.txt").read_text().startswith(
            "model.layers.1.mlp.experts.gate_up_proj holds experts but is sharded over dp")
    assert not [p for p in tmp_path.iterdir()
                if p.name.startswith((".", "bug", "written", "placed", "gap", "over-dp"))]


def test_ranks_that_would_hold_different_state_dicts_are_refused(qwen3_10, tmp_path):
    """Every rank plans the files from its own state dict: ranks that differ in a key or in
    how they hold a tensor would write at places the others did not plan. Ranks that
    would load different tensors or hold one differently would gather pieces of
    different sizes. Each rank raises naming the difference, and nothing is written."""
    other = samples.save_model(samples.build_model("qwen3_moe", num_experts=N_EXPERTS,
                                                   vocab_size=80), tmp_path / "other")
    spawn(sharded_workers.disagreeing_ranks, 2, tmp_path / "store", str(qwen3_10),
          str(tmp_path), str(other))
    for rank in range(2):
        outcomes = json.loads((tmp_path / f"{rank}.json").read_text())
        assert outcomes["missing"] == (
            "save_sharded: the ranks hold different state dicts (every rank must hold the "
            "keys load_sharded gives, each with the same dtype, global shape and placement): "
            "rank 1 lacks lm_head.weight, which rank 0 holds")
        assert outcomes["placement"] == (
            "save_sharded: the ranks hold different state dicts (every rank must hold the "
            "keys load_sharded gives, each with the same dtype, global shape and placement): "
            "rank 1 holds lm_head.weight as float32 [96, 32] whole, rank 0 as float32 "
            "[96, 32] [Shard(dim=0)] on ('dp',)")
        loading = ("load_sharded: the ranks would hold different state dicts (every rank "
                   "must read the same checkpoint, in the same layout, with the same "
                   "replicate patterns): ")
        assert outcomes["load-replicate"] == loading + (
            "rank 1 holds lm_head.weight as float32 [96, 32] whole, rank 0 as float32 "
            "[96, 32] Shard(0) over dp")
        assert outcomes["load-copy"] == loading + (
            "rank 1 holds lm_head.weight as float32 [80, 32] Shard(0) over dp, rank 0 as "
            "float32 [96, 32] Shard(0) over dp")
        assert outcomes["save-experts"].startswith(
            "lm_head.weight is a DTensor on the mesh DeviceMesh((dp=1)")
        assert outcomes["shard-size"] == ("save_sharded: the ranks were called with different "
                                          "arguments: rank 1 passed max_shard_size as 20000, "
                                          "rank 0 as 5000000000")
        assert outcomes["load-dims"] == ("load_sharded: the ranks were called with different "
                                         "arguments: rank 1 passed ep_dim as 'dp', rank 0 as "
                                         "'ep'")
    assert not [p for p in tmp_path.iterdir()
                if p.name.startswith((".", "missing", "placement", "shard-size", "experts"))]


def test_a_shard_changed_while_one_rank_reads_or_experts_to_replicate_fail_every_rank(
        qwen3_10, tmp_path):
    """A rank that fails reading its part, or planning it with any error, leaves no other
    waiting to gather pieces from it: every rank raises naming the file (or the error)
    and the rank, and the next load works. A
    ``replicate`` pattern that matches expert tensors (which are sharded over ep whatever
    it says) is refused, naming the pattern and a tensor it matches."""
    import shutil

    src = shutil.copytree(qwen3_10, tmp_path / "changing")
    spawn(sharded_workers.failing_loads, 2, tmp_path / "store", str(src), str(tmp_path))
    outcomes = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert outcomes[1]["changed"].startswith(f"{src}/model-")
    assert "changed since moekit read its header" in outcomes[1]["changed"]
    assert outcomes[0]["changed"] == "load_sharded failed on another rank: rank 1: " + \
        outcomes[1]["changed"]
    assert outcomes[1]["bug"] == "RuntimeError: a planner bug"
    assert outcomes[0]["bug"] == "load_sharded failed on another rank: rank 1: a planner bug"
    assert [o["again"] for o in outcomes] == ["ok", "ok"]
    for outcome in outcomes:
        assert outcome["replicate"] == (
            "load_sharded: the replicate pattern '*.mlp.*' matches "
            "model.layers.0.mlp.experts.down_proj, an expert tensor: expert tensors are "
            "Shard(0) over the ep dimension (whole on every rank of a mesh whose ep "
            "dimension has size 1); name only other tensors")
