"""Expert parallelism on CPU with gloo: world sizes 1-4 over 10 experts, a 2x2 mesh."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from moekit import MoekitError, expert_range, samples, save_experts

from . import ep_workers
from .ep_workers import spawn
from .conftest import load_all, same_bytes


@pytest.fixture(scope="module")
def qwen3_10(tmp_path_factory):
    """A tiny Qwen3-MoE with 10 experts, in several shards."""
    model = samples.build_model("qwen3_moe", num_experts=10)
    return samples.save_model(model, tmp_path_factory.mktemp("ep") / "qwen3-10")


def left_in(folder) -> list[str]:
    """What a run left in ``folder`` (``spawn`` removes its rendezvous file)."""
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("n_experts,size", [(10, 1), (10, 3), (10, 4), (5, 4), (7, 7), (128, 6)])
def test_expert_range_covers_every_expert_once_like_torch_chunk(n_experts, size):
    ranges = [expert_range(n_experts, size, r) for r in range(size)]
    assert [e for r in ranges for e in r] == list(range(n_experts))
    chunks = torch.arange(n_experts).chunk(size)
    assert [list(r) for r in ranges if r] == [c.tolist() for c in chunks]


def test_expert_range_refuses_more_ranks_than_experts():
    with pytest.raises(MoekitError, match="at most one rank per expert"):
        expert_range(4, 5, 0)


def test_a_rank_that_owns_no_expert_holds_zero_row_shards(tmp_path):
    """5 experts on 4 ranks: 2, 2, 1, 0. The last rank's grouped tensors are [0, ...]
    local shards of the full DTensors, and saving from it works like from any other."""
    src = samples.save_model(samples.build_model("qwen3_moe", num_experts=5), tmp_path / "q5")
    out = tmp_path / "saved"
    spawn(ep_workers.load_check_save, 4, tmp_path, str(src), str(out), (4,), ("ep",), "vllm")
    original, saved = load_all(src), load_all(out)
    assert original.keys() == saved.keys()
    assert all(same_bytes(original[k], saved[k]) for k in original)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_load_and_save_on_an_ep_group(world, qwen3_10, tmp_path):
    out = tmp_path / "saved"
    spawn(ep_workers.load_check_save, world, tmp_path, str(qwen3_10), str(out), (world,),
          ("ep",), "nemo")
    original, saved = load_all(qwen3_10), load_all(out)
    assert original.keys() == saved.keys()
    assert all(same_bytes(original[k], saved[k]) for k in original)
    ids = samples.sample_input(96)
    assert torch.equal(samples.logits(out, ids), samples.logits(qwen3_10, ids))
    assert left_in(tmp_path) == ["saved"]


def test_ranks_load_a_checkpoint_without_config_by_the_config_named(qwen3_10, tmp_path):
    # A torchtitan folder holds no config.json, and its names need one to be read.
    from moekit import convert

    titan = tmp_path / "titan"
    convert(qwen3_10, titan, to="torchtitan")
    (titan / "config.json").unlink()
    codes = spawn(ep_workers.load_by_config, 2, tmp_path, str(titan),
                  str(qwen3_10 / "config.json"), str(qwen3_10), join=False)
    assert codes == [0, 0]
    assert not (titan / "config.json").exists()


def test_dp_by_ep_mesh(qwen3_10, tmp_path):
    out = tmp_path / "saved"
    spawn(ep_workers.load_check_save, 4, tmp_path, str(qwen3_10), str(out), (2, 2),
          ("dp", "ep"), "transformers")
    original, saved = load_all(qwen3_10), load_all(out)
    assert all(same_bytes(original[k], saved[k]) for k in original)


@pytest.mark.parametrize("layout", ["hf", "vllm"])
def test_a_rank_reads_only_its_own_experts(layout, qwen3_10, tmp_path):
    src = qwen3_10
    if layout != "hf":
        from moekit import convert

        src = tmp_path / layout
        convert(qwen3_10, src, to=layout)
    spawn(ep_workers.load_recording_reads, 3, tmp_path, str(src), str(tmp_path))
    for rank in range(3):
        asked = json.loads((tmp_path / f"{rank}.json").read_text())
        assert asked == list(expert_range(10, 3, rank))


def test_a_missing_expert_fails_its_rank_clearly_and_no_other(qwen3_10, tmp_path):
    import shutil

    from .test_bad_input import edit_checkpoint

    src = shutil.copytree(qwen3_10, tmp_path / "broken")
    edit_checkpoint(src, lambda t: {k: v for k, v in t.items()
                                    if "layers.2.mlp.experts.9.down_proj" not in k})
    spawn(ep_workers.load_expecting_error, 4, tmp_path, str(src), str(tmp_path))
    outcomes = [(tmp_path / f"{r}.txt").read_text() for r in range(4)]
    assert outcomes[:3] == ["ok"] * 3
    assert "EP rank 3 of 4 (experts 9-9)" in outcomes[3]
    assert "layer 2: expert 9 lacks down_proj" in outcomes[3]


def test_a_rank_that_cannot_plan_its_save_fails_every_rank(qwen3_10, tmp_path):
    """A state dict that differs on one rank is found before any collective of the write:
    every rank raises naming the difference, none waits forever, nothing is written."""
    out = tmp_path / "saved"
    spawn(ep_workers.save_with_a_state_dict_broken_on_rank_1, 3, tmp_path, str(qwen3_10),
          str(out), str(tmp_path))
    outcomes = {(tmp_path / f"{r}.txt").read_text() for r in range(3)}
    assert outcomes == {
        "save_experts: the ranks hold different state dicts (every rank must hold the keys "
        "load_experts gives, each with the same dtype, global shape and placement): rank 1 "
        "lacks model.layers.0.mlp.experts.down_projs, which rank 0 holds"}
    assert not out.exists()


@pytest.mark.parametrize("case,said", [
    ("experts", "save_experts: the ranks hold different state dicts (every rank must hold "
                "the keys load_experts gives, each with the same dtype, global shape and "
                "placement): rank 1 holds model.layers.0.mlp.experts.down_projs as float32 "
                "[9, 16, 32] [Shard(dim=0)] on ('ep',), rank 0 as float32 [10, 16, 32] "
                "[Shard(dim=0)] on ('ep',)"),
    ("format", "save_experts: the ranks were called with different arguments: rank 1 passed "
               "format as 'dcp', rank 0 as 'safetensors'"),
    ("path", "save_experts: the ranks were called with different arguments: rank 1 passed "
             "path as "),
    ("unknown-format", "save_experts: the ranks were called with different arguments: rank 1 "
                       "passed format as 'DCP', rank 0 as 'safetensors'"),
])
def test_ranks_that_save_different_things_or_in_different_ways_are_refused(
        qwen3_10, tmp_path, case, said):
    """Each rank plans the whole output by its own state dict and arguments: rank 1 holding
    one expert less, or asked for another format or folder, would write experts twice or
    not at all, or wait for collectives the others never make; one that refuses its own
    format would leave the others waiting."""
    out = tmp_path / "saved"
    spawn(ep_workers.save_differently_on_rank_1, 2, tmp_path, str(qwen3_10), str(out),
          str(tmp_path), case)
    outcomes = {(tmp_path / f"{r}.txt").read_text() for r in range(2)}
    assert len(outcomes) == 1 and outcomes.pop().startswith(said)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".saved", "saved"))]


def test_a_planner_bug_on_one_rank_fails_every_rank_of_save_experts(qwen3_10, tmp_path):
    spawn(ep_workers.save_with_a_planner_bug_on_rank_1, 3, tmp_path, str(qwen3_10),
          str(tmp_path))
    outcomes = [(tmp_path / f"{r}.txt").read_text() for r in range(3)]
    assert outcomes[1] == "RuntimeError: a planner bug"
    assert outcomes[0] == outcomes[2] == (
        "save_experts failed, nothing was written: rank 1: a planner bug")
    assert not (tmp_path / "saved").exists()


def test_converting_a_ranks_dtensors_as_whole_tensors_is_refused(qwen3_10, tmp_path):
    spawn(ep_workers.convert_dtensors_expecting_error, 2, tmp_path, str(qwen3_10),
          str(tmp_path))
    for rank in range(2):
        message = (tmp_path / f"{rank}.txt").read_text()
        assert "is a DTensor (this rank's share" in message and "to_hf" in message
        message = (tmp_path / f"{rank}.from_hf.txt").read_text()
        assert "from_hf with a device_mesh needs the number of experts" in message


def test_save_experts_refuses_what_is_not_a_device_mesh(tmp_path):
    with pytest.raises(MoekitError, match="device_mesh is a NoneType"):
        save_experts({}, tmp_path / "out", None)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_leaves_nothing_on_any_rank(qwen3_10, tmp_path):
    out = tmp_path / "saved"
    spawn(ep_workers.save_failing_on_rank_1, 3, tmp_path, str(qwen3_10), str(out))
    assert left_in(tmp_path) == []


def test_a_failure_after_the_final_move_does_not_say_nothing_was_written(tmp_path, monkeypatch):
    from moekit import output as output_module
    from moekit.expert_parallel.save import _complete, _put_in_place

    dst = tmp_path / "out"
    folder = output_module.OutputFolder(dst)
    synced = output_module._fsync_dir

    def parent_fails(path):
        if path == tmp_path:
            raise OSError(5, "Input/output error", str(path))
        synced(path)

    monkeypatch.setattr(output_module, "_fsync_dir", parent_fails)
    message = _put_in_place(folder, [], lambda: _complete(folder, [], None))
    assert dst.is_dir() and "nothing was written" not in message
    assert f"wrote {dst}" in message


def test_a_rank_that_leaves_leaves_no_process_it_started_and_no_temporary_file(tmp_path):
    ep_workers.spawn(ep_workers.start_a_manager, 2, tmp_path, str(tmp_path / "manager"))
    for rank in range(2):
        manager = json.loads((tmp_path / f"manager.{rank}").read_text())
        with pytest.raises(ProcessLookupError):  # ended, and reaped by its rank
            os.kill(manager["pid"], 0)
        assert not Path(manager["address"]).exists()  # its server stopped cleanly: socket removed
