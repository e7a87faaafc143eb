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
