"""``save_experts(..., format="dcp")`` and ``load_experts`` of a DCP folder, on gloo
ranks: each rank writes its own ``Shard(0)`` expert rows with DCP's own save, the folder
converts back to the HF checkpoint byte for byte, and loading from it gives each rank
what loading from the safetensors checkpoint gives."""

from __future__ import annotations

import json
import math
import pickle
import random

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import MetadataIndex

from moekit import MoekitError, convert, expert_range, load, samples
from moekit.cli import main
from moekit.executors.device import load_to_device, read_plan
from moekit.inspection import inspect
from moekit.layouts import layout_named
from moekit.expert_parallel.ranges import rank_plan
from moekit.planner import analyse_checkpoint, build_plan

from . import ep_workers
from .ep_workers import spawn
from .conftest import load_all, same_bytes

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning")  # DCP's reader on one process says so

@pytest.fixture(scope="module")
def qwen3_10(tmp_path_factory):
    """A tiny Qwen3-MoE with 10 experts."""
    model = samples.build_model("qwen3_moe", num_experts=10)
    return samples.save_model(model, tmp_path_factory.mktemp("ep-dcp") / "qwen3-10")


def same_checkpoint(a, b) -> bool:
    original, other = load_all(a), load_all(b)
    return original.keys() == other.keys() and all(
        same_bytes(original[k], other[k]) for k in original)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_each_rank_saves_its_rows_to_dcp_and_the_folder_reads_back(world, qwen3_10, tmp_path):
    """10 experts on 1-4 ranks (3 and 4: uneven shares): one DCP folder whose expert
    tensors are the ranks' row chunks; it converts back to the source byte for byte, and
    each rank loads from it what it loads from the source, reading its own experts."""
    out, back = tmp_path / "dcp", tmp_path / "back"
    spawn(ep_workers.save_dcp_and_load, world, tmp_path, str(qwen3_10), str(out), "nemo",
          str(tmp_path))
    assert (out / "config.json").read_bytes() == (qwen3_10 / "config.json").read_bytes()
    metadata = dcp.FileSystemReader(out).read_metadata().state_dict_metadata
    owners = [r for r in range(world) if expert_range(10, world, r)]
    chunks = [len(entry.chunks) for key, entry in metadata.items() if ".experts." in key]
    assert chunks and set(chunks) == {len(owners)}
    assert main(["convert", str(out), str(back), "--to", "hf"]) == 0
    assert same_checkpoint(qwen3_10, back)
    grouped, back_again = tmp_path / "grouped", tmp_path / "back-again"
    assert main(["convert", str(out), str(grouped), "--to", "nemo"]) == 0  # whole tensors
    assert main(["convert", str(grouped), str(back_again), "--to", "hf"]) == 0
    assert same_checkpoint(qwen3_10, back_again)
    for rank in range(world):
        asked = json.loads((tmp_path / f"{rank}.json").read_text())
        assert asked == [list(expert_range(10, world, rank))]
    if len(owners) > 1:
        staged_as_read(out)


def staged_as_read(folder) -> None:
    """The device executor's staging (on the CPU here) loads a folder whose tensors ranks
    saved in row chunks, each chunk staged as a tensor of its own and the rows joined by
    the recipe (``_rows_as_blocks``), into the bytes the CPU path reads: whole, and one
    expert-parallel rank's experts (a part of each chunked tensor)."""
    checkpoint, analysis = analyse_checkpoint(folder)
    for plan in (build_plan(analysis, layout_named("nemo")), rank_plan(analysis, 3, 1, "nemo")):
        staged = load_to_device(plan, checkpoint, "cpu", readers=2, chunk_bytes=1000)
        read = read_plan(plan, checkpoint)
        assert staged.keys() == read.keys()
        assert all(same_bytes(staged[key], read[key]) for key in read)


def test_load_experts_of_converted_dcp_folders(qwen3_10, tmp_path):
    """Folders ``convert --format dcp`` wrote (tensors whole, one process; per-expert and
    grouped) load on 3 ranks as the safetensors checkpoint does, each rank reading its own
    experts."""
    folders = [tmp_path / layout for layout in ("hf", "transformers")]
    for folder in folders:
        convert(qwen3_10, folder, to=folder.name, format="dcp", max_shard_size=60 * 1024)
    spawn(ep_workers.load_dcp_like_safetensors, 3, tmp_path, [str(f) for f in folders],
          str(qwen3_10), "nemo", str(tmp_path))
    for rank in range(3):
        asked = json.loads((tmp_path / f"{rank}.json").read_text())
        assert asked == [list(expert_range(10, 3, rank))] * 2


def test_a_dcp_save_failing_on_one_rank_fails_every_rank_and_leaves_nothing(qwen3_10,
                                                                           tmp_path):
    out = tmp_path / "dcp"
    spawn(ep_workers.save_dcp_failing_on_rank_1, 3, tmp_path, str(qwen3_10), str(out),
          str(tmp_path))
    outcomes = [(tmp_path / f"{r}.txt").read_text() for r in range(3)]
    assert all(text.startswith("save_experts failed, nothing was written: ")
               and "rank 1: disk full" in text for text in outcomes), outcomes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.txt", "1.txt", "2.txt"]


@pytest.mark.parametrize("format", ["dcp", "safetensors"])
def test_views_whose_bytes_are_not_their_values_are_saved_as_their_values(qwen3_10, tmp_path,
                                                                         format):
    """Tensors with torch's neg bit set (``x._neg_view()``, ``z.conj().imag``), expanded
    (stride 0) or transposed, experts' shards on two ranks and others: saved as their
    values, so that the folder reads back (in moekit, and in DCP's own reader) equal bit
    for bit."""
    out = tmp_path / "out"
    spawn(ep_workers.save_lazy_views, 2, tmp_path, str(qwen3_10), str(out), format,
          str(tmp_path))
    expected = torch.load(tmp_path / "expected.pt")
    back = load(out, layout="nemo")
    assert back.keys() == expected.keys()
    assert all(same_bytes(back[key], expected[key]) for key in expected)
    if format == "dcp":
        theirs = {key: torch.empty_like(value) for key, value in expected.items()}
        dcp.load(theirs, storage_reader=dcp.FileSystemReader(out), no_dist=True)
        assert all(same_bytes(theirs[key], expected[key]) for key in expected)


def test_an_unknown_save_format_is_refused(tmp_path):
    from moekit import MoekitError, save_experts

    with pytest.raises(MoekitError, match="unknown save_experts format 'zarr'"):
        save_experts({}, tmp_path / "out", None, format="zarr")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("world", [3, 4], ids=["tp=3", "dp=2 x tp=2"])
def test_a_tensor_parallel_dcp_folder_reads_as_the_model_it_holds(qwen3_10, tmp_path, world):
    """A DCP folder saved by tensor-parallel ranks, its matrices split into columns (on 3
    ranks unevenly), and on a 2 x 2 mesh into rows and columns: what moekit reads,
    converts to HF files and loads in nemo layout (through the device executor's staging
    too, on the CPU) equals the source tensors and what DCP's own reader assembles, bit
    for bit."""
    out = tmp_path / "tp"
    spawn(ep_workers.save_tensor_parallel, world, tmp_path, str(qwen3_10), str(out))
    source = load_all(qwen3_10)
    theirs = {key: torch.empty_like(value) for key, value in source.items()}
    dcp.load(theirs, storage_reader=dcp.FileSystemReader(out), no_dist=True)
    assert all(same_bytes(theirs[key], source[key]) for key in source)
    assert inspect(out).n_tensors == len(source)  # the model's tensors, not its blocks
    assert main(["convert", str(out), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert same_checkpoint(qwen3_10, tmp_path / "hf")
    expected = load(qwen3_10, "nemo")
    loads = [load(out, "nemo")]
    if world == 3:  # no tensor in row chunks: the device executor's staging reads it
        checkpoint, analysis = analyse_checkpoint(out)
        loads.append(load_to_device(build_plan(analysis, layout_named("nemo")), checkpoint,
                                    "cpu", readers=2))
    for nemo in loads:
        assert nemo.keys() == expected.keys()
        assert all(same_bytes(nemo[key], expected[key]) for key in expected)

@pytest.mark.parametrize("world,fsdp", [(2, True), (3, False), (4, False)],
                         ids=["fsdp=2", "tp=3", "dp=2 x tp=2"])
def test_safetensors_files_saved_one_a_rank_read_as_the_model_they_hold(qwen3_10, tmp_path,
                                                                        world, fsdp):
    """Safetensors files that ranks saved with DCP's HuggingFaceStorageWriter, each its
    chunks of every tensor (NeMo AutoModel's unconsolidated checkpoints), with no index:
    rows split over 2 ranks as FSDP2 does, columns over 3 unevenly, or rows and columns on
    a 2 x 2 mesh. What moekit reads, converts to HF files and loads in nemo layout equals
    the source tensors and what DCP's own HuggingFaceStorageReader assembles, bit for bit."""
    out = tmp_path / "sharded"
    spawn(ep_workers.save_tensor_parallel, world, tmp_path, str(qwen3_10), str(out), "hf", fsdp)
    assert len(list(out.glob("*.safetensors"))) == world
    source = load_all(qwen3_10)
    theirs = {key: torch.empty_like(value) for key, value in source.items()}
    dcp.load(theirs, storage_reader=dcp.HuggingFaceStorageReader(str(out)), no_dist=True)
    assert all(same_bytes(theirs[key], source[key]) for key in source)
    assert inspect(out).n_tensors == len(source)
    assert main(["convert", str(out), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert same_checkpoint(qwen3_10, tmp_path / "hf")
    expected, nemo = load(qwen3_10, "nemo"), load(out, "nemo")
    assert nemo.keys() == expected.keys()
    assert all(same_bytes(nemo[key], expected[key]) for key in expected)
    staged_as_read(out)


def test_a_nemo_automodel_checkpoint_saved_while_training_converts(qwen3_10, tmp_path):
    """NeMo AutoModel's own Checkpointer saves an FSDP2-sharded model unconsolidated, each
    rank its file of row chunks and the config in ``.hf_metadata``: moekit reads the
    ``model`` folder with that config, converts it to the same bytes as AutoModel's own
    consolidation (``consolidate_safetensors_files_on_every_rank``) and to the HF files it
    came from, and copies the generation config."""
    from nemo_automodel.components.checkpoint._backports.consolidate_hf_safetensors import (
        consolidate_safetensors_files_on_every_rank)

    step = tmp_path / "step-1"
    spawn(ep_workers.save_with_automodel, 2, tmp_path, str(qwen3_10), str(step))
    model = step / "model"
    consolidated = tmp_path / "consolidated"
    consolidated.mkdir()
    mapping = json.loads((model / ".hf_metadata" / "fqn_to_file_index_mapping.json").read_text())
    consolidate_safetensors_files_on_every_rank(str(model), str(consolidated), mapping)
    assert inspect(model).family == "qwen3_moe"
    with pytest.raises(MoekitError, match=f"its weights are in {model} .as NeMo AutoModel"):
        inspect(step)
    assert main(["convert", str(model), str(tmp_path / "transformers"), "--to",
                 "transformers"]) == 0
    assert same_checkpoint(consolidated, tmp_path / "transformers")
    assert main(["convert", str(model), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert same_checkpoint(qwen3_10, tmp_path / "hf")
    assert (tmp_path / "hf" / "generation_config.json").read_bytes() == (
        model / ".hf_metadata" / "generation_config.json").read_bytes()


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """A tiny GPT-OSS, whose HF files hold each layer's experts grouped."""
    return samples.save_model(samples.build_model("gpt_oss"),
                              tmp_path_factory.mktemp("ep-dcp") / "gpt-oss")


def test_grouped_experts_stored_in_blocks_are_read_in_part(gpt_oss, tmp_path):
    """GPT-OSS's grouped experts saved by tensor-parallel ranks (each [E, ...] tensor split
    along its dimension 1): a conversion reads each expert's part of the blocks, and gives
    the source's tensors bit for bit."""
    out = tmp_path / "tp"
    spawn(ep_workers.save_tensor_parallel, 2, tmp_path, str(gpt_oss), str(out))
    assert main(["convert", str(out), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert same_checkpoint(gpt_oss, tmp_path / "hf")
    for layout in ("nemo", "vllm"):
        expected, got = load(gpt_oss, layout), load(out, layout)
        assert got.keys() == expected.keys()
        assert all(same_bytes(got[key], expected[key]) for key in expected)


def test_what_cannot_read_tensors_stored_in_blocks_is_refused_up_front(tmp_path, capsys):
    """A dense model saved by tensor-parallel ranks: upcycled by splitting its MLP
    (granular) into the same bytes as from its HF files; Drop-Upcycling, whose redrawn
    rows take statistics of a whole stored tensor, and merge, which reads tensors by their
    stored names, refuse it naming it."""
    dense = samples.save_model(samples.build_model("qwen3"), tmp_path / "dense")
    out = tmp_path / "tp"
    spawn(ep_workers.save_tensor_parallel, 2, tmp_path, str(dense), str(out))
    for source, folder in ((dense, "from-hf"), (out, "from-tp")):
        assert main(["upcycle", str(source), str(tmp_path / folder), "--experts", "4",
                     "--method", "granular", "--granularity", "2", "--top-k", "2"]) == 0
    assert same_checkpoint(tmp_path / "from-hf", tmp_path / "from-tp")
    capsys.readouterr()
    assert main(["upcycle", str(out), str(tmp_path / "drop"), "--experts", "4",
                 "--method", "drop", "--top-k", "2"]) == 2
    assert "stores in pieces" in capsys.readouterr().err
    merge = tmp_path / "merge.yaml"
    merge.write_text(f"base_model: {out}\ngate_mode: random\ndtype: float32\nexperts:\n"
                     f"  - source_model: {dense}\n  - source_model: {dense}\n")
    assert main(["merge", str(merge), str(tmp_path / "merged")]) == 2
    assert "stores the model's tensors in pieces" in capsys.readouterr().err
    assert not (tmp_path / "drop").exists() and not (tmp_path / "merged").exists()


@pytest.mark.parametrize("rows, columns", [((0, 3, 5, 9), (0, 2, 7, 8)), ((0,), (0, 4)),
                                            ((0, 1), (0,))], ids=["uneven grid", "columns", "rows"])
def test_blocks_of_any_grid_assemble_into_their_tensor(rows, columns):
    """Blocks cut by any grid, in any order, assemble into the tensor they cut."""
    from moekit.chunks import assembled
    from moekit.executors.evaluate import materialize
    from moekit.plan import Read
    from moekit.sources import DictSource

    whole = torch.randn(10, 11)
    blocks, stored = [], {}
    for top, bottom in zip(rows, [*rows[1:], 10]):
        for left, right in zip(columns, [*columns[1:], 11]):
            name = f"w/chunk_{top}.{left}"
            stored[name] = whole[top:bottom, left:right].contiguous()
            blocks.append(((top, left), (bottom - top, right - left),
                           Read(name, (), tuple(stored[name].shape), "F32")))
    random.Random(0).shuffle(blocks)
    assert same_bytes(materialize(assembled(blocks, (0, 0), (10, 11), "w"),
                                  DictSource(stored)), whole)


def test_tensors_split_by_columns_with_empty_or_uneven_blocks_read_as_saved(tmp_path):
    """Tensors that three ranks saved split along their columns, one with no elements, one
    with fewer columns than ranks, one split unevenly: each reads as DCP's own reader
    assembles it and as it was saved."""
    from moekit.checkpoint import Checkpoint
    from moekit.executors.evaluate import materialize
    from moekit.plan import Read, composed
    from moekit.sources import FileSource

    out = tmp_path / "cols"
    spawn(ep_workers.save_split_by_columns, 3, tmp_path, str(out))
    whole = torch.load(tmp_path / "whole.pt")
    theirs = {key: torch.empty_like(value) for key, value in whole.items()}
    dcp.load(theirs, storage_reader=dcp.FileSystemReader(out), no_dist=True)
    checkpoint = Checkpoint.open(out)
    with FileSource(checkpoint) as source:
        for key, value in whole.items():
            recipe = composed(Read.whole(key, checkpoint.made[key]), checkpoint.made)
            got = materialize(recipe, source)
            assert same_bytes(got, value) and same_bytes(theirs[key], value), key


def test_blocks_cut_into_columns_then_rows_assemble_into_their_tensor():
    """Blocks that tile a tensor only when cut into columns first (each column then cut
    into rows where the other is not) assemble into it."""
    from moekit.chunks import assembled
    from moekit.executors.evaluate import materialize
    from moekit.plan import Read
    from moekit.sources import DictSource

    whole = torch.randn(4, 6)
    boxes = [((0, 0), (1, 3)), ((1, 0), (3, 3)), ((0, 3), (3, 3)), ((3, 3), (1, 3))]
    stored = {f"{r}.{c}": whole[r:r + h, c:c + w].contiguous() for (r, c), (h, w) in boxes}
    blocks = [(start, size, Read(f"{start[0]}.{start[1]}", (), size, "F32"))
              for start, size in boxes]
    assert same_bytes(materialize(assembled(blocks, (0, 0), (4, 6), "w"),
                                  DictSource(stored)), whole)


def test_any_part_of_a_tensor_stored_in_blocks_reads_the_blocks_it_reaches():
    """A region (ints, slices with steps, empty slices) of a tensor assembled from a grid
    of blocks is a recipe over the blocks giving exactly that region."""
    from moekit.chunks import assembled
    from moekit.executors.evaluate import materialize
    from moekit.plan import Read, composed
    from moekit.sources import DictSource

    rng = random.Random(0)
    for _ in range(300):
        shape = (rng.randint(1, 6), rng.randint(1, 6), rng.randint(1, 3))
        whole = torch.arange(math.prod(shape), dtype=torch.int32).view(shape)
        cuts = [[0, *sorted(rng.sample(range(1, n), min(2, n - 1)))] for n in shape[:2]]
        blocks, stored = [], {}
        for top, bottom in zip(cuts[0], [*cuts[0][1:], shape[0]]):
            for left, right in zip(cuts[1], [*cuts[1][1:], shape[1]]):
                stored[f"{top}.{left}"] = whole[top:bottom, left:right].contiguous()
                blocks.append(((top, left, 0), (bottom - top, right - left, shape[2]),
                               Read(f"{top}.{left}", (), tuple(stored[f"{top}.{left}"].shape),
                                    "I32")))
        region = tuple(rng.randrange(n) if rng.random() < 0.3 else slice(
            (a := rng.randint(0, n)), rng.randint(a, n), rng.randint(1, 3))
            for n in shape[:rng.randint(0, 3)])
        expected = whole[region]
        read = Read("w", region, tuple(expected.shape), "I32")
        recipe = composed(read, {"w": assembled(blocks, (0, 0, 0), shape, "w")})
        assert torch.equal(materialize(recipe, DictSource(stored)), expected), (shape, region)


@pytest.mark.parametrize("chunks,refusal", [
    ([((0, 0), (1, 6)), ((2, 0), (2, 6))], "row chunks that leave a gap or overlap"),
    ([((0, 0), (1, 6)), ((1, 0), (2, 6))], "its chunks hold 3 of its 4 rows"),
    ([((0, 0), (4, 3)), ((0, 2), (4, 3))], "its chunks do not tile it"),
    ([((0, 0), (4, 3)), ((1, 3), (3, 3))], "its chunks do not tile it"),
    ([((0, 0), (4, 3)), ((0, 3), (4, 3)), ((2, 0), (2, 3))], "its chunks do not tile it"),
    ([((0, 0), (4, 3)), ((0, 3), (4, 4))], "a chunk at [0, 3] of [4, 4] lies outside"),
])
def test_chunks_that_do_not_tile_the_tensor_are_refused(tmp_path, capsys, chunks, refusal):
    """A .metadata whose chunks of a tensor do not tile it (rows with a gap or missing,
    blocks that overlap, leave a gap or reach outside it) is refused naming the
    tensor."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    folder = tmp_path / "ckpt"
    dcp.save({"w": torch.randn(4, 6)}, checkpoint_id=folder, no_dist=True)
    metadata = dcp.FileSystemReader(folder).read_metadata()
    (index, info), = metadata.storage_data.items()
    metadata.state_dict_metadata["w"].chunks = [
        ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)) for offsets, sizes in chunks]
    metadata.storage_data = {MetadataIndex("w", offsets): info for offsets, _ in chunks}
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    code = main(["inspect", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and refusal in err and ".metadata: w" in err and "Traceback" not in err
