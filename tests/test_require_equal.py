"""The ``RequireEqual`` recipe node on small tensors (milliseconds): the kept tensor is
written only when its copy holds the same bytes, compared as integers of the elements'
width, so that a NaN equals its own bit pattern and -0.0 does not equal 0.0 (where
``torch.equal`` says the reverse of both)."""

from __future__ import annotations

import pytest
import torch

from moekit.errors import MoekitError
from moekit.executors.evaluate import materialize
from moekit.plan import Read, RequireEqual, describe, reads
from moekit.sources import DictSource

KEPT, COPY = "model.embed_tokens.weight", "model.layers.3.embed_tokens.weight"


def _node(kept: torch.Tensor, copy: torch.Tensor) -> RequireEqual:
    return RequireEqual(Read(KEPT, (), tuple(kept.shape), "F32"),
                        Read(COPY, (), tuple(copy.shape), "F32"), (KEPT, COPY),
                        "the destination holds the copy only as the kept tensor")


def _built(kept: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
    return materialize(_node(kept, copy), DictSource({KEPT: kept, COPY: copy}))


def test_a_copy_with_the_same_bytes_gives_the_kept_tensor_nan_included():
    kept = torch.arange(12, dtype=torch.float32).view(3, 4)
    kept[1, 2] = float("nan")
    built = _built(kept, kept.clone())
    assert torch.equal(built.view(torch.int32), kept.view(torch.int32))


def test_copies_whose_negation_torch_keeps_lazy_are_compared_by_their_values():
    """A kept tensor or copy held negated with torch's neg bit set (``x._neg_view()``):
    compared as the values it holds, which torch refuses to view as integers."""
    kept = torch.arange(12, dtype=torch.float32).view(3, 4)
    built = _built((-kept)._neg_view(), (-kept)._neg_view())
    assert torch.equal(built.view(torch.int32), kept.view(torch.int32))
    with pytest.raises(MoekitError, match=f"{COPY} differs from {KEPT}"):
        _built(kept, kept._neg_view())


@pytest.mark.parametrize("changed", [1.0, -0.0], ids=["value", "sign_of_zero"])
def test_a_copy_whose_bytes_differ_is_refused_naming_both(changed):
    kept = torch.arange(12, dtype=torch.float32).view(3, 4)
    copy = kept.clone()
    copy[0, 0] = changed
    with pytest.raises(MoekitError, match=f"{COPY} differs from {KEPT}: the destination holds"):
        _built(kept, copy)


def test_the_node_reads_both_tensors_and_shows_the_check():
    node = _node(torch.zeros(2, 2), torch.zeros(2, 2))
    assert [read.key for read in reads(node)] == [KEPT, COPY]
    assert describe(node) == f"{KEPT} if == {COPY}"


@pytest.mark.parametrize("stacked", [False, True])
def test_bool_copies_are_compared_by_their_bytes_on_every_executor(stacked, tmp_path):
    """bool elements move as uint8 (a byte 2 stays 2): the copy built as bool and the kept
    tensor moved as uint8 are one dtype of the plan, compared byte for byte, whether read
    whole or built (stacked) by the torch, file and streaming executors."""
    from safetensors.torch import load_file, save_file

    from moekit.checkpoint import Checkpoint
    from moekit.executors.device import load_to_device
    from moekit.executors.memory import run_plan
    from moekit.executors.streaming import write_shard
    from moekit.plan import Plan, Stack, TensorPlan
    from moekit.sources import FileSource

    kept = torch.tensor([True, False, True])
    save_file({KEPT: kept, COPY: kept.clone()}, tmp_path / "model.safetensors")
    parts = [Read(key, (), (3,), "BOOL") for key in (KEPT, COPY)]
    if stacked:
        parts = [Stack((part,)) for part in parts]
    plan = Plan("test", "", "", [TensorPlan("x", RequireEqual(*parts, (KEPT, COPY), "why"))])
    checkpoint = Checkpoint.open(tmp_path)
    expected = kept.view(1, 3) if stacked else kept
    with FileSource(checkpoint) as source:
        assert torch.equal(run_plan(plan, source)["x"], expected)
        write_shard(tmp_path / "out.safetensors", plan.tensors, source, {"format": "pt"})
    assert torch.equal(load_file(tmp_path / "out.safetensors")["x"], expected)
    assert torch.equal(load_to_device(plan, checkpoint, "cpu", readers=1)["x"], expected)
