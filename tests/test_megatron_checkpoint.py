"""Megatron-Core ``torch_dist`` checkpoints written and read by moekit, against
megatron-core 0.16.1 itself: its strict ``dist_checkpointing.load`` into its GPTModel
(built on the CPU with gloo), its logits against transformers', and its own save of the
loaded model against moekit's folder."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from moekit import UpcycleSpec, load, samples, verify
from moekit.cli import main

pytest.importorskip("megatron.core")

from . import megatron_checkpoint_workers, megatron_workers  # noqa: E402
from .conftest import load_all  # noqa: E402

LOGITS_TOLERANCE = 1e-5
"""fp32 logits of megatron-core and transformers on the same weights and tokens differ by
rounding only (about 1e-7 here)."""


def _ids() -> torch.Tensor:
    return samples.sample_input(96)  # the sample models' vocabulary


def to_megatron(src: Path, out: Path) -> Path:
    assert main(["convert", str(src), str(out), "--to", "megatron"]) == 0
    return out


MODEL_TYPES = ("qwen3_moe", "mixtral", "qwen2_moe", "llama", "mistral", "qwen2", "qwen3")
"""Routed experts (Qwen3's per-head norms, Mixtral's w1/w2/w3, Qwen2-MoE's QKV biases,
gated shared expert, top-k weights not renormalised and a dense layer), and the dense
families upcycling reads (Qwen2's QKV biases)."""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path, Path]]:
    """By model type: a tiny transformers model (grouped query heads), its HF folder and
    the Megatron-Core folder moekit converts it into."""
    made = {}
    for model_type in MODEL_TYPES:
        model = samples.build_model(model_type, **(
            {"norm_topk_prob": True} if model_type == "qwen3_moe" else {}))
        root = tmp_path_factory.mktemp(model_type)
        hf = samples.save_model(model, root / "hf")
        made[model_type] = model, hf, to_megatron(hf, root / "megatron")
    return made


@pytest.fixture(scope="module")
def qwen3_moe(models) -> tuple[torch.nn.Module, Path, Path]:
    return models["qwen3_moe"]


UPCYCLED = {
    "copy": (["--method", "copy"], UpcycleSpec(4, 2, router="zero")),
    "granular": (["--method", "granular", "--granularity", "2"],
                 UpcycleSpec(4, 2, "granular", 2, router="zero")),
    "drop": (["--method", "drop", "--drop-ratio", "0.25", "--seed", "3"],
             UpcycleSpec(4, 2, "drop", drop_ratio=0.25, router="zero", seed=3)),
    "megatron_scaling": (["--method", "granular", "--granularity", "2", "--scaling", "megatron"],
                         UpcycleSpec(4, 2, "granular", 2, router="zero", scaling="megatron")),
    "shared_expert": (["--method", "copy", "--shared-expert", "--target", "qwen2_moe"],
                      UpcycleSpec(4, 2, router="zero", shared_expert=True)),
}
"""``moekit upcycle`` options, and the same upcycling as moekit's in-memory Megatron-Core
one runs it (a zero router: the in-memory one otherwise starts from the MoE model's own
random router rows). The shared expert's target is Qwen2-MoE: megatron-core's gated
shared expert (``moe_shared_expert_gate``)."""


@pytest.fixture(scope="module")
def upcycled(models, tmp_path_factory) -> list[tuple[str, UpcycleSpec]]:
    """The dense Llama's HF checkpoint upcycled by ``moekit upcycle --to megatron`` with
    each of ``UPCYCLED``: the folder, and the spec of the same in-memory upcycling."""
    root = tmp_path_factory.mktemp("upcycled")
    made = []
    for name, (options, spec) in UPCYCLED.items():
        out = root / name
        assert main(["upcycle", str(models["llama"][1]), str(out), "--experts", "4",
                     "--top-k", "2", "--router", "zero", "--to", "megatron", *options]) == 0
        made.append((str(out), spec))
    return made


QWEN3_UPCYCLE = ["--experts", "4", "--top-k", "2", "--method", "granular", "--granularity",
                 "2", "--router", "zero"]


@pytest.fixture(scope="module")
def upcycled_qwen3(models, tmp_path_factory) -> Path:
    """The dense Qwen3 (per-head q and k norms) upcycled by ``moekit upcycle --to
    megatron`` with ``QWEN3_UPCYCLE``."""
    out = tmp_path_factory.mktemp("upcycled_qwen3") / "megatron"
    assert main(["upcycle", str(models["qwen3"][1]), str(out), *QWEN3_UPCYCLE,
                 "--to", "megatron"]) == 0
    return out


@pytest.fixture(scope="module")
def loaded(models, upcycled, upcycled_qwen3, tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """By model type (and "upcycled_qwen3"): megatron-core's strict load of moekit's folder
    (logits, state dict), and the folder of megatron-core's own save of the loaded model;
    under "upcycled", what the worker finds of the ``upcycled`` folders against the
    in-memory upcycling of the dense Llama. One process for all (megatron-core imports
    slowly)."""
    names = (*MODEL_TYPES, "upcycled_qwen3")
    folders = [str(models[t][2]) for t in MODEL_TYPES] + [str(upcycled_qwen3)]
    result = megatron_workers.spawn(megatron_checkpoint_workers.load_and_run, 1,
                                    tmp_path_factory.mktemp("load"), folders,
                                    str(models["llama"][2]), upcycled, _ids())
    found = torch.load(result)
    return {"upcycled": found["upcycled"],
            **{name: (found[folder], Path(f"{result}.{n}.saved"))
               for n, (name, folder) in enumerate(zip(names, folders))}}


def test_the_folder_is_what_megatron_lm_loads(qwen3_moe):
    folder = qwen3_moe[2]
    assert (folder / "latest_checkpointed_iteration.txt").read_text() == "0"
    iteration = folder / "iter_0000000"
    assert json.loads((iteration / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert torch.load(iteration / "common.pt") == {"checkpoint_version": 3.0, "iteration": 0}
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen3_moe"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_megatron_core_loads_it_strictly_and_gives_transformers_logits(models, loaded,
                                                                       model_type):
    model = models[model_type][0]
    with torch.no_grad():
        theirs = model(_ids()).logits
    assert (loaded[model_type][0]["logits"] - theirs).abs().max() < LOGITS_TOLERANCE


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_megatron_cores_own_save_of_the_loaded_model_is_moekits_folder(models, loaded,
                                                                       model_type):
    """Same keys (every ``_extra_state`` included), shapes, dtypes, chunks and bytes."""
    assert_same_dcp_folders(models[model_type][2] / "iter_0000000", loaded[model_type][1])


def assert_same_dcp_folders(ours: Path, theirs: Path) -> None:
    """The DCP folders hold the same keys, types, shapes, dtypes, chunks and bytes."""
    mine = FileSystemReader(str(ours)).read_metadata().state_dict_metadata
    saved = FileSystemReader(str(theirs)).read_metadata().state_dict_metadata
    assert mine.keys() == saved.keys()
    for key, entry in saved.items():
        assert type(mine[key]) is type(entry), key
        if hasattr(entry, "chunks"):
            assert (mine[key].size, mine[key].properties.dtype) == \
                (entry.size, entry.properties.dtype), key
            assert sorted(map(_chunk, mine[key].chunks)) == sorted(map(_chunk, entry.chunks)), key
    assert _stored(ours) == _stored(theirs)


def _chunk(chunk) -> tuple:
    return tuple(chunk.offsets), tuple(chunk.sizes)


def _stored(folder: Path) -> dict[str, bytes]:
    """Every tensor and object of a DCP folder, as bytes (read by DCP itself)."""
    from torch.distributed.checkpoint import load

    metadata = FileSystemReader(str(folder)).read_metadata()
    state = {key: torch.empty(entry.size, dtype=entry.properties.dtype)
             for key, entry in metadata.state_dict_metadata.items() if hasattr(entry, "size")}
    load(state, storage_reader=FileSystemReader(str(folder)), no_dist=True)
    return {key: tensor.numpy().tobytes() for key, tensor in state.items()}


def test_each_megatron_tensor_is_the_transformers_tensor_it_holds(qwen3_moe, loaded):
    """Bit for bit, by Megatron-Core's layout written out with torch here: QKV by query
    group, fc1 = cat(gate, up), layers and experts numbered as transformers numbers them."""
    model, folder, _ = qwen3_moe
    hf = load_all(folder)
    state = loaded["qwen3_moe"][0]["state"]
    config = model.config
    groups = config.num_key_value_heads
    per_group = config.num_attention_heads // groups
    for layer in range(config.num_hidden_layers):
        at = f"model.layers.{layer}"
        mine = f"decoder.layers.{layer}"
        q, k, v = (hf[f"{at}.self_attn.{p}_proj.weight"] for p in "qkv")
        qkv = torch.cat([q.view(groups, per_group * config.head_dim, -1),
                         k.view(groups, config.head_dim, -1),
                         v.view(groups, config.head_dim, -1)], dim=1).flatten(0, 1)
        expected = {
            "self_attention.linear_qkv.weight": qkv,
            "self_attention.linear_proj.weight": hf[f"{at}.self_attn.o_proj.weight"],
            "self_attention.q_layernorm.weight": hf[f"{at}.self_attn.q_norm.weight"],
            "self_attention.k_layernorm.weight": hf[f"{at}.self_attn.k_norm.weight"],
            "input_layernorm.weight": hf[f"{at}.input_layernorm.weight"],
            "pre_mlp_layernorm.weight": hf[f"{at}.post_attention_layernorm.weight"],
            "mlp.router.weight": hf[f"{at}.mlp.gate.weight"],
        }
        for e in range(config.num_experts):
            expert = f"{at}.mlp.experts.{e}"
            ours = f"mlp.experts.local_experts.{e}"
            expected[f"{ours}.linear_fc1.weight"] = torch.cat(
                [hf[f"{expert}.gate_proj.weight"], hf[f"{expert}.up_proj.weight"]])
            expected[f"{ours}.linear_fc2.weight"] = hf[f"{expert}.down_proj.weight"]
        for name, tensor in expected.items():
            assert torch.equal(state[f"{mine}.{name}"], tensor), f"{mine}.{name}"
    for name, theirs in (("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                         ("decoder.final_layernorm.weight", "model.norm.weight"),
                         ("output_layer.weight", "lm_head.weight")):
        assert torch.equal(state[name], hf[theirs]), name


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_megatron_to_hf_is_byte_identical_and_transformers_loads_it(models, model_type,
                                                                     tmp_path):
    """The folder is recognised without --from."""
    assert_back_to_hf(*models[model_type], tmp_path / "back")


def assert_back_to_hf(model, hf: Path, folder: Path, back: Path) -> None:
    """``convert FOLDER BACK --to hf`` gives ``hf``'s tensors byte for byte, and
    transformers' logits of ``back`` are ``model``'s."""
    assert main(["convert", str(folder), str(back), "--to", "hf"]) == 0
    original, returned = load_all(hf), load_all(back)
    assert original.keys() == returned.keys()
    for key, tensor in original.items():
        assert returned[key].dtype == tensor.dtype and torch.equal(returned[key], tensor), key
    with torch.no_grad():
        assert torch.equal(samples.logits(back, _ids()), model(_ids()).logits)


def test_inspect_verify_and_dry_run_recognise_the_folder(qwen3_moe, tmp_path, capsys):
    _, hf, folder = qwen3_moe
    assert main(["inspect", str(folder), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["family"], shown["layout"]) == ("qwen3_moe", "megatron")
    assert main(["verify", str(hf), str(folder)]) == 0
    assert "bit-identical" in capsys.readouterr().out
    assert main(["convert", str(folder), str(tmp_path / "x"), "--to", "nemo", "--dry-run"]) == 0
    assert "megatron -> nemo" in capsys.readouterr().out
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command,said", [
    (("convert", "--to", "megatron", "--format", "dcp"),
     "the megatron layout stores decoder.layers.self_attention.linear_qkv.layer_norm_weight in "
     "chunks, which --format dcp cannot hold: write it with --format megatron"),
    (("convert", "--to", "megatron", "--format", "safetensors"), "which --format safetensors "
     "cannot hold: write it with --format megatron"),
    (("convert", "--to", "nemo", "--format", "megatron"),
     "--format megatron writes the megatron layout, not nemo"),
    (("upcycle", "--experts", "4", "--top-k", "2", "--to", "megatron", "--format", "dcp"),
     "which --format dcp cannot hold"),
])
@pytest.mark.parametrize("dry_run", [(), ("--dry-run",)])
def test_a_format_that_cannot_hold_the_layout_is_refused_before_anything_is_written(
        qwen3_moe, tmp_path, capsys, command, said, dry_run):
    """A dry run refuses what the run would: the check is the sink's, made before the
    destination is touched."""
    src = qwen3_moe[1] if command[0] == "convert" else samples.save_model(
        samples.build_model("qwen3"), tmp_path / "dense")
    code = main([command[0], str(src), str(tmp_path / "out"), *command[1:], *dry_run])
    err = capsys.readouterr().err
    assert code == 2 and said in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type,layers", [("qwen3_moe", (0, 1, 2)), ("qwen2_moe", (0, 2))])
def test_a_checkpoint_megatron_core_saved_at_expert_parallel_size_2_reads_back_whole(
        models, tmp_path, model_type, layers):
    """Each rank saved its own experts; moekit reads every expert, each where megatron-core
    numbers it, and transformers gives megatron-core's logits (Qwen2-MoE's: with its dense
    layer 1, QKV biases and gated shared expert)."""
    hf = models[model_type][1]
    assert_expert_parallel_save_reads_back(megatron_checkpoint_workers.save_expert_parallel,
                                           hf, layers, tmp_path)


def assert_expert_parallel_save_reads_back(worker, hf: Path, layers, tmp_path: Path,
                                           *settings) -> None:
    """megatron-core saves the model of ``hf`` (6 experts in each of ``layers``) over two
    expert-parallel ranks with ``worker`` (given ``settings`` after the folder it saves
    into); ``convert --to hf`` of the folder holds each rank's experts where megatron-core
    numbers them, and transformers' logits of it are each rank's."""
    saved = tmp_path / "megatron" / "iter_0000000"
    saved.mkdir(parents=True)
    shutil.copy(hf / "config.json", saved.parent / "config.json")
    result = megatron_workers.spawn(worker, 2, tmp_path / "run", str(hf), _ids(), str(saved),
                                    *settings)
    ranks = [torch.load(f"{result}.{rank}") for rank in range(2)]
    back = tmp_path / "back"
    assert main(["convert", str(saved), str(back), "--to", "hf"]) == 0
    tensors = load_all(back)
    experts = {key: value for rank in ranks for key, value in rank["experts"].items()}
    assert sorted(experts) == [(layer, e) for layer in layers for e in range(6)]
    for (layer, e), weights in experts.items():
        at = f"model.layers.{layer}.mlp.experts.{e}"
        assert torch.equal(torch.cat([tensors[f"{at}.gate_proj.weight"],
                                      tensors[f"{at}.up_proj.weight"]]),
                           weights["linear_fc1.weight"])
        assert torch.equal(tensors[f"{at}.down_proj.weight"], weights["linear_fc2.weight"])
    logits = samples.logits(back, _ids())
    for rank in ranks:
        assert (rank["logits"] - logits).abs().max() < LOGITS_TOLERANCE


EP_FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe")


@pytest.fixture(scope="module")
def loaded_at_ep2(models, upcycled, tmp_path_factory) -> list[dict]:
    """By rank: megatron-core's strict loads at expert-parallel size 2 of moekit's Qwen3-MoE,
    Mixtral and Qwen2-MoE folders (6 experts, 3 a rank) and of the upcycled Llamas (4
    experts)."""
    folders = [str(models[t][2]) for t in EP_FAMILIES] + [folder for folder, _ in upcycled]
    result = megatron_workers.spawn(megatron_checkpoint_workers.load_expert_parallel, 2,
                                    tmp_path_factory.mktemp("load_ep2"), folders, _ids())
    return [torch.load(f"{result}.{rank}") for rank in range(2)]


@pytest.mark.parametrize("model_type", EP_FAMILIES)
def test_megatron_core_at_expert_parallel_size_2_loads_it_strictly_with_transformers_logits(
        models, loaded_at_ep2, model_type):
    """Each rank holds its 3 experts under their global indices, each transformers' own
    expert (its grouped ``gate_up_proj`` = cat(gate, up) and ``down_proj``)."""
    model, _, folder = models[model_type]
    ranks = [rank[str(folder)] for rank in loaded_at_ep2]
    assert [sorted({e for _, e in rank["experts"]}) for rank in ranks] == [[0, 1, 2], [3, 4, 5]]
    state = model.state_dict()
    for rank in ranks:
        for (layer, e), weights in rank["experts"].items():
            experts = f"model.layers.{layer}.mlp.experts"
            assert torch.equal(weights["linear_fc1.weight"], state[f"{experts}.gate_up_proj"][e])
            assert torch.equal(weights["linear_fc2.weight"], state[f"{experts}.down_proj"][e])
    with torch.no_grad():
        theirs = model(_ids()).logits
    for rank in ranks:
        assert (rank["logits"] - theirs).abs().max() < LOGITS_TOLERANCE


def test_megatron_core_at_expert_parallel_size_2_loads_the_upcycled_folders(
        upcycled, loaded, loaded_at_ep2):
    """Two experts a rank, and the logits of the one-process load."""
    for folder, _ in upcycled:
        ranks = [rank[folder] for rank in loaded_at_ep2]
        assert [sorted({e for _, e in rank["experts"]}) for rank in ranks] == [[0, 1], [2, 3]]
        for rank in ranks:
            assert (rank["logits"] - loaded["upcycled"][folder]["logits"]).abs().max() \
                < LOGITS_TOLERANCE, folder


def test_upcycling_into_megatron_equals_the_in_memory_megatron_upcycling(upcycled, loaded):
    """The dense Llama in Megatron-Core's layout, upcycled in memory by
    ``moekit.upcycling.megatron``, equals ``moekit upcycle --to megatron`` of its HF
    checkpoint tensor for tensor (Drop-Upcycling's draws and Megatron-Core's scaling
    included), and keeps the dense logits."""
    found = loaded["upcycled"]
    for folder, spec in upcycled:
        assert found[folder]["differ"] == [], folder
        # Embedding, final norm, output layer; per layer two norms, QKV, projection,
        # router, each expert's fc1 and fc2, and the shared expert's fc1, fc2 and gate.
        assert found[folder]["compared"] == 3 + 3 * (5 + 4 * 2 + 3 * spec.shared_expert), folder
    # A zero router keeps the dense function with whole copies only (granular experts
    # need virtual groups), a shared expert taking half of it.
    for method in ("copy", "shared_expert"):
        folder = dict(zip(UPCYCLED, upcycled))[method][0]
        assert (found[folder]["logits"] - found["dense_logits"]).abs().max() < LOGITS_TOLERANCE


@pytest.mark.parametrize("method", UPCYCLED)
def test_megatron_cores_logits_of_the_upcycled_folder_are_transformers_logits(
        models, upcycled, loaded, tmp_path, method):
    """transformers runs ``moekit upcycle --to hf`` with the same options."""
    hf = tmp_path / "hf"
    assert main(["upcycle", str(models["llama"][1]), str(hf), "--experts", "4", "--top-k", "2",
                 "--router", "zero", *UPCYCLED[method][0]]) == 0
    folder, _ = dict(zip(UPCYCLED, upcycled))[method]
    theirs = samples.logits(hf, _ids())
    assert (loaded["upcycled"][folder]["logits"] - theirs).abs().max() < LOGITS_TOLERANCE


def test_megatron_cores_logits_of_an_upcycled_qwen3_are_transformers_logits(models, loaded,
                                                                             tmp_path):
    """Its attention keeps Qwen3's per-head norms; transformers runs ``moekit upcycle --to
    hf`` with the same options."""
    hf = tmp_path / "hf"
    assert main(["upcycle", str(models["qwen3"][1]), str(hf), *QWEN3_UPCYCLE]) == 0
    theirs = samples.logits(hf, _ids())
    assert (loaded["upcycled_qwen3"][0]["logits"] - theirs).abs().max() < LOGITS_TOLERANCE


GRANULAR = ["--method", "granular", "--granularity", "2"]
DROP = ["--method", "drop", "--drop-ratio", "0.25"]
SHARED = ["--shared-expert", "--target", "qwen2_moe"]


@pytest.mark.parametrize("method,to", [(GRANULAR, "hf"), (DROP, "hf"), (SHARED, "hf"),
                                       (GRANULAR, "megatron"), (DROP, "megatron"),
                                       (SHARED, "megatron")])
def test_upcycling_a_dense_megatron_checkpoint_equals_upcycling_its_hf_one(models, tmp_path,
                                                                           method, to):
    """Granular slices and Drop-Upcycling's statistics read parts of the stored chunks; the
    shared expert is the dense MLP's stored chunks whole. In Megatron-Core's layout the
    two folders hold the same bytes under every key."""
    _, hf, dense = models["llama"]
    written = []
    for name, source in (("from_hf", hf), ("from_megatron", dense)):
        out = tmp_path / name
        assert main(["upcycle", str(source), str(out), "--experts", "4", "--top-k", "2",
                     *method, "--to", to]) == 0
        written.append(load_all(out) if to == "hf" else _stored(out / ITERATION))
    assert written[0].keys() == written[1].keys()
    for key, tensor in written[0].items():
        assert (torch.equal(written[1][key], tensor) if to == "hf"
                else written[1][key] == tensor), key


@pytest.mark.parametrize("command", [["convert", "qwen3_moe"],
                                     ["upcycle", "llama", "--experts", "4", "--top-k", "2",
                                      *DROP]])
def test_megatron_chunks_are_built_as_dcp_writes_them(models, tmp_path, dcp_built, command):
    """convert and upcycle --to megatron hold the chunks of one .distcp file at a time
    (DCP keeps a file's tensors until the file is closed), never the whole model."""
    verb, model_type, *options = command
    shard = 20 * 1024
    assert main([verb, str(models[model_type][1]), str(tmp_path / "out"), *options, "--to",
                 "megatron", "--max-shard-size", str(shard)]) == 0
    assert dcp_built["total"] > 4 * shard
    assert dcp_built["live_peak"] <= shard + dcp_built["largest"]


@pytest.mark.parametrize("dense,settings,to,named", [
    ("qwen3", {"attention_bias": True}, "megatron", "qwen3_moe (--target auto): "),
    ("qwen2", {}, "torchtitan", "qwen2_moe (--target auto) with a shared expert (every "
                                "qwen2_moe block has one): "),
])
def test_an_upcycle_a_layout_does_not_hold_is_refused_naming_the_options(
        tmp_path, capsys, dense, settings, to, named):
    """A Qwen3 with attention_bias upcycles into a Qwen3-MoE whose o_proj bias Megatron-Core
    has no place for; a Qwen2 into a Qwen2-MoE, which torchtitan has no model of. Refused,
    dry run or not, before anything is written."""
    hf = samples.save_model(samples.build_model(dense, **settings), tmp_path / "hf")
    for dry_run in (["--dry-run"], []):
        out = tmp_path / "out"
        assert main(["upcycle", str(hf), str(out), "--experts", "4", "--top-k", "2", "--to",
                     to, *dry_run]) == 2
        err = capsys.readouterr().err
        assert f"--to {to} cannot hold the upcycled {named}" in err, err
        assert "Traceback" not in err and not out.exists()


def test_a_model_megatron_cores_layout_does_not_hold_is_refused_naming_why(tmp_path, capsys):
    """Qwen3's attention_bias gives o_proj a bias, which megatron-core's add_qkv_bias does
    not."""
    hf = samples.save_model(samples.build_model("qwen3", attention_bias=True), tmp_path / "hf")
    out = tmp_path / "out"
    assert main(["convert", str(hf), str(out), "--to", "megatron"]) == 2
    err = capsys.readouterr().err
    assert "o_proj.bias and 2 more tensors have no place" in err and "Traceback" not in err
    assert not out.exists()


def test_a_folder_holding_what_its_model_types_transformers_model_lacks_is_refused(
        models, tmp_path, capsys):
    """Qwen2-MoE's folder under a Qwen3-MoE config.json: Qwen3-MoE has no shared expert,
    which its transformers model would drop."""
    folder = tmp_path / "megatron"
    shutil.copytree(models["qwen2_moe"][2], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_moe"}))
    assert main(["convert", str(folder), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert "holds decoder.layers.0.mlp.shared_experts.linear_fc1.weight and 5 more tensors, " \
           "which moekit has no HF name for" in err, err
    assert not (tmp_path / "out").exists()


def test_a_folder_without_config_or_with_a_bad_tracker_is_refused(qwen3_moe, tmp_path,
                                                                   capsys):
    folder = tmp_path / "megatron"
    shutil.copytree(qwen3_moe[2], folder)
    config = tmp_path / "qwen3.json"
    (folder / "config.json").rename(config)
    assert main(["inspect", str(folder)]) == 2
    assert "needs the model's config.json" in capsys.readouterr().err
    files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert main(["convert", str(folder), str(tmp_path / "back"), "--to", "hf",
                 "--config", str(config)]) == 0  # read by the config named, not changed
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files
    assert (tmp_path / "back" / "config.json").read_bytes() == config.read_bytes()
    assert verify(qwen3_moe[1], tmp_path / "back").equal
    headless = tmp_path / "headless.json"
    headless.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                    if k != "num_attention_heads"}))
    assert main(["inspect", str(folder), "--config", str(headless)]) == 2
    assert f"{headless}: config.json's num_attention_heads" in capsys.readouterr().err
    (folder / "latest_checkpointed_iteration.txt").write_text("latest")
    assert main(["inspect", str(folder)]) == 2
    assert "neither an iteration number nor 'release'" in capsys.readouterr().err


TRACKER, ITERATION = "latest_checkpointed_iteration.txt", "iter_0000000"
FC2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"


def _link_outside(folder: Path, name: str) -> None:
    """Move ``folder / name`` beside the folder and leave a symbolic link to it."""
    moved = folder.parent / f"outside-{name}"
    (folder / name).rename(moved)
    (folder / name).symlink_to(moved)


def _edit_metadata(folder: Path, edit) -> None:
    """Rewrite the iteration's ``.metadata`` (read by DCP itself) after ``edit(entries)``."""
    metadata = FileSystemReader(str(folder / ITERATION)).read_metadata()
    edit(metadata.state_dict_metadata)
    (folder / ITERATION / ".metadata").write_bytes(pickle.dumps(metadata))


HOSTILE = {
    "tracker of 5000 digits": (
        lambda f: (f / TRACKER).write_text("9" * 5000), TRACKER),
    "tracker a link to /dev/zero": (
        lambda f: ((f / TRACKER).unlink(), (f / TRACKER).symlink_to("/dev/zero")), TRACKER),
    "tracker a folder": (
        lambda f: ((f / TRACKER).unlink(), (f / TRACKER).mkdir()), TRACKER),
    "iteration folder outside": (lambda f: _link_outside(f, ITERATION), ITERATION),
    "metadata.json a link to /dev/zero": (
        lambda f: ((f / ITERATION / "metadata.json").unlink(),
                   (f / ITERATION / "metadata.json").symlink_to("/dev/zero")), "metadata.json"),
    "metadata.json nested 60000 deep": (
        lambda f: (f / ITERATION / "metadata.json").write_text("[" * 60000),
        "metadata.json nests its JSON values too deeply"),
    "metadata.json of 1 MB": (
        lambda f: (f / ITERATION / "metadata.json").write_text(" " * 2**20 + "{}"),
        "metadata.json holds more than 65,536 bytes"),
    "metadata.json outside": (
        lambda f: _link_outside(f / ITERATION, "metadata.json"), "metadata.json"),
    ".metadata outside": (lambda f: _link_outside(f / ITERATION, ".metadata"), ".metadata"),
    "a data file a named pipe": (
        lambda f: ((f / ITERATION / "__0_0.distcp").unlink(),
                   os.mkfifo(f / ITERATION / "__0_0.distcp")), "__0_0.distcp is a named pipe"),
    "a chunk saved twice": (
        lambda f: _edit_metadata(f, lambda e: e[FC2].chunks.append(e[FC2].chunks[3])),
        f"{FC2} is saved in chunks that overlap"),
    "a stored tensor of too few dimensions": (
        lambda f: _edit_metadata(f, lambda e: setattr(
            e["decoder.final_layernorm.weight"], "size", torch.Size([]))),
        "decoder.final_layernorm.weight is []"),
}
"""Defects of a Megatron-Core folder, and what the refusal names."""


@pytest.mark.parametrize("defect", HOSTILE)
def test_a_hostile_folder_is_refused_naming_the_file(qwen3_moe, tmp_path, capsys, defect):
    folder = tmp_path / "megatron"
    shutil.copytree(qwen3_moe[2], folder)
    damage, named = HOSTILE[defect]
    damage(folder)
    assert main(["convert", str(folder), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit: error: ") and named in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_the_megatron_layout_is_not_written_as_safetensors(qwen3_moe, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(qwen3_moe[1]), str(out), "--to", "megatron", "--format",
                 "safetensors"]) == 2
    assert "write it with --format megatron" in capsys.readouterr().err
    assert not out.exists()


def test_a_megatron_folder_loads_in_memory_in_any_layout(qwen3_moe):
    _, hf, folder = qwen3_moe
    ours, theirs = load(folder, layout="nemo"), load(hf, layout="nemo")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


@pytest.mark.parametrize("model_type", ["qwen3", "qwen3_moe"])
def test_a_checkpoint_megatron_core_saved_at_tensor_parallel_size_2_reads_back_whole(
        models, tmp_path, model_type):
    """megatron-core loads moekit's folder at tensor-parallel size 2 and saves it again,
    each rank its shards (the attention output and MLP down projections split along their
    columns): the folder converts back to the HF files byte for byte, and transformers'
    logits of them are the model's."""
    model, hf, folder = models[model_type]
    saved = tmp_path / "megatron" / "iter_0000000"
    saved.mkdir(parents=True)
    shutil.copy(hf / "config.json", saved.parent / "config.json")
    megatron_workers.spawn(megatron_checkpoint_workers.resave_tensor_parallel, 2,
                           tmp_path / "run", str(folder), str(saved))
    assert_back_to_hf(model, hf, saved, tmp_path / "back")


def test_a_training_checkpoint_converts_its_model_weights(models, tmp_path, capsys):
    """megatron-core saves moekit's folder again beside an optimizer's state and an RNG
    state, as Megatron-LM's training checkpoints hold them: the optimizer's tensors and the
    RNG object are passed over (``inspect`` counts them), and the folder converts back to
    the HF files byte for byte, transformers' logits of them the model's."""
    model, hf, folder = models["qwen3_moe"]
    saved = tmp_path / "megatron" / "iter_0000000"
    saved.mkdir(parents=True)
    shutil.copy(hf / "config.json", saved.parent / "config.json")
    megatron_workers.spawn(megatron_checkpoint_workers.resave_with_training_state, 1,
                           tmp_path / "run", str(folder), str(saved))
    stored = FileSystemReader(saved).read_metadata().state_dict_metadata
    assert any(key.startswith("optimizer.state.exp_avg.decoder.") for key in stored)
    assert any(key.startswith("rng_state") for key in stored)
    moments = sum(key.startswith("optimizer.state.") for key in stored)
    assert main(["inspect", str(saved)]) == 0
    assert (f"not read          training state (entries): optimizer {moments}, rng_state 1\n"
            in capsys.readouterr().out)
    assert_back_to_hf(model, hf, saved, tmp_path / "back")
