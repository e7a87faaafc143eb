"""The torchtitan layout, checked by torchtitan 0.3 itself (which scripts/setup.sh installs
without its dependencies, beside the few its model modules import): the DCP folder moekit writes
loads strictly into torchtitan's own Qwen3 MoE model, which then gives transformers'
logits; and the folder converts back to the HF checkpoint it came from, byte for byte."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchtitan.components.checkpointer.dcp import CheckpointManager
from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer.optimizer import default_adamw
from torchtitan.models import qwen3 as tt
from torchtitan.models.common import CosSinRoPE, Embedding, Linear

from moekit import samples
from moekit.cli import main
from moekit.conversion import convert, convert_state_dict

from .conftest import load_all, same_bytes

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",  # dcp.load on one process says so
    "ignore:In CPU autocast:UserWarning")  # torchtitan's router asks CPU autocast for fp32

SHARD = 60 * 1024
"""The --max-shard-size of these tests: several .distcp files for the tiny model."""


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A tiny transformers Qwen3-MoE (renormalised top-k, as torchtitan 0.3's Qwen3 MoE
    routes) and its ``save_pretrained`` folder."""
    model = samples.build_model("qwen3_moe", norm_topk_prob=True)
    return model, samples.save_model(model, tmp_path_factory.mktemp("qwen3") / "hf")


@pytest.fixture(scope="module")
def titan_folder(qwen3_moe, tmp_path_factory) -> Path:
    """``moekit convert SRC DST --to torchtitan``, the format left to the layout."""
    return to_torchtitan(qwen3_moe[1], tmp_path_factory.mktemp("titan") / "dcp")


def to_torchtitan(src: Path, out: Path) -> Path:
    """``moekit convert SRC OUT --to torchtitan`` in several .distcp files; returns OUT."""
    assert main(["convert", str(src), str(out), "--to", "torchtitan",
                 "--max-shard-size", str(SHARD)]) == 0
    return out


def test_torchtitan_is_written_as_dcp_with_config(titan_folder):
    assert len(list(titan_folder.glob("*.distcp"))) > 1
    assert (titan_folder / ".metadata").is_file()
    assert json.loads((titan_folder / "config.json").read_text())["model_type"] == "qwen3_moe"


def test_hf_to_torchtitan_to_hf_is_byte_identical(qwen3_moe, titan_folder, tmp_path, capsys):
    assert main(["inspect", str(titan_folder)]) == 0
    assert "torchtitan" in capsys.readouterr().out
    assert main(["verify", str(qwen3_moe[1]), str(titan_folder)]) == 0
    back = tmp_path / "back"
    assert main(["convert", str(titan_folder), str(back), "--to", "hf"]) == 0
    original, returned = load_all(qwen3_moe[1]), load_all(back)
    assert original.keys() == returned.keys()
    assert all(same_bytes(original[key], returned[key]) for key in original)


def test_format_overrides_the_layouts_default(qwen3_moe, titan_folder, tmp_path):
    out = tmp_path / "st"
    convert(qwen3_moe[1], out, "torchtitan", format="safetensors")
    written = load_all(out)
    metadata = dcp.FileSystemReader(titan_folder).read_metadata().state_dict_metadata
    assert written.keys() == metadata.keys()


@pytest.mark.parametrize("value", [0.25, -0.0])
def test_a_trained_expert_bias_is_refused_not_dropped(value, qwen3_moe, titan_folder, tmp_path,
                                                      capsys):
    """torchtitan updates ``expert_bias_E`` while training; HF Qwen3 has no place for it.
    Converting back writes zeros, which would not give a -0.0 back bit for bit."""
    metadata = dcp.FileSystemReader(titan_folder).read_metadata().state_dict_metadata
    state = {key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
             for key, entry in metadata.items()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(titan_folder), no_dist=True)
    key = "layers.1.moe.expert_bias_E"
    state[key][2] = value
    trained = tmp_path / "trained"
    dcp.save(state, storage_writer=dcp.FileSystemWriter(trained), no_dist=True)
    shutil.copy(titan_folder / "config.json", trained)
    for command in (["convert", str(trained), str(tmp_path / "back"), "--to", "hf"],
                    ["verify", str(qwen3_moe[1]), str(trained)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert key in err and "non-zero" in err and "Traceback" not in err
    assert not (tmp_path / "back").exists()


def titan_config(config) -> tt.Qwen3Model.Config:
    """torchtitan 0.3's Qwen3 MoE config for a transformers Qwen3-MoE config, built with
    the helpers its own model registry uses (``_30b_a3b`` in ``models/qwen3/__init__.py``)."""
    dim, vocab = config.hidden_size, config.vocab_size
    return tt.Qwen3Model.Config(
        vocab_size=vocab, dim=dim, norm=tt._qwen3_norm(dim),
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim,
                                        param_init=tt._EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=tt._LINEAR_INIT),
        layers=tt._build_qwen3_moe_layers(
            n_layers=config.num_hidden_layers, dim=dim, n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
            moe_hidden_dim=config.moe_intermediate_size, num_experts=config.num_experts,
            top_k=config.num_experts_per_tok, attn_backend="flex", moe_comm_backend="standard",
            rope=CosSinRoPE.Config(dim=config.head_dim,
                                   max_seq_len=config.max_position_embeddings,
                                   theta=config.rope_parameters["rope_theta"])))


def titan_model(config) -> torch.nn.Module:
    return titan_config(config).build().eval()


def adapter_names(adapter, hf_keys) -> set[str]:
    """The names torchtitan's state-dict ``adapter`` gives each HF key outside the experts
    (its ``from_hf_map`` holds templates with the layer index as ``{}``)."""
    names = set()
    for key in (key for key in hf_keys if ".experts." not in key):
        layer = re.findall(r"\.(\d+)\.", key)[:1]
        template = re.sub(r"\.\d+\.", ".{}.", key, count=1)
        names.add(adapter.from_hf_map[template].format(*layer))
    return names


def test_every_name_is_the_one_torchtitans_adapter_gives(tmp_path):
    """A dense layer among MoE ones (``mlp_only_layers``) too: each HF key outside the
    experts is named as torchtitan's own ``Qwen3StateDictAdapter.from_hf_map`` maps it,
    and the folder converts back to the HF files byte for byte."""
    hf = samples.build_model("qwen3_moe", mlp_only_layers=[1])
    src = samples.save_model(hf, tmp_path / "hf")
    assert main(["convert", str(src), str(tmp_path / "dcp"), "--to", "torchtitan"]) == 0
    names = dcp.FileSystemReader(tmp_path / "dcp").read_metadata().state_dict_metadata
    adapter = tt.Qwen3StateDictAdapter(titan_config(hf.config), None)
    original = load_all(src)
    expected = adapter_names(adapter, original)
    assert expected == {key for key in names
                        if "inner_experts" not in key and not key.endswith("expert_bias_E")}
    assert main(["convert", str(tmp_path / "dcp"), str(tmp_path / "back"), "--to", "hf"]) == 0
    returned = load_all(tmp_path / "back")
    assert original.keys() == returned.keys()
    assert all(same_bytes(original[key], returned[key]) for key in original)


def load_strictly_as_transformers_holds(model, folder, hf) -> dict:
    """Load the DCP ``folder`` into torchtitan's ``model`` strictly, after checking that it
    holds exactly the model's names, shapes and dtypes; the loaded state dict converts in
    memory to transformers' ``hf.state_dict()`` byte for byte. Returns the loaded state."""
    state = model.state_dict()
    metadata = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    assert metadata.keys() == state.keys()
    for key, value in state.items():
        assert (tuple(metadata[key].size), metadata[key].properties.dtype) == \
            (tuple(value.shape), value.dtype), key
    dcp.load(state, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
    model.load_state_dict(state, strict=True)
    back = convert_state_dict(model.state_dict(), None, "transformers",
                              config=hf.config.to_dict())
    expected = hf.state_dict()
    assert back.keys() == expected.keys()
    assert all(same_bytes(back[key], expected[key]) for key in expected)
    return state


def titan_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    with torch.no_grad():
        return model(ids, positions, model.get_attention_masks(positions))


def logits_gap(model: torch.nn.Module, hf) -> tuple[Callable[[], float], float]:
    """How far torchtitan's ``model`` lies from transformers' fp32 logits of ``hf`` on a
    fixed batch (a function, called again once the model is changed), and the tolerance:
    0.5% of the largest logit, the bf16 rounding of torchtitan's expert products."""
    ids = samples.sample_input(hf.config.vocab_size)
    with torch.no_grad():
        want = hf(ids).logits
    return (lambda: (titan_logits(model, ids) - want).abs().max().item(),
            0.005 * want.abs().max().item())


def test_torchtitan_loads_the_folder_strictly_and_gives_transformers_logits(qwen3_moe,
                                                                            titan_folder):
    """torchtitan's model holds exactly the folder's names, shapes and dtypes and loads
    it strictly; its own state dict once loaded (q, k and v split by its state-dict hooks)
    converts, in memory, to transformers' state dict byte for byte.

    torchtitan 0.3's GroupedExperts multiplies in bf16 whatever the weights' dtype
    (``GroupedExperts.forward`` casts inputs and weights with ``.bfloat16()``), so its
    logits match transformers' fp32 ones to bf16 rounding (2^-8 relative), not exactly:
    within 0.5% of the largest logit. Swapping two experts' gate weights in one layer
    moves them more than five times as far."""
    hf, _ = qwen3_moe
    model = titan_model(hf.config)
    state = load_strictly_as_transformers_holds(model, titan_folder, hf)
    gap, tolerance = logits_gap(model, hf)
    assert gap() <= tolerance
    w1 = state["layers.0.moe.routed_experts.inner_experts.w1_EFD"]
    state["layers.0.moe.routed_experts.inner_experts.w1_EFD"] = w1[[1, 0, *range(2, len(w1))]]
    model.load_state_dict(state, strict=True)
    assert gap() > 5 * tolerance


def test_a_qwen3_with_attention_biases_is_refused_naming_them(tmp_path, capsys):
    """torchtitan's own Qwen3 MoE model, built for a transformers Qwen3-MoE with
    ``attention_bias``, holds no bias at all: moekit refuses the conversion at planning
    (``--dry-run`` too), naming a bias and why, and leaves nothing behind."""
    hf = samples.build_model("qwen3_moe", attention_bias=True)
    assert not [key for key in titan_model(hf.config).state_dict() if key.endswith(".bias")]
    src = samples.save_model(hf, tmp_path / "hf")
    out = tmp_path / "dcp"
    for dry_run in ([], ["--dry-run"]):
        assert main(["convert", str(src), str(out), "--to", "torchtitan", *dry_run]) == 2
        err = capsys.readouterr().err
        assert "no place for model.layers.0.self_attn.k_proj.bias (and 11 more" in err
        assert "attention has no biases" in err and "Traceback" not in err
        assert not out.exists()


class _TrainState:
    """The trainer's own state, as torchtitan 0.3's ``Trainer`` hands it to its
    checkpointer (``states={"train_state": self}``)."""

    def state_dict(self) -> dict:
        return {"step": 1, "ntokens_seen": 64}

    def load_state_dict(self, state: dict) -> None:
        raise AssertionError("not loaded here")


def trained_one_step(model: torch.nn.Module, folder: Path) -> Path:
    """Take one step of torchtitan's AdamW on ``model`` (with seeded made-up gradients:
    torchtitan's flex attention has no backward on the CPU) and save the step's
    checkpoint with torchtitan's own ``CheckpointManager`` under ``folder``: the model's
    keys beside its optimizer, lr_scheduler, dataloader and train_state, as every save
    but a run's last holds them. Returns the step's folder."""
    optimizers = default_adamw(implementation="for-loop").build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=optimizers,
                                                                    training_steps=10)
    generator = torch.Generator().manual_seed(0)
    for parameter in model.parameters():
        parameter.grad = torch.randn(parameter.shape, generator=generator).to(parameter.dtype)
    optimizers.step()
    schedulers.step()
    manager = CheckpointManager(
        CheckpointManager.Config(enable=True, folder="checkpoint", interval=1,
                                 keep_latest_k=0),
        dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
        states={"train_state": _TrainState()}, sd_adapter=None, base_folder=str(folder))
    assert manager.save(curr_step=1)
    manager.close()
    return folder / "checkpoint" / "step-1"


def test_a_training_checkpoint_converts_its_model_weights(qwen3_moe, titan_folder, tmp_path,
                                                          capsys):
    """A checkpoint that torchtitan's ``CheckpointManager`` saves while training, read by
    the model's config.json named with --config (torchtitan writes none), converts to HF
    files equal byte for byte to what torchtitan's own ``Qwen3StateDictAdapter.to_hf``
    makes of the trained model's state dict, with that config.json beside them; the
    checkpoint is left as it was. Its training state is not read, and ``inspect`` counts
    it."""
    hf, src = qwen3_moe
    model = titan_model(hf.config)
    state = model.state_dict()
    dcp.load(state, storage_reader=dcp.FileSystemReader(titan_folder), no_dist=True)
    model.load_state_dict(state, strict=True)
    step = trained_one_step(model, tmp_path)
    files = {p: p.read_bytes() for p in step.rglob("*") if p.is_file()}
    assert main(["inspect", str(step)]) == 2
    assert "--config" in capsys.readouterr().err
    assert main(["inspect", str(step), "--config", str(src)]) == 0
    shown = capsys.readouterr().out
    assert "not read          training state (entries): " in shown
    assert all(root in shown for root in ("optimizer", "lr_scheduler", "dataloader 1",
                                          "train_state 2"))
    assert main(["convert", str(step), str(tmp_path / "back"), "--to", "hf",
                 "--config", str(src / "config.json")]) == 0
    assert main(["verify", str(step), str(tmp_path / "back"), "--config", str(src)]) == 0
    assert {p: p.read_bytes() for p in step.rglob("*") if p.is_file()} == files
    assert (tmp_path / "back" / "config.json").read_bytes() == (
        src / "config.json").read_bytes()
    trained = tt.Qwen3StateDictAdapter(titan_config(hf.config), None).to_hf(model.state_dict())
    returned, original = load_all(tmp_path / "back"), load_all(src)
    assert returned.keys() == trained.keys() == original.keys()
    assert all(same_bytes(returned[key], trained[key]) for key in trained)
    assert not all(same_bytes(returned[key], original[key]) for key in original)
