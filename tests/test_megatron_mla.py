"""DeepSeek-V3 (multi-latent attention, a dense first layer, routed and shared experts,
the router's score-correction bias) written by moekit as a Megatron-Core ``torch_dist``
checkpoint, against megatron-core 0.16.1 itself: its strict ``dist_checkpointing.load``
into its GPTModel with MLA (local specs, CPU, gloo; see ``megatron_mla_workers`` for the two
places its local MLA needs help to build), its logits against transformers', its own save
of the loaded model against moekit's folder, at expert-parallel sizes 1 and 2; a DeepSeek-V3
with a multi-token-prediction layer (megatron-core's MTP block) likewise, its MTP logits
against DeepSeek-V3's MTP computed with transformers' decoder layer; a Qwen3-MoE with a
dense layer between MoE layers (each layer under its own key, as for DeepSeek-V3's dense
first layer) likewise; and the common state Megatron-LM reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from moekit import samples
from moekit.cli import main

pytest.importorskip("megatron.core")

from . import megatron_mla_workers, megatron_workers  # noqa: E402
from .conftest import load_all  # noqa: E402
from .test_megatron_checkpoint import (LOGITS_TOLERANCE, assert_back_to_hf,  # noqa: E402
                                       assert_expert_parallel_save_reads_back,
                                       assert_same_dcp_folders)

MEGATRON_LM_COMMON_STATE = {"checkpoint_version": 3.0, "iteration": 0}
"""What Megatron-LM (release core_v0.16.1, megatron/training/checkpointing.py) reads from a
torch_dist checkpoint's common state in ``load_checkpoint``: ``checkpoint_version``
(``set_checkpoint_version(state_dict.get('checkpoint_version', 0))``; its
``save_checkpoint`` writes 3.0) and ``iteration`` (``state_dict['iteration']`` unless
``--finetune`` or a release folder; a checkpoint without it makes it exit). ``args`` is read
only without ``--finetune``."""


def _deepseek(seed: int = 0, **settings) -> torch.nn.Module:
    """A tiny transformers DeepSeek-V3 whose score-correction bias is not zero (its
    initialisation leaves it zero)."""
    model = samples.build_model("deepseek_v3", seed, **settings)
    with torch.no_grad():
        for layer in model.model.layers[model.config.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.2)
    return model


MODELS = {
    "deepseek": lambda: _deepseek(),
    "deepseek_without_q_lora": lambda: _deepseek(q_lora_rank=None),
    "deepseek_mtp": lambda: _deepseek(),
    "mixed": lambda: samples.build_model("qwen3_moe", norm_topk_prob=True, mlp_only_layers=[1]),
}
"""DeepSeek-V3 with and without a q LoRA rank (``linear_q_down_proj``/``linear_q_up_proj``
or ``linear_q_proj``), one whose files hold a multi-token-prediction layer
(``_add_mtp_layer``), and a Qwen3-MoE whose layer 1 is dense (``mlp_only_layers``).
transformers' DeepSeek-V3 config declares ``num_nextn_predict_layers`` 1 whatever the
files hold, so the other two are written (and loaded by megatron-core) without one."""
WITH_MTP = ("deepseek_mtp",)

MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
           "eh_proj.weight": "eh_proj.weight", "shared_head.norm.weight": "final_layernorm.weight"}
"""DeepSeek-V3's MTP layer's own modules besides its decoder layer (as its Hub files name
them under ``model.layers.{num_hidden_layers}.``) -> megatron-core 0.16.1's names under
``mtp.layers.0.``."""


def _add_mtp_layer(hf: Path, model: torch.nn.Module, tmp: Path) -> None:
    """Add to the files at ``hf`` one multi-token-prediction layer as DeepSeek-V3's Hub
    files hold it (layer ``num_hidden_layers``; transformers 5.24 builds none, so the
    tensors are made here): the decoder layer that transformers saves as the last layer of
    a DeepSeek-V3 one layer deeper (seeded, MoE, its score-correction bias not zero),
    ``MTP_OWN`` drawn from a seeded N(0, 0.2) in their shapes by the config
    ([H] norms, eh_proj [H, 2H]), and ``embed_tokens`` and ``shared_head.head`` copies of
    the main model's embedding and output layer, as in DeepSeek's release; the config
    then declares it (``num_nextn_predict_layers``)."""
    from safetensors.torch import save_file

    config = json.loads((hf / "config.json").read_text())
    layer, hidden = config["num_hidden_layers"], config["hidden_size"]
    deeper = samples.save_model(_deepseek(seed=1, num_hidden_layers=layer + 1), tmp)
    prefix = f"model.layers.{layer}."
    tensors = {key: tensor for key, tensor in load_all(deeper).items() if key.startswith(prefix)}
    generator = torch.Generator().manual_seed(2)
    for name in MTP_OWN:
        shape = (hidden, 2 * hidden) if name == "eh_proj.weight" else (hidden,)
        tensors[prefix + name] = torch.randn(shape, generator=generator) * 0.2
    with torch.no_grad():
        tensors[prefix + "embed_tokens.weight"] = model.model.embed_tokens.weight.clone()
        tensors[prefix + "shared_head.head.weight"] = model.lm_head.weight.clone()
    save_file(tensors, hf / "mtp.safetensors", metadata={"format": "pt"})
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(tensors, "mtp.safetensors"))
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    (hf / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))


def saved_and_converted(model: torch.nn.Module, root: Path, with_mtp: bool
                        ) -> tuple[Path, Path]:
    """``model`` saved under ``root`` (given a multi-token-prediction layer where
    ``with_mtp``: ``_add_mtp_layer``) and moekit's Megatron-Core folder of it: the two
    folders."""
    hf = samples.save_model(model, root / "hf")
    if with_mtp:
        _add_mtp_layer(hf, model, root / "deeper")
    folder = root / "megatron"
    assert main(["convert", str(hf), str(folder), "--to", "megatron"]) == 0
    return hf, folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path, Path]]:
    """By name of ``MODELS``: the transformers model, its HF folder and moekit's
    Megatron-Core folder of it."""
    made = {}
    for name, build in MODELS.items():
        model = build()
        made[name] = model, *saved_and_converted(model, tmp_path_factory.mktemp(name),
                                                 name in WITH_MTP)
    return made


@pytest.fixture(scope="module")
def deepseek(models) -> tuple[torch.nn.Module, Path, Path]:
    return models["deepseek"]


def _ids() -> torch.Tensor:
    return samples.sample_input(96)


@pytest.fixture(scope="module")
def loaded(models, tmp_path_factory) -> dict[str, dict]:
    """By name of ``MODELS``: megatron-core's strict load of moekit's folder (logits,
    state dict, the common state) and the folder of its own save of the loaded model
    (under "saved"). One process for all (megatron-core imports slowly)."""
    folders = [str(models[name][2]) for name in MODELS]
    result = megatron_workers.spawn(megatron_mla_workers.load_and_run, 1,
                                    tmp_path_factory.mktemp("load"), folders, _ids())
    found = torch.load(result)
    return {name: {**found[folder], "saved": Path(f"{result}.{number}.saved")}
            for number, (name, folder) in enumerate(zip(MODELS, folders))}


@pytest.mark.parametrize("name", MODELS)
def test_megatron_core_loads_it_strictly_and_gives_transformers_logits(models, loaded, name):
    """fp32, the tolerance of the other Megatron-Core families. DeepSeek-V3: MLA, sigmoid
    routing with the bias choosing experts, shared experts and the dense first layer all
    take part; Qwen3-MoE: a dense layer between MoE layers."""
    model = models[name][0]
    with torch.no_grad():
        theirs = model(_ids()).logits
    assert (loaded[name]["logits"] - theirs).abs().max() < LOGITS_TOLERANCE


def _held(hf: dict[str, torch.Tensor], layer: int, config) -> dict[str, torch.Tensor]:
    """The HF tensors of DeepSeek-V3's decoder layer ``layer`` by megatron-core's module
    names within a layer (dense below ``first_k_dense_replace``, MoE after)."""
    at, attention = f"model.layers.{layer}", f"model.layers.{layer}.self_attn"
    expected = {
        "input_layernorm.weight": hf[f"{at}.input_layernorm.weight"],
        "self_attention.linear_q_down_proj.weight": hf[f"{attention}.q_a_proj.weight"],
        "self_attention.q_layernorm.weight": hf[f"{attention}.q_a_layernorm.weight"],
        "self_attention.linear_q_up_proj.weight": hf[f"{attention}.q_b_proj.weight"],
        "self_attention.linear_kv_down_proj.weight": hf[f"{attention}.kv_a_proj_with_mqa.weight"],
        "self_attention.kv_layernorm.weight": hf[f"{attention}.kv_a_layernorm.weight"],
        "self_attention.linear_kv_up_proj.weight": hf[f"{attention}.kv_b_proj.weight"],
        "self_attention.linear_proj.weight": hf[f"{attention}.o_proj.weight"],
        "pre_mlp_layernorm.weight": hf[f"{at}.post_attention_layernorm.weight"],
    }
    if layer < config.first_k_dense_replace:
        expected["mlp.linear_fc1.weight"] = torch.cat(
            [hf[f"{at}.mlp.gate_proj.weight"], hf[f"{at}.mlp.up_proj.weight"]])
        expected["mlp.linear_fc2.weight"] = hf[f"{at}.mlp.down_proj.weight"]
        return expected
    shared = f"{at}.mlp.shared_experts"
    expected["mlp.router.weight"] = hf[f"{at}.mlp.gate.weight"]
    expected["mlp.router.expert_bias"] = hf[f"{at}.mlp.gate.e_score_correction_bias"]
    expected["mlp.shared_experts.linear_fc1.weight"] = torch.cat(
        [hf[f"{shared}.gate_proj.weight"], hf[f"{shared}.up_proj.weight"]])
    expected["mlp.shared_experts.linear_fc2.weight"] = hf[f"{shared}.down_proj.weight"]
    for e in range(config.n_routed_experts):
        expert, ours = f"{at}.mlp.experts.{e}", f"mlp.experts.local_experts.{e}"
        expected[f"{ours}.linear_fc1.weight"] = torch.cat(
            [hf[f"{expert}.gate_proj.weight"], hf[f"{expert}.up_proj.weight"]])
        expected[f"{ours}.linear_fc2.weight"] = hf[f"{expert}.down_proj.weight"]
    return expected


def _assert_holds(state: dict[str, torch.Tensor], prefix: str,
                  expected: dict[str, torch.Tensor]) -> None:
    for name, tensor in expected.items():
        mine = state[prefix + name]
        assert mine.dtype == tensor.dtype and torch.equal(mine, tensor), prefix + name


def test_each_megatron_tensor_is_the_transformers_tensor_it_holds(deepseek, loaded):
    """Bit for bit, by megatron-core's module names: layer 0 dense, layers 1 and 2 MoE."""
    model, hf_folder, _ = deepseek
    hf, state = load_all(hf_folder), loaded["deepseek"]["state"]
    for layer in range(model.config.num_hidden_layers):
        _assert_holds(state, f"decoder.layers.{layer}.", _held(hf, layer, model.config))
    assert torch.any(state["decoder.layers.1.mlp.router.expert_bias"] != 0)


def test_each_mtp_tensor_is_the_deepseek_tensor_it_holds(models, loaded):
    """megatron-core's MTP layer 0 holds HF layer ``num_hidden_layers`` bit for bit: its
    decoder layer under ``transformer_layer.`` (MoE, every expert) and ``MTP_OWN``; the
    main embedding and output layer are the ones the MTP layer's copies equal."""
    model, hf_folder, _ = models["deepseek_mtp"]
    hf, state = load_all(hf_folder), loaded["deepseek_mtp"]["state"]
    layer = model.config.num_hidden_layers
    _assert_holds(state, "mtp.layers.0.transformer_layer.", _held(hf, layer, model.config))
    _assert_holds(state, "mtp.layers.0.",
                  {ours: hf[f"model.layers.{layer}.{theirs}"] for theirs, ours in MTP_OWN.items()})
    _assert_holds(state, "", {
        "embedding.word_embeddings.weight": hf[f"model.layers.{layer}.embed_tokens.weight"],
        "output_layer.weight": hf[f"model.layers.{layer}.shared_head.head.weight"]})


@pytest.fixture(scope="module")
def mtp_logits(models) -> torch.Tensor:
    """DeepSeek-V3's MTP layer (as vLLM's DeepSeekMultiTokenPredictorLayer computes
    it): at position i, eh_proj of cat(enorm(embedding of token i + 1), hnorm(the main
    model's last hidden state at i)), the decoder layer (transformers' own, loaded by
    ``from_pretrained`` from the HF files as layer ``num_hidden_layers`` of a model one
    layer deeper), shared_head.norm and shared_head.head. The last position, which has no
    next token, is left to megatron-core's convention (it embeds token 0 there)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    model, hf_folder, _ = models["deepseek_mtp"]
    config, hf = model.config, load_all(hf_folder)
    layer = config.num_hidden_layers
    deeper = AutoModelForCausalLM.from_pretrained(hf_folder, num_hidden_layers=layer + 1,
                                                  dtype=torch.float32,
                                                  attn_implementation="sdpa").eval()

    def norm(name: str, x: torch.Tensor) -> torch.Tensor:
        module = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        module.weight.data = hf[f"model.layers.{layer}.{name}"]
        return module(x)

    ids = _ids()
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
        embedded = hf[f"model.layers.{layer}.embed_tokens.weight"][ids.roll(-1, dims=1)]
        x = torch.cat([norm("enorm.weight", embedded), norm("hnorm.weight", hidden)], dim=-1)
        x = x @ hf[f"model.layers.{layer}.eh_proj.weight"].T
        # Without a mask, sdpa attends causally, as in the model's own forward.
        positions = torch.arange(ids.shape[1])[None]
        x = deeper.model.layers[layer](x, position_embeddings=deeper.model.rotary_emb(x, positions))
        x = norm("shared_head.norm.weight", x)
        return x @ hf[f"model.layers.{layer}.shared_head.head.weight"].T


def test_megatron_cores_mtp_layer_gives_deepseeks_mtp_logits(mtp_logits, loaded):
    """At every position but the last (``mtp_logits``); fp32, the logits' tolerance."""
    (mine,) = loaded["deepseek_mtp"]["mtp_logits"]
    assert mine.shape == mtp_logits.shape
    assert (mine[:, :-1] - mtp_logits[:, :-1]).abs().max() < LOGITS_TOLERANCE


@pytest.mark.parametrize("name", MODELS)
def test_megatron_cores_own_save_of_the_loaded_model_is_moekits_folder(models, loaded, name):
    """Same keys (each layer under its own, every ``_extra_state`` included), shapes,
    dtypes, chunks and bytes."""
    saved = loaded[name]["saved"]
    theirs = FileSystemReader(str(saved)).read_metadata().state_dict_metadata
    dense = 1 if name == "mixed" else 0
    assert f"decoder.layers.{dense}.mlp.linear_fc1._extra_state/shard_0_1" in theirs
    assert_same_dcp_folders(models[name][2] / "iter_0000000", saved)


@pytest.mark.parametrize("name", MODELS)
def test_megatron_to_hf_is_byte_identical_and_transformers_loads_it(models, tmp_path, name):
    assert_back_to_hf(*models[name], tmp_path / "back")


def test_the_common_state_is_what_megatron_lm_reads(deepseek, loaded):
    """As written, and as megatron-core's ``dist_checkpointing.load`` returns it beside the
    model."""
    common = torch.load(deepseek[2] / "iter_0000000" / "common.pt")
    assert common == MEGATRON_LM_COMMON_STATE
    assert "args" not in common
    assert loaded["deepseek"]["common"] == MEGATRON_LM_COMMON_STATE


def test_megatron_core_at_expert_parallel_size_2_loads_it_strictly_with_transformers_logits(
        models, mtp_logits, tmp_path):
    """Three experts a rank, under their global indices, in the decoder's MoE layers and
    the MTP layer (3) alike; the MTP logits are DeepSeek-V3's."""
    model, _, folder = models["deepseek_mtp"]
    result = megatron_workers.spawn(megatron_mla_workers.load_expert_parallel, 2,
                                    tmp_path / "run", str(folder), _ids())
    ranks = [torch.load(f"{result}.{rank}") for rank in range(2)]
    assert [rank["experts"] for rank in ranks] == [{1: [0, 1, 2], 2: [0, 1, 2], 3: [0, 1, 2]},
                                                   {1: [3, 4, 5], 2: [3, 4, 5], 3: [3, 4, 5]}]
    with torch.no_grad():
        theirs = model(_ids()).logits
    for rank in ranks:
        assert (rank["logits"] - theirs).abs().max() < LOGITS_TOLERANCE
        (mine,) = rank["mtp_logits"]
        assert (mine[:, :-1] - mtp_logits[:, :-1]).abs().max() < LOGITS_TOLERANCE


def test_a_deepseek_megatron_core_saved_at_expert_parallel_size_2_reads_back_whole(
        deepseek, tmp_path):
    """Each rank saved its own experts under per-layer keys; moekit reads every expert,
    each where megatron-core numbers it, and transformers gives megatron-core's logits."""
    assert_expert_parallel_save_reads_back(megatron_mla_workers.save_expert_parallel,
                                           deepseek[1], (1, 2), tmp_path, 0)


def test_a_deepseek_with_mtp_megatron_core_saved_at_expert_parallel_size_2_reads_back_whole(
        models, tmp_path):
    """The MTP layer's experts too (HF layer 3), each where megatron-core numbers it."""
    assert_expert_parallel_save_reads_back(megatron_mla_workers.save_expert_parallel,
                                           models["deepseek_mtp"][1], (1, 2, 3), tmp_path, 1)


def test_expert_parallel_loads_of_the_mtp_folder_hold_transformers_tensors(models, tmp_path):
    """moekit's ``load_experts`` and ``load_sharded`` of the Megatron-Core folder of the
    DeepSeek-V3 with an MTP layer, at EP = 2 (transformers' layout): every tensor is
    transformers' own of a DeepSeek-V3 one layer deeper loaded from the HF files (its
    layer 3 the MTP layer's decoder layer), a rank's experts its 3 rows; the MTP layer's
    own modules and copies are the HF files' tensors."""
    from transformers import AutoModelForCausalLM

    model, hf, folder = models["deepseek_mtp"]
    layer = model.config.num_hidden_layers
    theirs = AutoModelForCausalLM.from_pretrained(hf, num_hidden_layers=layer + 1,
                                                  dtype=torch.float32).state_dict()
    files = load_all(hf)
    own = {f"model.layers.{layer}.{name}" for name in (*MTP_OWN, "embed_tokens.weight",
                                                       "shared_head.head.weight")}
    result = megatron_workers.spawn(megatron_mla_workers.load_with_moekit, 2,
                                    tmp_path / "run", str(folder))
    for rank in range(2):
        for how, mine in torch.load(f"{result}.{rank}").items():
            assert mine.keys() == theirs.keys() | own, (rank, how)
            for key, tensor in mine.items():
                expected = files[key] if key in own else theirs[key]
                if ".mlp.experts." in key:
                    expected = expected[3 * rank:3 * rank + 3]
                assert torch.equal(tensor, expected), (rank, how, key)


def test_a_deepseek_without_interleaved_rope_is_refused_naming_why(tmp_path, capsys):
    hf = samples.save_model(samples.build_model("deepseek_v3", rope_interleave=False),
                            tmp_path / "hf")
    _refused(hf, tmp_path / "out", capsys, "rope_interleave is False")


@pytest.mark.parametrize("copy,main", [("embed_tokens.weight", "model.embed_tokens.weight"),
                                       ("shared_head.head.weight", "lm_head.weight")])
def test_an_mtp_layer_whose_copy_differs_from_the_main_tensor_is_refused(
        models, tmp_path, capsys, copy, main):
    """One element of the MTP layer's copy changed: the bytes differ, which only the write
    finds (the plan reads headers alone); both tensors are named and nothing is left, not
    even the folder the write was under way in."""
    model, hf, _ = models["deepseek_mtp"]
    name = f"model.layers.{model.config.num_hidden_layers}.{copy}"

    def changed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors[name][1, 2] += 1.0
        return tensors

    _refused(_edited_mtp_files(hf, tmp_path / "hf", changed), tmp_path / "out", capsys,
             f"{name} differs from {main}")
    assert [path.name for path in tmp_path.iterdir()] == ["hf"]


def test_an_mtp_layer_whose_copy_has_another_dtype_is_refused_before_writing(
        models, tmp_path, capsys):
    model, hf, _ = models["deepseek_mtp"]
    name = f"model.layers.{model.config.num_hidden_layers}.shared_head.head.weight"
    changed = _edited_mtp_files(hf, tmp_path / "hf", lambda tensors: {
        **tensors, name: tensors[name].to(torch.bfloat16)})
    _refused(changed, tmp_path / "out", capsys, f"{name} is [96, 32] BF16, lm_head.weight "
                                                "[96, 32] F32")


def _edited_mtp_files(source: Path, hf: Path, edit) -> Path:
    """A copy at ``hf`` of the HF folder ``source`` whose MTP layer's file
    (``mtp.safetensors``: ``_add_mtp_layer``) holds what ``edit`` makes of its tensors,
    the index naming them."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, hf)
    tensors = edit(load_file(hf / "mtp.safetensors"))
    save_file(tensors, hf / "mtp.safetensors", metadata={"format": "pt"})
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    index["weight_map"] = {**{k: v for k, v in index["weight_map"].items()
                              if v != "mtp.safetensors"},
                           **dict.fromkeys(tensors, "mtp.safetensors")}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    return hf


def test_inspect_lists_the_mtp_layer_of_the_megatron_folder(models, capsys):
    model, _, folder = models["deepseek_mtp"]
    assert main(["inspect", str(folder), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    layer = model.config.num_hidden_layers
    assert shown["mtp_layers"] == [layer] and layer in shown["moe_layers"]


@pytest.mark.parametrize("declared", [0, None])
def test_an_mtp_layer_that_config_json_does_not_declare_is_refused_naming_it(
        models, tmp_path, capsys, declared):
    """A folder holding ``mtp.layers.0`` whose config.json declares no multi-token-
    prediction layer (``num_nextn_predict_layers`` 0, or absent): its HF layer would follow
    the layers the config gives, so the config, not the tensors, is named."""
    folder = tmp_path / "megatron"
    shutil.copytree(models["deepseek_mtp"][2], folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("num_nextn_predict_layers")
    if declared is not None:
        config["num_nextn_predict_layers"] = declared
    (folder / "config.json").write_text(json.dumps(config))
    _refused_reading(folder, tmp_path / "out", capsys,
                     "holds mtp.layers.0.eh_proj.weight, of multi-token-prediction layer 0, "
                     "but config.json's num_nextn_predict_layers declares 0 such layers")


def test_an_mtp_layer_without_its_copies_reads_back_with_them_and_verify_says_so(
        models, tmp_path, capsys):
    """Files whose MTP layer lacks ``embed_tokens`` and ``shared_head.head`` are written;
    reading back gives them as the main embedding and output layer (DeepSeek's files'
    form), and ``verify`` of the files against the folder names the two, not equal."""
    model, source, _ = models["deepseek_mtp"]
    layer = f"model.layers.{model.config.num_hidden_layers}"
    copies = [f"{layer}.embed_tokens.weight", f"{layer}.shared_head.head.weight"]
    hf = _edited_mtp_files(source, tmp_path / "hf", lambda tensors: {
        k: v for k, v in tensors.items() if k not in copies})
    folder, back = tmp_path / "megatron", tmp_path / "back"
    assert main(["convert", str(hf), str(folder), "--to", "megatron"]) == 0
    assert main(["convert", str(folder), str(back), "--to", "hf"]) == 0
    returned = load_all(back)
    assert torch.equal(returned[copies[0]], returned["model.embed_tokens.weight"])
    assert torch.equal(returned[copies[1]], returned["lm_head.weight"])
    capsys.readouterr()
    assert main(["verify", str(hf), str(folder)]) == 1
    shown = capsys.readouterr().out
    assert "2 differ" in shown and all(f"{name}: only in {folder}" in shown
                                       for name in copies), shown


MTP_GAP = ("holds multi-token-prediction layer 1 (HF layer 4) but not layer 0 (HF layer 3); "
           "megatron-core's multi-token-prediction block chains its layers from the first")
"""The refusal of MTP layer 1 without layer 0, where config.json declares two."""


def _declaring_two_mtp_layers(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 2}))


def test_a_second_mtp_layer_without_the_first_is_refused_before_writing(
        models, tmp_path, capsys):
    """The files' MTP layer renumbered HF layer 4 (config.json declaring two)."""
    hf = _edited_mtp_files(models["deepseek_mtp"][1], tmp_path / "hf", lambda tensors: {
        k.replace("model.layers.3.", "model.layers.4.", 1): v for k, v in tensors.items()})
    _declaring_two_mtp_layers(hf)
    _refused(hf, tmp_path / "out", capsys, MTP_GAP)


def _rewritten(folder: Path, rename) -> None:
    """Rewrite the DCP ``.metadata`` of ``folder``'s iteration with each key as ``rename``
    gives it (None: the tensor taken out)."""
    import dataclasses
    import pickle

    iteration = folder / "iter_0000000"
    metadata = FileSystemReader(str(iteration)).read_metadata()
    metadata.state_dict_metadata = {rename(k): v for k, v in metadata.state_dict_metadata.items()
                                    if rename(k) is not None}
    metadata.storage_data = {dataclasses.replace(index, fqn=rename(index.fqn)): info
                             for index, info in metadata.storage_data.items()
                             if rename(index.fqn) is not None}
    metadata.planner_data = {rename(k): v for k, v in (metadata.planner_data or {}).items()
                             if rename(k) is not None}
    (iteration / ".metadata").write_bytes(pickle.dumps(metadata))


def test_a_folder_of_a_second_mtp_layer_without_the_first_is_refused(models, tmp_path, capsys):
    """moekit's folder with ``mtp.layers.0`` renamed ``mtp.layers.1`` (config.json
    declaring two)."""
    folder = tmp_path / "megatron"
    shutil.copytree(models["deepseek_mtp"][2], folder)
    _declaring_two_mtp_layers(folder)
    _rewritten(folder, lambda key: key.replace("mtp.layers.0.", "mtp.layers.1.", 1))
    _refused_reading(folder, tmp_path / "out", capsys, MTP_GAP)


MTP_WITHOUT_EXPERTS = ("model.layers.2 (the last decoder layer) holds "
                       "mlp.experts.0.down_proj.weight and 17 more, which model.layers.3 "
                       "(multi-token-prediction layer 0) lacks")
"""The refusal of an MTP layer without its routed experts (6 experts' 3 projections),
which megatron-core's MTP layer, built with the last decoder layer's spec, holds."""


def test_an_mtp_layer_without_the_last_layers_experts_is_refused_before_writing(
        models, tmp_path, capsys):
    """Its router and shared experts kept: megatron-core could not load the folder."""
    hf = _edited_mtp_files(models["deepseek_mtp"][1], tmp_path / "hf", lambda tensors: {
        k: v for k, v in tensors.items() if ".mlp.experts." not in k})
    _refused(hf, tmp_path / "out", capsys, MTP_WITHOUT_EXPERTS)


def test_a_folder_whose_mtp_layer_lacks_the_last_layers_experts_is_refused(
        models, tmp_path, capsys):
    """moekit's folder with the MTP layer's expert tensors taken out of its ``.metadata``."""
    folder = tmp_path / "megatron"
    shutil.copytree(models["deepseek_mtp"][2], folder)
    experts = "mtp.layers.0.transformer_layer.mlp.experts."
    _rewritten(folder, lambda key: None if key.startswith(experts) else key)
    _refused_reading(folder, tmp_path / "out", capsys, MTP_WITHOUT_EXPERTS)


def _refused_reading(folder: Path, out: Path, capsys, named: str) -> None:
    assert main(["convert", str(folder), str(out), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err
    assert not out.exists()


def _refused(hf, out, capsys, named: str) -> None:
    assert main(["convert", str(hf), str(out), "--to", "megatron"]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err
    assert not out.exists()


def test_an_fp8_deepseek_is_refused_unless_dequantized(deepseek, tmp_path, capsys):
    """DeepSeek-V3's Hub files hold float8 expert weights with block scales
    (``weight_scale_inv``); Megatron-Core's layout holds neither, so moekit writes it only
    with --dequantize (a scale of 1: the bf16 weights are the float8 values)."""
    from safetensors.torch import save_file

    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(deepseek[1] / "config.json", hf / "config.json")
    tensors = load_all(deepseek[1])
    for key in [k for k in tensors if ".mlp.experts." in k]:
        tensors[key] = tensors[key].to(torch.float8_e4m3fn)
        tensors[key.replace(".weight", ".weight_scale_inv")] = torch.ones(1, 1)
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    _refused(hf, tmp_path / "refused", capsys, "--dequantize")
    out, back = tmp_path / "out", tmp_path / "back"
    assert main(["convert", str(hf), str(out), "--to", "megatron", "--dequantize"]) == 0
    assert main(["convert", str(out), str(back), "--to", "hf"]) == 0
    returned = load_all(back)
    assert not [key for key in returned if key.endswith("_scale_inv")]
    key = "model.layers.1.mlp.experts.0.gate_proj.weight"
    assert torch.equal(returned[key], tensors[key].to(torch.bfloat16))
