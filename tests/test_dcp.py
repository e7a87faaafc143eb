"""torch.distributed.checkpoint output: the folder moekit writes is read with DCP's own
reader (``FileSystemReader``, ``dcp.load``) into the state dict transformers' model has."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import moekit
from moekit import dcp as moekit_dcp
from moekit import samples
from moekit.cli import main
from moekit.errors import MoekitError
from moekit.upcycling import UpcycleSpec, upcycle

from .conftest import load_all, same_bytes

SHARD = 60 * 1024
"""The --max-shard-size of these tests: several .distcp files for the tiny models."""

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning")  # dcp.load on one process says so


def dcp_state_dict(folder: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``like``'s keys loaded from the DCP folder with DCP's reader, strictly: the folder
    holds exactly these keys with these shapes and dtypes."""
    metadata = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    assert metadata.keys() == like.keys()
    for key, value in like.items():
        assert (tuple(metadata[key].size), metadata[key].properties.dtype) == \
            (tuple(value.shape), value.dtype), key
    loaded = {key: torch.full_like(value, 7) for key, value in like.items()}
    dcp.load(loaded, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
    return loaded


def test_a_dcp_folder_holds_the_transformers_models_state_dict(family_checkpoints,
                                                               family_models, tmp_path):
    out = tmp_path / "dcp"
    assert main(["convert", str(family_checkpoints["qwen3_moe"]), str(out), "--to",
                 "transformers", "--format", "dcp", "--max-shard-size", str(SHARD)]) == 0
    data_files = sorted(out.glob("*.distcp"))
    assert len(data_files) > 1 and (out / ".metadata").is_file()
    assert (out / "config.json").is_file()
    expected = family_models["qwen3_moe"].state_dict()
    loaded = dcp_state_dict(out, expected)
    assert all(same_bytes(loaded[key], expected[key]) for key in expected)


def test_tensors_are_built_as_dcp_writes_them(family_checkpoints, tmp_path, monkeypatch):
    """Memory holds the tensors of one .distcp file at a time (DCP keeps a file's tensors
    until the file is closed), never the whole model."""
    built: list[tuple[weakref.ref, int]] = []
    live_peak = [0]
    materialize = moekit_dcp.materialize

    def tracked(recipe, source):
        tensor = materialize(recipe, source)
        live = sum(size for ref, size in built if ref() is not None)
        live_peak[0] = max(live_peak[0], live + tensor.nbytes)
        built.append((weakref.ref(tensor), tensor.nbytes))
        return tensor

    monkeypatch.setattr(moekit_dcp, "materialize", tracked)
    shard = 20 * 1024
    assert main(["convert", str(family_checkpoints["qwen3_moe"]), str(tmp_path / "dcp"),
                 "--to", "nemo", "--format", "dcp", "--max-shard-size", str(shard)]) == 0
    total = sum(size for _, size in built)
    largest = max(size for _, size in built)
    assert total > 4 * shard
    assert live_peak[0] <= shard + largest


def test_an_upcycled_model_written_to_dcp_holds_the_shards_tensors(tmp_path):
    dense = samples.save_model(samples.build_model("qwen3", seed=3), tmp_path / "dense")
    spec = UpcycleSpec(experts=4, top_k=2, method="drop", drop_ratio=0.5)
    upcycle(dense, tmp_path / "shards", spec, max_shard_size=SHARD)
    upcycle(dense, tmp_path / "dcp", spec, max_shard_size=SHARD, format="dcp")
    expected = load_all(tmp_path / "shards")
    loaded = dcp_state_dict(tmp_path / "dcp", expected)
    assert all(same_bytes(loaded[key], expected[key]) for key in expected)
    assert (tmp_path / "dcp" / "config.json").read_bytes() == \
        (tmp_path / "shards" / "config.json").read_bytes()


def test_an_unknown_format_is_refused_before_anything_is_written(qwen3, tmp_path):
    with pytest.raises(MoekitError, match="unknown output format 'zarr'"):
        moekit.convert(qwen3, tmp_path / "out", to="nemo", format="zarr")
    assert not (tmp_path / "out").exists()
