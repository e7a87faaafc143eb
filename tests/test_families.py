"""Every MoE model type of the installed transformers, built tiny from its config: moekit
reads what ``save_pretrained`` wrote, converts it into every layout and back byte for byte,
writes the transformers layout as the model's own ``state_dict()``, and transformers loads
the round trip with the same logits.

The model types come from transformers' auto mappings (``tiny_families``), so a new
release's MoE families show up here as failures, not silence. The oracle of every check
is transformers: the files its ``save_pretrained`` writes, its ``state_dict()``, its
logits.
"""

from __future__ import annotations

import re

import pytest
import torch

from moekit import convert, convert_state_dict, inspect, samples
from moekit.errors import MoekitError
from moekit.layouts import HF, TRANSFORMERS, family_named, family_of_model_type, layout_named

from .conftest import load_all, same_bytes
from .tiny_families import (MULTIMODAL, build, build_multimodal, moe_causal_lm_types,
                            multimodal_moe_types, per_expert_pieces)

LAYOUTS = ("hf", "nemo", "transformers", "vllm")
TYPES = moe_causal_lm_types()

SKIPPED = {
    "doge": "Doge's experts are single neurons (rows of mlp.up_embed/down_embed, chosen "
            "by product keys), not gate/up/down matrices: no grouped layout has a place for "
            "them, and moekit reads the checkpoint as a dense one "
            "(test_doge_experts_no_layout_holds_are_named_and_copied)",
    "longcat_flash": "transformers 5.24 saves gate and up rows for LongCat-Flash's "
                     "zero-computation experts, which hold no weights: moekit refuses them, "
                     "and converts the files without them "
                     "(test_longcat_flash_zero_computation_experts)",
}
"""Model types the tests for every family skip, and why."""
REFUSED = [t for t in TYPES if "transformers" in getattr(family_of_model_type(t),
                                                          "unconverted", {})]
"""Model types whose transformers conversion also splits, joins or renames tensors outside
the MoE blocks in ways moekit's renames do not hold: ``--to transformers`` is refused."""
CONVERTED = [t for t in TYPES if t not in REFUSED]


class Tiny:
    """One model type's tiny model, its ``save_pretrained`` folder and what moekit sees."""

    def __init__(self, model_type: str, root) -> None:
        try:
            self.model = build(model_type)
        except Exception as err:  # any failure of transformers to build it tiny
            pytest.skip(f"{model_type} cannot be built tiny: {type(err).__name__}: {err}")
        self.path = root / model_type
        try:
            self.model.save_pretrained(self.path, max_shard_size="200KB")
        except Exception as err:
            pytest.skip(f"transformers cannot save a tiny {model_type}: "
                        f"{type(err).__name__}: {err}")
        self.info = inspect(self.path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """model type -> its ``Tiny``, built on first use and kept for the module."""
    root = tmp_path_factory.mktemp("every-family")
    built: dict[str, Tiny | str] = {}

    def get(model_type: str) -> Tiny:
        if model_type not in built:
            try:
                built[model_type] = Tiny(model_type, root)
            except pytest.skip.Exception as skip:
                built[model_type] = skip.msg
        found = built[model_type]
        if isinstance(found, str):
            pytest.skip(found)
        return found

    return get


def test_the_enumeration_finds_the_known_families():
    """The walk over transformers' mappings finds the families moekit names by hand."""
    assert {"qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "llama4_text",
            "granitemoe", "jamba", "jetmoe", "kimi_linear", "minimax_m2"} <= set(TYPES)


ROUND_TRIPS = [pytest.param(t, layout, id=f"{layout}-{t}") for t in TYPES for layout in LAYOUTS
               if layout not in getattr(family_of_model_type(t), "unconverted", {})]
"""Every model type with every layout moekit writes for it (not where the layout's consumer
converts more than moekit does: transformers for ``REFUSED``, NeMo AutoModel for Gemma 4,
test_gemma4_nemo_layout_is_refused_as_nemo_scales_the_experts)."""


@pytest.mark.parametrize("model_type", TYPES)
def test_save_pretrained_files_are_the_hf_layout(model_type, tiny):
    """What save_pretrained writes is detected as the hf layout, which holds the experts
    grouped (``grouped_for``) exactly where the files hold no tensor of one expert."""
    _skip_listed(model_type)
    model = tiny(model_type)
    assert model.info.layout == "hf"
    per_expert = any(".experts.0." in key for key in load_all(model.path))
    assert HF.grouped_for(family_named(model.info.family)) is not per_expert


@pytest.mark.parametrize("model_type,layout", ROUND_TRIPS)
def test_round_trip_is_byte_identical(model_type, layout, tiny, tmp_path):
    """save_pretrained's files -> layout -> the files' own layout: the same bytes under the
    same names."""
    _skip_listed(model_type)
    model = tiny(model_type)
    assert model.info.moe_layers, f"moekit finds no experts in {model_type}"
    converted, back = tmp_path / layout, tmp_path / "back"
    convert(model.path, converted, to=layout, max_shard_size="100KB")
    convert(converted, back, to=model.info.layout)
    original, restored = load_all(model.path), load_all(back)
    assert original.keys() == restored.keys()
    assert [k for k in original if not same_bytes(original[k], restored[k])] == []


@pytest.mark.parametrize("model_type", CONVERTED)
def test_transformers_layout_is_the_state_dict(model_type, tiny, tmp_path):
    """``--to transformers`` holds ``model.state_dict()``: name for name, byte for byte."""
    _skip_listed(model_type)
    model = tiny(model_type)
    convert(model.path, tmp_path / "fused", to="transformers")
    written, expected = load_all(tmp_path / "fused"), model.model.state_dict()
    assert sorted(written.keys() - expected.keys()) == []
    assert sorted(expected.keys() - written.keys()) == []
    assert [k for k in expected if not same_bytes(written[k], expected[k])] == []


@pytest.mark.parametrize("model_type", REFUSED)
def test_transformers_layout_is_refused_where_transformers_converts_more(model_type, tiny,
                                                                         tmp_path, capsys):
    """Where transformers' state dict holds tensors outside the experts under names that
    no file key takes under moekit's renames (split, joined or otherwise renamed attention),
    ``--to transformers`` is refused with one message naming what transformers converts
    and the layouts that work."""
    from moekit.cli import main

    model = tiny(model_type)
    family = family_of_model_type(model_type)
    renamed = {TRANSFORMERS.from_hf_key(k, family) for k in load_all(model.path)}
    beyond = [k for k in model.model.state_dict() if ".experts." not in k and k not in renamed]
    assert beyond, "transformers holds every non-expert tensor under a name moekit gives"
    with pytest.raises(MoekitError, match=f"the transformers layout of {family.name} is "
                                          "refused as a destination: transformers 5.24 .* use "
                                          "hf, nemo, vllm(, \\w+)* instead"):
        convert(model.path, tmp_path / "fused", to="transformers")
    assert main(["convert", str(model.path), str(tmp_path / "cli"), "--to", "transformers"]) == 2
    assert family.unconverted["transformers"] in capsys.readouterr().err
    assert not (tmp_path / "fused").exists() and not (tmp_path / "cli").exists()
    with pytest.raises(MoekitError, match=f"the transformers layout of {family.name} is "
                                          "refused as a source"):
        convert_state_dict(model.model.state_dict(), "transformers", "hf",
                           config=model.model.config.to_dict())


def test_a_source_refused_by_convert_is_refused_by_expert_parallel_plans_and_loads(
        tiny, tmp_path, capsys):
    """transformers' own state dict of Sarvam-MoE (its attention split, which moekit does
    not undo), saved as a checkpoint: ``convert`` refuses it as a source, and so do ``plan
    --ep`` and the expert-parallel loads, which read the checkpoint as ``plan`` does."""
    from safetensors.torch import save_file

    from moekit.cli import main

    model = tiny("sarvam_moe").model
    folder = tmp_path / "state-dict"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    for command in (["convert", str(folder), str(tmp_path / "out"), "--to", "vllm"],
                    ["plan", str(folder), "--ep", "2", "--layout", "vllm"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "the transformers layout of sarvam_moe is refused as a source" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


_LAYER_EXPERTS = re.compile(r".*layers\.(\d+)\.(?:.*\.)?experts\.(?:routed_experts\.)?"
                            r"(gate_up_proj|up_proj|down_proj|w13_weight|w2_weight)")
"""A layer's routed experts (not its ``shared_experts``) in transformers' and vLLM's names."""
_VLLM_AS_TRANSFORMERS = {"w13_weight": "gate_up_proj", "w2_weight": "down_proj"}


@pytest.mark.parametrize("model_type", REFUSED)
def test_experts_are_transformers_bytes_where_its_layout_is_refused(model_type, tiny, tmp_path):
    """Where ``--to transformers`` is refused, the experts moekit writes are still what
    transformers holds: each MoE layer's vLLM w13_weight and w2_weight (transformers'
    orientation, gate rows before up rows) are its state dict's gate_up_proj and
    down_proj, byte for byte (Inkling 2's interleaved w13 on disk included)."""
    _skip_listed(model_type)
    model = tiny(model_type)
    convert(model.path, tmp_path / "vllm", to="vllm")

    def by_layer(tensors, names):
        found = {}
        for key, tensor in tensors.items():
            match = _LAYER_EXPERTS.fullmatch(key)
            if match:
                found[(int(match[1]), names.get(match[2], match[2]))] = tensor
        return found

    ours = by_layer(load_all(tmp_path / "vllm"), _VLLM_AS_TRANSFORMERS)
    theirs = by_layer(model.model.state_dict(), {})
    assert ours.keys() == theirs.keys() and theirs
    assert [k for k in theirs if not same_bytes(ours[k], theirs[k])] == []


MULTIMODAL_REFUSED = [t for t in MULTIMODAL
                      if "transformers" in family_of_model_type(t).unconverted]
"""Multimodal model types whose transformers layout moekit refuses."""


@pytest.mark.parametrize("model_type", MULTIMODAL_REFUSED)
def test_multimodal_experts_are_transformers_bytes_where_its_layout_is_refused(model_type,
                                                                              tmp_path):
    """Where the towers (Step-3.7's, Kimi-K2.5's and Mistral-Large-4's permuted vision
    attention, ...) keep ``--to transformers`` refused, each MoE layer's vLLM w13_weight and
    w2_weight are still the model's gate_up_proj (a non-gated model's up_proj) and
    down_proj, byte for byte (Step-3.7's three grouped tensors on disk joined, gate rows
    before up rows)."""
    model = build_multimodal(model_type)
    model.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "vllm", to="vllm")
    gated = "gate" in family_of_model_type(model_type).projections
    vllm_names = {**_VLLM_AS_TRANSFORMERS, **({} if gated else {"w13_weight": "up_proj"})}
    ours, theirs = {}, {}
    for found, tensors, names in ((ours, load_all(tmp_path / "vllm"), vllm_names),
                                  (theirs, model.state_dict(), {})):
        for key, tensor in tensors.items():
            match = _LAYER_EXPERTS.fullmatch(key)
            if match:
                found[(int(match[1]), names.get(match[2], match[2]))] = tensor
    assert ours.keys() == theirs.keys() and theirs
    assert [k for k in theirs if not same_bytes(ours[k], theirs[k])] == []


def test_step3p7_multi_token_prediction_layers_are_refused_where_nemo_renumbers_them(
        tmp_path, capsys):
    """Step-3.7's Hub files hold multi-token-prediction layers after the text model's
    ``num_hidden_layers`` (transformers builds none): one its config marks sparse
    (``mtp_mlp_layer_types``, as save_pretrained writes it) vllm takes as a further
    layer, byte for byte both ways; nemo, where NeMo AutoModel renumbers them, is refused
    naming them and why."""
    import json

    from safetensors.torch import save_file

    from moekit.cli import main

    build_multimodal("step3p7").save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    count = config["text_config"]["num_hidden_layers"]
    config["text_config"].update(num_nextn_predict_layers=1, mtp_mlp_layer_types=["sparse"])
    tensors = load_all(tmp_path / "saved")
    last = re.compile(rf"(^|\.)layers\.{count - 1}\.")
    tensors.update({last.sub(rf"\g<1>layers.{count}.", key): value + 1.0
                    for key, value in list(tensors.items()) if last.search(key)})
    src = tmp_path / "mtp"
    src.mkdir()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(config))
    assert main(["convert", str(src), str(tmp_path / "nemo"), "--to", "nemo"]) == 2
    err = capsys.readouterr().err
    assert f"multi-token-prediction layers (layer {count}, after num_hidden_layers {count})" in err
    assert "mtp.layers.N" in err and "Traceback" not in err and not (tmp_path / "nemo").exists()
    convert(src, tmp_path / "vllm", to="vllm")
    convert(tmp_path / "vllm", tmp_path / "back", to="hf")
    back = load_all(tmp_path / "back")
    assert back.keys() == tensors.keys()
    assert [k for k in tensors if not same_bytes(tensors[k], back[k])] == []


def test_step3p7_fp8_scales_travel_with_their_experts(tmp_path, capsys):
    """Step-3.7 FP8 files hold each grouped projection's block scales beside it
    (``moe.gate_proj.weight_scale_inv`` [E, ceil(I/128), ceil(H/128)]): read as the experts'
    scales, they convert into vllm and back byte for byte, and nemo, which holds no
    scales, is refused naming them rather than given the scales under other names."""
    from safetensors.torch import save_file

    from moekit.cli import main

    build_multimodal("step3p7").save_pretrained(tmp_path / "saved")
    tensors = load_all(tmp_path / "saved")
    generator = torch.Generator().manual_seed(0)
    for key in [k for k in tensors if re.search(r"\.moe\.(gate|up|down)_proj\.weight$", k)]:
        experts, rows, columns = tensors[key].shape
        tensors[key] = tensors[key].to(torch.float8_e4m3fn)
        tensors[f"{key}_scale_inv"] = torch.rand(experts, -(-rows // 128), -(-columns // 128),
                                                 generator=generator)
    src = tmp_path / "fp8"
    src.mkdir()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    convert(src, tmp_path / "vllm", to="vllm")
    converted = load_all(tmp_path / "vllm")
    assert any(k.endswith("routed_experts.w13_weight_scale_inv") for k in converted)
    convert(tmp_path / "vllm", tmp_path / "back", to="hf")
    back = load_all(tmp_path / "back")
    assert back.keys() == tensors.keys()
    assert [k for k in tensors if not same_bytes(tensors[k], back[k])] == []
    assert main(["convert", str(src), str(tmp_path / "nemo"), "--to", "nemo"]) == 2
    err = capsys.readouterr().err
    assert "cannot hold the step3p7 experts' down_scale, gate_scale, up_scale" in err
    assert "Traceback" not in err and not (tmp_path / "nemo").exists()


LOGITS_VIA = [pytest.param(t, "nemo" if t in REFUSED else "transformers", id=t) for t in TYPES]
"""Each model type and the grouped layout its logits round trip goes through: transformers
where moekit writes it."""


@pytest.mark.parametrize("model_type,via", LOGITS_VIA)
def test_transformers_loads_the_round_trip_with_the_same_logits(model_type, via, tiny,
                                                                tmp_path):
    """save_pretrained -> a grouped layout -> back: from_pretrained gives the logits it
    gives for the files save_pretrained wrote."""
    _skip_listed(model_type)
    model = tiny(model_type)
    convert(model.path, tmp_path / "fused", to=via)
    convert(tmp_path / "fused", tmp_path / "back", to=model.info.layout)
    ids = samples.sample_input(model.model.config.get_text_config().vocab_size)
    assert torch.equal(_logits(tmp_path / "back", ids), _logits(model.path, ids))


def _logits(path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the model from_pretrained loads from ``path`` (no cache: the hybrid
    models' caches need an attention layer, which a three-layer model may lack). Every
    tensor is copied out of the memory-mapped file first: CPU kernels may round
    differently for data at another alignment, which depends on where a file's header
    ends, not on the weights."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for tensor in (*loaded.parameters(), *loaded.buffers()):
            tensor.data = tensor.data.clone()
        return loaded(ids, use_cache=False).logits


def _skip_listed(model_type: str) -> None:
    if model_type in SKIPPED:
        pytest.skip(SKIPPED[model_type])


MTP_FAMILIES = ["deepseek_v3", "glm4_moe"]


def _with_mtp_layer(path) -> int:
    """Add one multi-token-prediction layer to a saved tiny checkpoint, named as
    DeepSeek-V3's Hub files name it (transformers builds none): a decoder layer at index
    ``num_hidden_layers`` (the last layer's tensors, shifted) plus ``enorm``, ``hnorm``,
    ``eh_proj`` and ``shared_head``, in a shard of its own listed in the index. Returns
    the MTP layer's index."""
    import json

    from safetensors.torch import save_file

    config = json.loads((path / "config.json").read_text())
    mtp, last = config["num_hidden_layers"], f"model.layers.{config['num_hidden_layers'] - 1}."
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    tensors = {f"model.layers.{mtp}." + k[len(last):]: v + 1.0
               for k, v in load_all(path).items() if k.startswith(last)}
    generator = torch.Generator().manual_seed(1)
    for name, shape in {"enorm.weight": (hidden,), "hnorm.weight": (hidden,),
                        "eh_proj.weight": (hidden, 2 * hidden),
                        "shared_head.norm.weight": (hidden,),
                        "shared_head.head.weight": (vocab, hidden)}.items():
        tensors[f"model.layers.{mtp}.{name}"] = torch.randn(shape, generator=generator)
    save_file(tensors, path / "mtp.safetensors", metadata={"format": "pt"})
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"].update({key: "mtp.safetensors" for key in tensors})
    index_file.write_text(json.dumps(index))
    config["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(config))
    return mtp


@pytest.mark.parametrize("model_type", MTP_FAMILIES)
def test_mtp_layers_are_listed_and_converted(model_type, tmp_path):
    """The experts of a multi-token-prediction layer (index num_hidden_layers) are
    converted like any MoE layer's, and transformers, which builds no MTP layer, loads the
    round trip with the logits of the original files."""
    src = tmp_path / "src"
    build(model_type).save_pretrained(src, max_shard_size="40KB")
    mtp = _with_mtp_layer(src)
    info = inspect(src)
    assert info.mtp_layers == [mtp] and info.moe_layers[-1] == mtp
    assert f"multi-token prediction {mtp}" in info.render()
    original = load_all(src)
    for layout in ("nemo", "transformers", "vllm"):
        convert(src, tmp_path / layout, to=layout)
        grouped = load_all(tmp_path / layout)
        assert not any(k.startswith(f"model.layers.{mtp}.mlp.experts.0.") for k in grouped)
        convert(tmp_path / layout, tmp_path / f"{layout}-back", to="hf")
        back = load_all(tmp_path / f"{layout}-back")
        assert back.keys() == original.keys()
        assert [k for k in original if not same_bytes(original[k], back[k])] == []
    ids = samples.sample_input(96)
    assert torch.equal(_logits(tmp_path / "transformers-back", ids), _logits(src, ids))


def test_mtp_layers_are_refused_where_torchtitan_has_no_names_for_them(tmp_path, capsys):
    """torchtitan 0.3 renumbers MTP layers and keeps no per-layer shared_head.head: a
    DeepSeek-V3 source with one is refused with the layer named, and nothing is written."""
    from moekit.cli import main

    src = tmp_path / "src"
    build("deepseek_v3").save_pretrained(src, max_shard_size="40KB")
    mtp = _with_mtp_layer(src)
    assert main(["convert", str(src), str(tmp_path / "titan"), "--to", "torchtitan"]) == 2
    err = capsys.readouterr().err
    assert f"multi-token-prediction layers (layer {mtp}, after num_hidden_layers {mtp})" in err
    assert "Traceback" not in err and not (tmp_path / "titan").exists()


HUB_TRANSPOSED = {"qwen3_vl_moe": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")}
"""Grouped expert tensors that a model type's Hub files hold transposed from what
transformers 5.24's save_pretrained writes: Qwen3-VL-MoE's release files hold gate_up_proj
[E, H, 2I] and down_proj [E, I, H] (transformers transposes them on load)."""


HUB_NAMES = {"kimi_k25": ((r"^language_model\.model\.blocks\.", "language_model.model.layers."),
                          (r"^vision_tower\.encoder\.patch_embed\.", "vision_tower.patch_embed."),
                          (r"^model\.mm_projector\.", "mm_projector."))}
"""Keys that a model type's Hub files name otherwise than transformers 5.24's save_pretrained
(pattern, Hub name): Kimi-K2.5's text layers are ``language_model.model.layers`` on the Hub
(the names NeMo AutoModel 0.7's KimiK25VLStateDictAdapter and its tests read), its patch
embedding ``vision_tower.patch_embed`` and its projector's norm ``mm_projector.pre_norm``
(the MoonViT module names of NeMo's KimiK25VL model, under its ``model.``)."""


HUB_GROUPED = ("qwen3_5_moe",)
"""Model types whose Hub files hold the experts grouped as transformers 5.24's model does
(gate_up_proj [E, 2I, H], gate rows first, and down_proj [E, H, I]) where its
save_pretrained writes one tensor per expert: Qwen3.5-MoE's release files (the form NeMo
AutoModel 0.7's Qwen3_5MoeStateDictAdapter reads)."""
_PER_EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")


def on_the_hub(model_type: str, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """save_pretrained's tensors as the model type's Hub files hold them."""
    if model_type in HUB_GROUPED:
        return _grouped(saved)
    if model_type in HUB_NAMES:
        return {_hub_name(model_type, k): v for k, v in saved.items()}
    turned = HUB_TRANSPOSED.get(model_type, ())
    return {k: v.transpose(1, 2).contiguous() if k.endswith(turned) and turned else v
            for k, v in saved.items()}


def _hub_name(model_type: str, key: str) -> str:
    for pattern, hub in HUB_NAMES[model_type]:
        key = re.sub(pattern, hub, key)
    return key


def _grouped(saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert weights joined into each experts module's gate_up_proj and down_proj."""
    grouped, experts = per_expert_pieces(saved, _PER_EXPERT)
    for module, pieces in experts.items():
        count = len(pieces) // 3
        grouped[f"{module}.gate_up_proj"] = torch.stack(
            [torch.cat([pieces[(e, "gate")], pieces[(e, "up")]]) for e in range(count)])
        grouped[f"{module}.down_proj"] = torch.stack([pieces[(e, "down")] for e in range(count)])
    return grouped


GROUPED = [t for t in MULTIMODAL if family_of_model_type(t).expert_groups]
"""Multimodal model types whose MoE layers hold several expert groups, which some layouts
refuse (tests/test_two_expert_groups.py)."""


@pytest.mark.parametrize("model_type", [t for t in MULTIMODAL if t not in GROUPED])
def test_multimodal_text_experts_convert_and_the_rest_passes_through(model_type, tmp_path):
    """A multimodal checkpoint as save_pretrained writes it: its text model's experts (under
    language_model. or thinker.) convert into every layout and back byte for byte (back
    in the Hub's form where that differs: Qwen3-VL-MoE), every other tensor (vision and
    audio towers, projector) passes through under the layout's name for it (NeMo's
    without Qwen3-Omni's ``thinker.``, as test_nemo_adapters checks), ``--to transformers``
    is the model's state dict, and transformers loads the round trip into that state dict.
    A layout whose consumer converts tensors that moekit does not is refused (transformers
    for MiniMax-M3-VL, Mistral-Large-4, Kimi-K2.5 and Step-3.7; nemo for Gemma 4 and for
    Mistral-Large-4, which NeMo AutoModel builds through transformers). moekit's hf layout
    is the Hub's names where they differ from save_pretrained's (Kimi-K2.5)."""
    try:
        model = build_multimodal(model_type)
        model.save_pretrained(tmp_path / "src", max_shard_size="200KB")
    except Exception as err:  # any failure of transformers to build or save it tiny
        pytest.skip(f"{model_type} cannot be built tiny: {type(err).__name__}: {err}")
    src = tmp_path / "src"
    info = inspect(src)
    assert info.moe_layers and info.family != "qwen_style"
    original = load_all(src)
    towers = {k for k in original if k.startswith(("vit.", "perception.", "model.sam_model."))
              or "visual" in k or "vision" in k}
    assert towers
    unconverted = family_named(info.family).unconverted
    refused = "transformers" in unconverted
    # moekit's hf layout is the Hub's form where the Hub groups experts transposed
    # (Qwen3-VL-MoE) or names tensors otherwise (Kimi-K2.5), and save_pretrained's where
    # the Hub groups them as the model does.
    written_as = original if model_type in HUB_GROUPED else on_the_hub(model_type, original)
    for layout in LAYOUTS:
        if layout in unconverted:
            with pytest.raises(MoekitError, match=f"{layout} layout of .* is refused"):
                convert(src, tmp_path / layout, to=layout)
            continue
        convert(src, tmp_path / layout, to=layout)
        converted = load_all(tmp_path / layout)
        if layout != "transformers":
            named = layout_named(layout).from_hf_key
            family = family_named(info.family)
            others = {k: named(k, family) for k in written_as
                      if ".experts." not in HF.to_hf_key(k, family)}
            assert set(others.values()) <= converted.keys()
            assert [k for k, v in others.items()
                    if not same_bytes(written_as[k], converted[v])] == []
        convert(tmp_path / layout, tmp_path / f"{layout}-back", to=info.layout)
        back = load_all(tmp_path / f"{layout}-back")
        assert back.keys() == written_as.keys()
        assert [k for k in written_as if not same_bytes(written_as[k], back[k])] == []
    expected = model.state_dict()
    if not refused:
        fused = load_all(tmp_path / "transformers")
        assert fused.keys() == expected.keys()
        assert [k for k in expected if not same_bytes(fused[k], expected[k])] == []
    via = next(layout for layout in ("transformers", "nemo", "vllm") if layout not in unconverted)
    reloaded = _multimodal_state_dict(type(model), tmp_path / f"{via}-back")
    assert reloaded.keys() == expected.keys()
    assert [k for k in expected if not same_bytes(reloaded[k], expected[k])] == []


@pytest.mark.parametrize("model_type", [t for t in multimodal_moe_types() if t not in MULTIMODAL])
def test_a_multimodal_moe_model_without_a_family_is_not_taken_for_a_dense_one(model_type,
                                                                             tmp_path, capsys):
    """Every other multimodal model type of the installed transformers whose text model
    declares routed experts, which moekit has no family for: where its keys read as a
    known naming (Qwen3-Omni's thinker alone), it converts to nemo and back byte for
    byte; else nemo is refused, saying that the config declares experts no family reads
    (or naming the family the keys look like), never as a dense model to upcycle; and
    ``inspect`` names the family it reads or refuses the checkpoint (exit 2) saying why,
    never calling it dense."""
    from moekit.cli import main

    src, out = tmp_path / "src", tmp_path / "out"
    try:
        build_multimodal(model_type).save_pretrained(src)
    except Exception as err:  # any failure of transformers to build or save it tiny
        pytest.skip(f"{model_type} cannot be built tiny: {type(err).__name__}: {err}")
    if main(["convert", str(src), str(out), "--to", "nemo"]) == 0:
        convert(out, tmp_path / "back", to="hf")
        original, back = load_all(src), load_all(tmp_path / "back")
        assert back.keys() == original.keys()
        assert [k for k in original if not same_bytes(original[k], back[k])] == []
        assert main(["inspect", str(src)]) == 0
        shown = capsys.readouterr().out
        assert f"family            {inspect(src).family} " in shown and "dense (" not in shown
        return
    err = capsys.readouterr().err
    assert "routed experts" in err or "named as in" in err, err
    assert "upcycle" not in err and "Traceback" not in err
    assert main(["inspect", str(src)]) == 2
    captured = capsys.readouterr()
    assert "routed experts" in captured.err or "named as in" in captured.err, captured.err
    assert "Traceback" not in captured.err and "dense (" not in captured.out + captured.err


def test_qwen3_vl_moe_experts_are_read_in_either_orientation(tmp_path):
    """Qwen3-VL-MoE with a square gate+up (2I == H): its Hub form [E, H, 2I] and
    save_pretrained's [E, 2I, H] share a shape, told apart by down's. Both convert into
    the model's state dict; ``--to hf`` writes save_pretrained's, which transformers
    loads into that state dict (it would load the Hub form untransposed)."""
    from safetensors.torch import save_file

    model = build_multimodal("qwen3_vl_moe", moe_intermediate_size=16)
    model.save_pretrained(tmp_path / "saved")
    text = model.config.text_config
    assert text.hidden_size == 2 * text.moe_intermediate_size
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    save_file(on_the_hub("qwen3_vl_moe", load_all(tmp_path / "saved")), hub / "model.safetensors",
              metadata={"format": "pt"})
    expected = model.state_dict()
    for source in (tmp_path / "saved", hub):
        convert(source, tmp_path / f"{source.name}-tf", to="transformers")
        fused = load_all(tmp_path / f"{source.name}-tf")
        assert fused.keys() == expected.keys()
        assert [k for k in expected if not same_bytes(fused[k], expected[k])] == []
        convert(source, tmp_path / f"{source.name}-hf", to="hf")
        written, saved = load_all(tmp_path / f"{source.name}-hf"), load_all(tmp_path / "saved")
        assert [k for k in saved if not same_bytes(written[k], saved[k])] == []
    reloaded = _multimodal_state_dict(type(model), tmp_path / "hub-hf")
    assert [k for k in expected if not same_bytes(reloaded[k], expected[k])] == []


def test_qwen3_5_moe_hub_files_with_grouped_experts_are_read(tmp_path):
    """Qwen3.5-MoE's Hub files hold the text experts grouped as transformers' model does
    (``on_the_hub``, checked here against the model's state dict) where save_pretrained
    writes them per expert. moekit reads the Hub form as the transformers layout: into
    save_pretrained's files with ``--to hf``, into the nemo tensors it makes of those
    files; and transformers loads the Hub form into that state dict."""
    from safetensors.torch import save_file

    model = build_multimodal("qwen3_5_moe")
    model.save_pretrained(tmp_path / "saved")
    saved, expected = load_all(tmp_path / "saved"), model.state_dict()
    hub = on_the_hub("qwen3_5_moe", saved)
    assert hub.keys() == expected.keys() != saved.keys()
    assert [k for k in expected if not same_bytes(hub[k], expected[k])] == []
    (tmp_path / "hub").mkdir()
    save_file(hub, tmp_path / "hub" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "hub" / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    info = inspect(tmp_path / "hub")
    assert (info.family, info.layout) == ("qwen3_5_moe", "transformers")
    convert(tmp_path / "hub", tmp_path / "hf", to="hf")
    written = load_all(tmp_path / "hf")
    assert written.keys() == saved.keys()
    assert [k for k in saved if not same_bytes(written[k], saved[k])] == []
    for source in ("hub", "saved"):
        convert(tmp_path / source, tmp_path / f"{source}-nemo", to="nemo")
    from_hub, from_saved = load_all(tmp_path / "hub-nemo"), load_all(tmp_path / "saved-nemo")
    assert from_hub.keys() == from_saved.keys()
    assert [k for k in from_saved if not same_bytes(from_hub[k], from_saved[k])] == []
    reloaded = _multimodal_state_dict(type(model), tmp_path / "hub")
    assert [k for k in expected if not same_bytes(reloaded[k], expected[k])] == []


def test_kimi_k25_files_holding_a_tensor_under_both_names_are_refused(tmp_path, capsys):
    """Kimi-K2.5 files holding tensors under both the Hub's names and save_pretrained's
    (``HUB_NAMES``: Hub files copied beside saved ones) are refused, naming a tensor held
    twice, rather than read one copy of it."""
    from safetensors.torch import save_file

    from moekit.cli import main

    build_multimodal("kimi_k25").save_pretrained(tmp_path / "saved")
    saved = load_all(tmp_path / "saved")
    (tmp_path / "both").mkdir()
    hub = {k: v.clone() for k, v in on_the_hub("kimi_k25", saved).items()}
    save_file({**saved, **hub}, tmp_path / "both" / "model.safetensors",
              metadata={"format": "pt"})
    (tmp_path / "both" / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    assert main(["convert", str(tmp_path / "both"), str(tmp_path / "out"), "--to", "nemo"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"holds (\S+) and (\S+), the kimi_k25 Hub files' and transformers' "
                     r"save_pretrained's names of one tensor \((\S+)\): keep one", err), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_kimi_k25_save_pretrained_names_without_a_family_are_told_to_be_kimi_k25(tmp_path):
    """A state dict named as Kimi-K2.5's save_pretrained names it, given without its family
    or config, is refused as Kimi-K2.5's experts, naming the family to give, rather than
    taken for a dense model; given the family, it converts."""
    model = build_multimodal("kimi_k25")
    model.save_pretrained(tmp_path / "saved")
    saved = load_all(tmp_path / "saved")
    with pytest.raises(MoekitError) as refused:
        convert_state_dict(saved, None, "nemo")
    assert re.search(r"named as in kimi_k25 \(hf layout\), e\.g\. "
                     r"language_model\.model\.blocks\.\d+\.mlp\.experts\.", str(refused.value))
    assert "name the family the weights are (family=)" in str(refused.value)
    assert convert_state_dict(saved, None, "nemo", family="kimi_k25").keys() == \
        convert_state_dict(on_the_hub("kimi_k25", saved), None, "nemo",
                           family="kimi_k25").keys()


def test_kimi_k25_inspect_describes_save_pretrained_names_as_the_hub_files(tmp_path):
    """inspect describes Kimi-K2.5 files named as save_pretrained names them (text layers
    as ``blocks``), the Hub's and moekit's nemo of them alike: the dense and MoE layers and
    the shared expert the model's config gives, and bytes for each decoder layer of the
    text model, none for a tower's (a vision tower tensor under ``encoder.layers.N``, N
    past the text model's layers, added to each)."""
    from safetensors.torch import save_file

    model = build_multimodal("kimi_k25")
    model.save_pretrained(tmp_path / "saved")
    saved = load_all(tmp_path / "saved")
    text = model.config.text_config
    tower = {f"vision_tower.encoder.layers.{text.num_hidden_layers + 2}.norm.weight":
             torch.ones(4)}
    for name, tensors in (("as-saved", saved), ("hub", on_the_hub("kimi_k25", saved))):
        (tmp_path / name).mkdir()
        save_file({**tensors, **tower}, tmp_path / name / "model.safetensors",
                  metadata={"format": "pt"})
        (tmp_path / name / "config.json").write_text(
            (tmp_path / "saved" / "config.json").read_text())
    convert(tmp_path / "as-saved", tmp_path / "nemo", to="nemo")
    shown = {name: inspect(tmp_path / name) for name in ("as-saved", "hub", "nemo")}
    dense = list(range(text.first_k_dense_replace))
    for info in shown.values():
        assert info.dense_layers == dense
        assert info.moe_layers == list(range(len(dense), text.num_hidden_layers))
        assert info.shared_expert_intermediate_size == (text.moe_intermediate_size
                                                        * text.n_shared_experts)
        assert sorted(info.layer_bytes) == list(range(text.num_hidden_layers))
        assert info.layer_bytes == shown["hub"].layer_bytes

def test_gemma4_nemo_layout_is_refused_as_nemo_scales_the_experts(tmp_path, capsys):
    """NeMo AutoModel 0.7's Gemma 4 adapter multiplies each layer's router.per_expert_scale
    into its experts' down_projs: what NeMo holds is not the files' bytes moved, so
    ``--to nemo`` is refused, saying why, and nothing is written."""
    from nemo_automodel.components.models.common import BackendConfig
    from nemo_automodel.components.models.gemma4_moe.state_dict_adapter import (
        Gemma4MoEStateDictAdapter)
    from nemo_automodel.components.moe.config import MoEConfig

    from moekit.cli import main

    model = build("gemma4_text")
    model.save_pretrained(tmp_path / "src")
    config, hf = model.config, load_all(tmp_path / "src")
    moe = MoEConfig(dim=config.hidden_size, inter_dim=config.intermediate_size,
                    moe_inter_dim=config.moe_intermediate_size,
                    n_routed_experts=config.num_experts, n_shared_experts=0,
                    n_activated_experts=config.top_k_experts, n_expert_groups=0,
                    n_limited_groups=0, train_gate=True, gate_bias_update_factor=0.0,
                    aux_loss_coeff=0.0, score_func="softmax", route_scale=1.0,
                    norm_topk_prob=False, dtype=torch.float32)
    adapter = Gemma4MoEStateDictAdapter(config, moe, BackendConfig(attn="sdpa", linear="torch",
                                                                    rms_norm="torch"))
    held = next(v for k, v in adapter.from_hf(dict(hf)).items()
                if k.endswith("layers.1.moe.experts.down_projs"))
    moved = hf["model.layers.1.experts.down_proj"].transpose(1, 2).contiguous()
    assert held.shape == moved.shape and not same_bytes(held, moved)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", "nemo"]) == 2
    err = capsys.readouterr().err
    assert "nemo layout of gemma4_text is refused" in err and "per_expert_scale" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def _multimodal_state_dict(model_class: type, path) -> dict[str, torch.Tensor]:
    """The state dict of the ``model_class`` transformers loads from ``path``, which must
    load every tensor it builds (text-only forwards of tiny multimodal models fail in
    transformers itself: Llama 4 lacks image_outputs, GLM-4.5V's rope sections assume its
    head size)."""
    loaded, info = model_class.from_pretrained(path, dtype=torch.float32,
                                               output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    return loaded.state_dict()


def _transformers_renamer(model_type: str):
    """transformers' own load-time renaming of a checkpoint key for ``model_type``: the
    transforms ``get_model_conversion_mapping`` gives a tiny model of it built on the meta
    device (its conversion_mapping.py entries, scoped to the sub-models that have them), or
    the model type's table where no tiny model can be built, applied by
    core_model_loading.rename_source_key: key -> (new name, position of the key among the
    sources its converter joins, or None)."""
    from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                 get_model_conversion_mapping)
    from transformers.core_model_loading import (WeightConverter, WeightRenaming,
                                                 rename_source_key)

    try:
        with torch.device("meta"):
            model = (build_multimodal if model_type in MULTIMODAL else build)(model_type)
        table = get_model_conversion_mapping(model)
    except Exception:  # a model type transformers cannot build tiny: its table alone
        table = get_checkpoint_conversion_mapping(model_type) or []
    renamings = [t for t in table if isinstance(t, WeightRenaming)]
    converters = [t for t in table if isinstance(t, WeightConverter)]

    def renamed(key: str) -> tuple[str, int | None]:
        name, pattern = rename_source_key(key, renamings, converters)
        sources = next((c.source_patterns for c in converters if pattern in c.source_patterns),
                       [])
        return name, sources.index(pattern) if len(sources) > 1 else None

    return renamed


def _key_renamed_by(rule) -> str:
    """A layer-1 key that ``rule`` renames (``.post_ffn_norm.`` ->
    ``model.layers.1.post_ffn_norm.weight``)."""
    if rule.at_start:
        return f"{rule.old}layers.1.mlp.gate.weight"
    return f"model.layers.1{rule.old}" + ("weight" if rule.old.endswith(".") else "")


def _family_cases():
    """Every family and model type whose transformers names moekit states: not those whose
    transformers layout it refuses without renames of its own (MiniMax-M3-VL,
    Mistral-Large-4), nor those with several expert groups (tests/test_two_expert_groups.py)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from moekit.layouts import FAMILIES

    return [pytest.param(family, model_type, id=f"{family.name}-{model_type}")
            for family in FAMILIES for model_type in family.model_types
            if model_type in CONFIG_MAPPING and not family.expert_groups
            and ("transformers" not in family.unconverted or family.renames.get("transformers"))]


@pytest.mark.parametrize("family,model_type", _family_cases())
def test_family_table_agrees_with_transformers_conversion_mapping(family, model_type):
    """Names only, no model: every MoE-block key of a family's Hugging Face files gets the
    name transformers' own conversion table gives it on load (routers and shared experts
    by the family's renames; expert weights the grouped tensor moekit emits them into,
    gate before up). Covers the families transformers cannot build tiny too."""
    renamed = _transformers_renamer(model_type)
    block = family.block.format(layer=1)
    fused = tuple(f".experts.{spec.name}" for spec in TRANSFORMERS.specs(family))
    router = f"{block}.{family.router}"
    keys = [router, router.removesuffix("weight") + "e_score_correction_bias",
            f"{block}.e_score_correction_bias",
            *(_key_renamed_by(rule) for rule in family.renames.get("transformers", ())
              if not rule.old.endswith(fused))]
    if family.shared_expert:
        keys.append(f"{block}.{family.shared_expert}.{family.projections['up']}.weight")
    for key in keys:
        assert renamed(key)[0] == TRANSFORMERS.from_hf_key(key, family), key
    for spec in TRANSFORMERS.specs(family):
        if spec.piece_dims != 2 or not set(spec.projections) <= set(family.projections):
            continue
        grouped = f"{block}.experts.{spec.name}"
        if family.grouped_on_disk:
            assert renamed(HF.from_hf_key(grouped, family))[0] == \
                TRANSFORMERS.from_hf_key(grouped, family)
            continue
        for position, projection in enumerate(spec.projections):
            name, joined_as = renamed(family.expert_key(1, 0, projection))
            assert name == TRANSFORMERS.from_hf_key(grouped, family), projection
            assert joined_as in (None, position), f"{projection} joined at {joined_as}"


def test_longcat_flash_zero_computation_experts(tmp_path):
    """LongCat-Flash's router scores n_routed_experts + zero_expert_num experts, the last
    ones computing nothing. transformers 5.24 saves gate and up rows for them (never read):
    moekit refuses those tensors, naming why. Without them (as the Hub's files are), the
    experts convert into every layout and back byte for byte, and the transformers layout
    holds the state dict's tensors (its gate_up_proj's routed rows)."""
    from safetensors.torch import save_file

    from moekit.errors import MoekitError

    model = build("longcat_flash")
    routed, zero = model.config.n_routed_experts, model.config.zero_expert_num
    model.save_pretrained(tmp_path / "saved")
    with pytest.raises(MoekitError, match=f"zero_expert_num {zero}.*experts without weights"):
        convert(tmp_path / "saved", tmp_path / "refused", to="nemo")
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    weightless = tuple(f".mlp.experts.{e}." for e in range(routed, routed + zero))
    original = {k: v for k, v in load_all(tmp_path / "saved").items()
                if not any(w in k for w in weightless)}
    save_file(original, hub / "model.safetensors", metadata={"format": "pt"})
    assert inspect(hub).n_experts == routed
    for layout in LAYOUTS:
        convert(hub, tmp_path / layout, to=layout)
        convert(tmp_path / layout, tmp_path / f"{layout}-back", to="hf")
        back = load_all(tmp_path / f"{layout}-back")
        assert back.keys() == original.keys()
        assert [k for k in original if not same_bytes(original[k], back[k])] == []
    fused, expected = load_all(tmp_path / "transformers"), model.state_dict()
    assert fused.keys() == expected.keys()
    for key, tensor in expected.items():
        assert same_bytes(fused[key], tensor[:routed] if key.endswith("gate_up_proj") else tensor)


def test_doge_experts_no_layout_holds_are_named_and_copied(tmp_path):
    """Doge's experts are rows of up_embed/down_embed: a grouped layout is refused with
    the experts its config declares named, and --to hf copies the checkpoint byte for
    byte."""
    from moekit.errors import MoekitError

    model = build("doge")
    model.save_pretrained(tmp_path / "src")
    count = model.config.num_experts
    with pytest.raises(MoekitError, match=f"declares {count} routed experts \\(num_experts\\)"):
        convert(tmp_path / "src", tmp_path / "nemo", to="nemo")
    convert(tmp_path / "src", tmp_path / "hf", to="hf")
    original, copied = load_all(tmp_path / "src"), load_all(tmp_path / "hf")
    assert original.keys() == copied.keys()
    assert [k for k in original if not same_bytes(original[k], copied[k])] == []
