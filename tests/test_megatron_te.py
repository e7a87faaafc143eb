"""Megatron-Core ``torch_dist`` checkpoints of models built with megatron-core 0.16.1's
Transformer Engine (TE) layer spec, read by moekit.

Transformer Engine does not install on this CPU machine, and without it megatron-core
cannot build a TE-spec model (its TE classes derive from a ``MagicMock``), so none saves
here. What megatron-core does build without TE is the spec: which module of a layer is a
``TENorm``, an ``IdentityOp`` or a ``TELayerNormColumnParallelLinear``
(``get_gpt_layer_with_transformer_engine_spec`` in megatron/core/models/gpt/
gpt_layer_specs.py, core_v0.16.1, once its import guard is given ``TESpecProvider`` and a
TE version: ``te_renames``). A TE-named folder is then megatron-core's own save of its
local-spec model (moekit's folder loaded strictly by ``megatron_mla_workers.load_and_run``)
with each norm's key renamed from where the local spec stores it to where the TE spec
does, and every ``_extra_state`` object replaced by what a TE 2.x layer saves there
(``te_extra_state``). The experts keep their keys: ``TEGroupedMLP.sharded_state_dict``
(megatron/core/transformer/moe/experts.py) is "interchangable with SequentialMLP's",
``TEGroupedLinear._sharded_state_dict_grouped`` (megatron/core/extensions/
transformer_engine.py) giving each GEMM's ``weight{i}`` the key ``linear_fc{1,2}.weight``
and its global expert's offset.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from moekit import samples
from moekit.cli import main

pytest.importorskip("megatron.core")

from . import megatron_mla_workers, megatron_workers  # noqa: E402
from .test_megatron_checkpoint import assert_back_to_hf  # noqa: E402
from .test_megatron_mla import saved_and_converted  # noqa: E402

TRACKER, ITERATION = "latest_checkpointed_iteration.txt", "iter_0000000"

FUSED_INTO = {
    "input_layernorm": "self_attention.linear_qkv",
    "pre_mlp_layernorm": "mlp.linear_fc1",
    "self_attention.q_layernorm": "self_attention.linear_q_up_proj",
    "self_attention.kv_layernorm": "self_attention.linear_kv_up_proj",
}
"""Each norm of a layer and the linear layer it feeds, where a spec leaving the norm an
``IdentityOp`` fuses it (megatron-core 0.16.1: ``TransformerLayer._forward_attention`` and
``_forward_mlp``; ``MLASelfAttention.get_query_key_value_tensors`` normalises
``q_compressed`` before ``linear_q_up_proj`` and ``kv_compressed`` before
``linear_kv_up_proj``)."""

NORMS = {False: ("input_layernorm", "pre_mlp_layernorm", "self_attention.q_layernorm",
                 "self_attention.k_layernorm"),
         True: ("input_layernorm", "pre_mlp_layernorm", "self_attention.q_layernorm",
                "self_attention.kv_layernorm")}
"""The norms of a layer with Llama-style attention (False) or multi-latent attention."""


def _module(spec, path: str):
    """The module class at ``path`` (dotted submodule names) of a layer spec."""
    for name in path.split("."):
        spec = getattr(spec.submodules, name)
    return getattr(spec, "module", spec)


def _stored_key(spec, norm: str) -> str:
    """The key under which a model of layer spec ``spec`` stores ``norm``'s weight: its
    own, or that of the ``TELayerNormColumnParallelLinear`` it is fused into where it is
    an ``IdentityOp``; then renamed by the spec's ``sharded_state_dict_keys_map``."""
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear
    from megatron.core.transformer.identity_op import IdentityOp

    if _module(spec, norm) is IdentityOp:
        assert _module(spec, FUSED_INTO[norm]) is TELayerNormColumnParallelLinear, norm
        key = f"{FUSED_INTO[norm]}.layer_norm_weight"
    else:
        key = f"{norm}.weight"
    for old, new in spec.submodules.sharded_state_dict_keys_map.items():
        if key.startswith(old):
            key = new + key[len(old):]
    return key


@pytest.fixture(scope="module")
def te_renames() -> dict[tuple[bool, bool], dict[str, str]]:
    """By (multi-latent attention, MoE layer): the norms whose stored key (after
    ``decoder.layers.[N.]``) differs between megatron-core 0.16.1's local and TE layer
    specs, local key to TE key, as the two specs give them (qk_layernorm on, RMSNorm,
    ``moe_grouped_gemm`` off: TEGroupedMLP needs TE's grouped linear, and its keys are
    SequentialMLP's)."""
    import megatron.core.utils
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    from megatron.core.models.gpt import gpt_layer_specs
    from packaging.version import Version

    renames = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(megatron.core.utils, "_te_version", Version("2.8.0"))
        patch.setattr(gpt_layer_specs, "TESpecProvider", TESpecProvider, raising=False)
        for mla in (False, True):
            for moe in (False, True):
                settings = dict(num_experts=4 if moe else None, moe_grouped_gemm=False,
                                qk_layernorm=True, multi_latent_attention=mla)
                te = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**settings)
                local = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm",
                                                                 **settings)
                pairs = [(_stored_key(local, n), _stored_key(te, n)) for n in NORMS[mla]]
                renames[mla, moe] = {old: new for old, new in pairs if old != new}
    return renames


def test_megatron_cores_te_spec_stores_these_norms_elsewhere(te_renames):
    """Llama-style attention: the pre-MLP norm of an MoE layer is a TENorm of its own
    (the local spec's keys map gives every layer's the fused linear's key). MLA: the q and
    kv latents' norms are fused into the up-projections, and a dense layer's pre-MLP norm
    into its linear_fc1."""
    assert te_renames == {
        (False, False): {},
        (False, True): {"mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"},
        (True, False): {
            "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
            "self_attention.q_layernorm.weight":
                "self_attention.linear_q_up_proj.layer_norm_weight",
            "self_attention.kv_layernorm.weight":
                "self_attention.linear_kv_up_proj.layer_norm_weight"},
        (True, True): {
            "self_attention.q_layernorm.weight":
                "self_attention.linear_q_up_proj.layer_norm_weight",
            "self_attention.kv_layernorm.weight":
                "self_attention.linear_kv_up_proj.layer_norm_weight"},
    }


MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "qwen3_moe": lambda: samples.build_model("qwen3_moe", norm_topk_prob=True),
    "qwen3_moe_dense_layer": lambda: samples.build_model("qwen3_moe", norm_topk_prob=True,
                                                         mlp_only_layers=[1]),
    "qwen2_moe": lambda: samples.build_model("qwen2_moe"),
    "mixtral": lambda: samples.build_model("mixtral"),
    "deepseek_v3": lambda: samples.build_model("deepseek_v3"),
    "deepseek_v3_without_q_lora": lambda: samples.build_model("deepseek_v3", q_lora_rank=None),
    "deepseek_v3_mtp": lambda: samples.build_model("deepseek_v3"),
    **{t: (lambda t=t: samples.build_model(t)) for t in ("llama", "mistral", "qwen2", "qwen3")},
}
"""Every model type moekit reads in Megatron-Core's layout: MoE layers alike (layers
stacked) or with dense ones between them (each layer under its own key: Qwen3-MoE's
``mlp_only_layers``, Qwen2-MoE's layer 1, DeepSeek-V3's first layer), MLA with and
without a q LoRA rank and with a multi-token-prediction layer (``WITH_MTP``), and the dense families, whose TE spec stores
every tensor where the local one does."""

WITH_MTP = ("deepseek_v3_mtp",)
"""The models given a multi-token-prediction layer (``test_megatron_mla._add_mtp_layer``):
megatron-core's MTP block builds its decoder layer with the last decoder layer's spec, here
the TE spec's MoE layer (``get_gpt_mtp_block_spec``)."""


def _ids() -> torch.Tensor:
    return samples.sample_input(96)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path, Path]]:
    """By name of ``MODELS``: the transformers model, its HF folder, and megatron-core's
    own save of its local-spec model holding it (moekit's folder of it loaded strictly).
    One process for all (megatron-core imports slowly)."""
    made, folders = {}, []
    for name, build in MODELS.items():
        model = build()
        hf, folder = saved_and_converted(model, tmp_path_factory.mktemp(name), name in WITH_MTP)
        made[name] = model, hf
        folders.append(str(folder))
    result = megatron_workers.spawn(megatron_mla_workers.load_and_run, 1,
                                    tmp_path_factory.mktemp("load"), folders, _ids())
    return {name: (*made[name], Path(f"{result}.{n}.saved")) for n, name in enumerate(MODELS)}


def te_extra_state() -> bytes:
    """The bytes megatron-core 0.16.1 stores for a TE layer's ``_extra_state`` object: the
    list of the saving ranks' objects, ``torch.save``d (``_mcore_to_torch_sharded_object``
    in dist_checkpointing/strategies/torch.py), each what a TE 2.x module's
    ``get_extra_state`` returns: its FP8 metadata pickled into a uint8 tensor."""
    state = {"recipe": "DelayedScaling(margin=0, fp8_format=HYBRID)",
             "scale_fwd": torch.ones(3), "amax_history_fwd": torch.rand(16, 3),
             "extra_fp8_variables": {"num_gemms": 1}}
    data = io.BytesIO()
    torch.save([torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)], data)
    return data.getvalue()


_LAYER_KEY = re.compile(
    r"(decoder\.layers\.(?:\d+\.)?|mtp\.layers\.\d+\.transformer_layer\.)(.*)")
"""A decoder layer's key (of the stacked layers, or of one layer), or that of an MTP
layer's decoder layer: its prefix and the rest."""


def te_keys(keys, renames: dict[tuple[bool, bool], dict[str, str]], mla: bool
            ) -> dict[str, str]:
    """The TE spec's key of each local-spec key that differs: a layer (the stacked ones
    together) is an MoE layer where it holds a router."""
    found = [(key, match[1], match[2]) for key in keys if (match := _LAYER_KEY.fullmatch(key))]
    routers = {prefix for _, prefix, rest in found if rest == "mlp.router.weight"}
    moved = {}
    for key, prefix, rest in found:
        new = renames[mla, prefix in routers].get(rest)
        if new is not None:
            moved[key] = prefix + new
    return moved


def edit_folder(iteration: Path, renamed: dict[str, str], added: dict[str, str],
                extra_state: bytes | None) -> None:
    """Rewrite the DCP ``.metadata`` of ``iteration``: the tensors of ``renamed`` under
    their new keys, each new key of ``added`` a further tensor holding the bytes of the
    one it names, and (``extra_state``) every ``_extra_state`` object holding those bytes,
    written to a data file of its own."""
    metadata = FileSystemReader(str(iteration)).read_metadata()

    def name(key: str) -> str:
        return renamed.get(key, key)

    entries = {name(k): v for k, v in metadata.state_dict_metadata.items()}
    storage = {dataclasses.replace(index, fqn=name(index.fqn)): info
               for index, info in metadata.storage_data.items()}
    for new, old in added.items():
        entries[new] = entries[old]
        storage.update({dataclasses.replace(index, fqn=new): info
                        for index, info in list(storage.items()) if index.fqn == old})
    if extra_state is not None:
        objects = [k for k, v in entries.items()
                   if isinstance(v, BytesStorageMetadata) and "._extra_state/" in k]
        assert objects, iteration
        (iteration / "__te_extra_state.distcp").write_bytes(extra_state * len(objects))
        at = {key: n * len(extra_state) for n, key in enumerate(objects)}
        storage = {index: (dataclasses.replace(info, relative_path="__te_extra_state.distcp",
                                               offset=at[index.fqn], length=len(extra_state))
                           if index.fqn in at else info)
                   for index, info in storage.items()}
    assert metadata.planner_data is None  # megatron-core's planner keeps no key paths
    metadata.state_dict_metadata, metadata.storage_data = entries, storage
    (iteration / ".metadata").write_bytes(pickle.dumps(metadata))


def te_folder(saved: Path, hf: Path, out: Path, renames, model_type: str,
              added: dict[str, str] | None = None, keep: tuple[str, ...] = ()) -> Path:
    """A Megatron-Core folder (tracker, ``iter_0000000/``, config.json) of megatron-core's
    save ``saved`` under the TE spec's keys (but those of ``keep``) with TE's
    ``_extra_state`` objects, and the tensors of ``added``."""
    shutil.copytree(saved, out / ITERATION)
    shutil.copy(hf / "config.json", out / "config.json")
    (out / TRACKER).write_text("0")
    keys = FileSystemReader(str(saved)).read_metadata().state_dict_metadata
    moved = te_keys(keys, renames, model_type == "deepseek_v3")
    edit_folder(out / ITERATION, {k: v for k, v in moved.items() if k not in keep},
                added or {}, te_extra_state())
    return out


RENAMED = {"qwen3_moe": 1, "qwen3_moe_dense_layer": 2, "qwen2_moe": 2, "mixtral": 1,
           "deepseek_v3": 7, "deepseek_v3_without_q_lora": 4, "deepseek_v3_mtp": 9,
           "llama": 0, "mistral": 0, "qwen2": 0, "qwen3": 0}
"""Keys the TE spec gives otherwise, by name of ``MODELS`` (3 layers, stacked where alike):
the pre-MLP norm of the MoE layers (one stacked key, or two where layer 1 is dense);
DeepSeek-V3's q and kv norms in each of its 3 layers (kv only without a q LoRA rank) and
its dense first layer's pre-MLP norm, and those of its MTP layer's MoE layer."""


@pytest.mark.parametrize("name", MODELS)
def test_a_te_spec_folder_reads_back_byte_identical_with_transformers_logits(
        saved, te_renames, tmp_path, name):
    """Its TE ``_extra_state`` objects are not read as weights."""
    model, hf, megatron_save = saved[name]
    keys = FileSystemReader(str(megatron_save)).read_metadata().state_dict_metadata
    assert len(te_keys(keys, te_renames, name.startswith("deepseek"))) == RENAMED[name]
    folder = te_folder(megatron_save, hf, tmp_path / "te", te_renames, model.config.model_type)
    assert_back_to_hf(model, hf, folder, tmp_path / "back")


def test_inspect_and_verify_read_a_te_spec_folder(saved, te_renames, tmp_path, capsys):
    model, hf, megatron_save = saved["deepseek_v3"]
    folder = te_folder(megatron_save, hf, tmp_path / "te", te_renames, "deepseek_v3")
    assert main(["inspect", str(folder), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["family"], shown["layout"]) == ("deepseek_v3", "megatron")
    assert main(["verify", str(hf), str(folder)]) == 0
    assert "bit-identical" in capsys.readouterr().out


def _refused(folder: Path, out: Path, capsys) -> str:
    assert main(["convert", str(folder), str(out), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit: error: ") and "Traceback" not in err, err
    assert not out.exists()
    return err


@pytest.mark.parametrize("name,keep,named", [
    ("deepseek_v3", ("decoder.layers.2.self_attention.kv_layernorm.weight",),
     "holds decoder.layers.0.mlp.linear_fc1.layer_norm_weight, as megatron-core's Transformer "
     "Engine layer spec names it, and decoder.layers.2.self_attention.kv_layernorm.weight, "
     "as its local layer spec does"),
    ("qwen3_moe_dense_layer", ("decoder.layers.2.mlp.linear_fc1.layer_norm_weight",),
     "holds decoder.layers.0.pre_mlp_layernorm.weight, as megatron-core's Transformer Engine "
     "layer spec names it, and decoder.layers.2.mlp.linear_fc1.layer_norm_weight"),
])
def test_a_folder_mixing_the_two_specs_names_is_refused_naming_a_key_of_each(
        saved, te_renames, tmp_path, capsys, name, keep, named):
    model, hf, megatron_save = saved[name]
    folder = te_folder(megatron_save, hf, tmp_path / "te", te_renames,
                       model.config.model_type, keep=keep)
    assert named in _refused(folder, tmp_path / "out", capsys)


@pytest.mark.parametrize("name,added", [
    # A LayerNorm model's fused norm bias (TELayerNormColumnParallelLinear's layer_norm_bias).
    ("qwen3_moe", {"decoder.layers.self_attention.linear_qkv.layer_norm_bias":
                   "decoder.layers.self_attention.linear_qkv.layer_norm_weight"}),
    # A dense layer's pre-MLP norm kept apart, which neither spec does.
    ("llama", {"decoder.layers.pre_mlp_layernorm.weight":
               "decoder.layers.mlp.linear_fc1.layer_norm_weight"}),
])
def test_a_te_name_moekit_does_not_know_is_refused_naming_it(saved, te_renames, tmp_path,
                                                            capsys, name, added):
    model, hf, megatron_save = saved[name]
    folder = te_folder(megatron_save, hf, tmp_path / "te", te_renames,
                       model.config.model_type, added=added)
    err = _refused(folder, tmp_path / "out", capsys)
    assert f"holds {next(iter(added))}, which moekit has no HF name for" in err, err
