"""``moekit plan --ep``'s layout and the models it describes from a config.json alone: the
default layout is the first of nemo, transformers, vllm and torchtitan that holds the
checkpoint (named in the output), a refused ``--layout`` offers only layouts ``--layout``
takes that plan it, and a multimodal config is built with the class transformers saves
its files with. The figures are held to the tensors of transformers' own models and files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moekit.cli import main
from moekit.config_headers import DECODERS
from moekit.expert_parallel.ranges import EP_LAYOUTS
from moekit.layouts import TRANSFORMERS, family_of_model_type

from .conftest import load_all
from .test_ep_plan import DEEPSEEK_V3
from .tiny_families import (MULTIMODAL, build, moe_causal_lm_types, saved_multimodal,
                            tiny_config)

NEMO_REFUSED = ("mistral_large4", "deepseek_ocr2", "unlimited_ocr", "inkling_mm_model",
                "nemotron_h_omni", "nemo_speechlm")
"""Multimodal model types whose nemo and transformers layouts are refused (NeMo AutoModel
0.7 has no model of them or converts their towers; transformers 5.24 converts their towers:
tests/test_multimodal_refusals.py and test_nemo_adapters.py check each reason against
their code); torchtitan 0.3 has no model of them."""
BUILT_AS_SAVED = tuple(t for t in MULTIMODAL if TRANSFORMERS.name not in
                       family_of_model_type(t).unconverted
                       and not family_of_model_type(t).expert_groups)
"""Multimodal model types whose transformers model holds the tensors of the files it saves
(moekit plans from their config.json alone), of one expert group a layer."""
CONVERTED = tuple(t for t in MULTIMODAL if TRANSFORMERS.name in
                  family_of_model_type(t).unconverted)
"""Multimodal model types whose tensors transformers 5.24 converts on load."""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model type -> (its tiny multimodal model, its save_pretrained folder), built on first
    use."""
    return saved_multimodal(tmp_path_factory.mktemp("plan-layouts"))


def _plan(capsys, path, *options: str) -> list[dict]:
    assert main(["plan", str(path), "--ep", "2", "--json", *options]) == 0
    return json.loads(capsys.readouterr().out)


def _expert_bytes(model) -> int:
    """Bytes of the experts in transformers' state dict of ``model``."""
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
               if ".experts." in k)


@pytest.mark.parametrize("model_type", NEMO_REFUSED)
def test_the_default_layout_is_the_first_that_holds_the_checkpoint(model_type, saved, capsys):
    """nemo and transformers refused, the ranks load vllm by default, named in the JSON and
    the text, as ``--layout vllm`` plans them; each of the two ranks holds half the bytes
    of the experts of transformers' model (three of its six experts)."""
    model, src = saved(model_type)
    ranks = _plan(capsys, src)
    assert ranks == _plan(capsys, src, "--layout", "vllm")
    assert [r["layout"] for r in ranks] == ["vllm", "vllm"]
    assert [r["expert_bytes"] for r in ranks] == [_expert_bytes(model) // 2] * 2
    assert main(["plan", str(src), "--ep", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "layout vllm: the first of nemo, transformers, vllm, torchtitan that holds the "
        "checkpoint (--layout chooses one)")
    assert main(["plan", str(src), "--ep", "2", "--layout", "vllm"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "layout vllm"


@pytest.mark.parametrize("model_type", NEMO_REFUSED)
def test_a_refused_layout_offers_only_the_layouts_plan_takes_that_plan_it(
        model_type, saved, capsys):
    """An explicit --layout is kept, and refused with the reason; the layouts offered
    instead are exactly those of --layout's choices in which the checkpoint plans (not hf,
    which --layout does not take, nor megatron)."""
    _, src = saved(model_type)
    planned = [name for name in EP_LAYOUTS
               if main(["plan", str(src), "--ep", "2", "--layout", name]) == 0]
    capsys.readouterr()
    assert planned == ["vllm"]
    family = family_of_model_type(model_type)
    for refused in ("nemo", "transformers"):
        assert main(["plan", str(src), "--ep", "2", "--layout", refused]) == 2
        err = capsys.readouterr().err
        assert family.unconverted[refused] in err and "Traceback" not in err
        assert err.rstrip().endswith("what the layout promises: plan --layout vllm"), err
    with pytest.raises(SystemExit):
        main(["plan", str(src), "--ep", "2", "--layout", "hf"])
    assert "invalid choice: 'hf'" in capsys.readouterr().err


@pytest.mark.parametrize("model_type", BUILT_AS_SAVED)
def test_a_multimodal_config_alone_plans_as_its_files(model_type, saved, capsys):
    """transformers builds the class the config's architectures names (the class that saved
    the files, its image-text-to-text or multimodal model): the plan from config.json alone
    is the plan from the files, on a 1 x 2 and a 2 x 2 mesh."""
    _, src = saved(model_type)
    for mesh in ((), ("--dp", "2")):
        assert _plan(capsys, src / "config.json", *mesh) == _plan(capsys, src, *mesh)


def test_gemma4_from_its_config_defaults_to_transformers(saved, capsys):
    """NeMo AutoModel scales Gemma 4's experts (nemo refused, test_families.py): from its
    config.json alone, as from its files, the ranks load the transformers layout."""
    _, src = saved("gemma4")
    assert {r["layout"] for r in _plan(capsys, src / "config.json")} == {"transformers"}


@pytest.mark.parametrize("model_type", CONVERTED)
def test_a_config_whose_tensors_transformers_converts_is_refused(model_type, saved, capsys):
    """transformers' model holds other tensors than the files it loads them from: its
    config.json alone is refused, naming the config and the conversion, and to plan from
    the files."""
    model, src = saved(model_type)
    assert model.state_dict().keys() != load_all(src).keys()
    assert main(["plan", str(src / "config.json"), "--ep", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moekit: error: {src / 'config.json'}: ")
    assert family_of_model_type(model_type).unconverted["transformers"] in err
    assert err.rstrip().endswith("plan from the checkpoint's files instead")


def test_a_config_transformers_builds_no_language_model_of_is_refused(tmp_path, capsys):
    """Switch Transformers (an encoder-decoder MoE) has no causal, image-text-to-text or
    multimodal language model in transformers: without architectures naming its class,
    its config.json alone is refused in one short message."""
    import transformers

    config = transformers.AutoConfig.for_model("switch_transformers")
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText,
                 transformers.AutoModelForMultimodalLM):
        with pytest.raises(ValueError, match="Unrecognized configuration class"):
            auto.from_config(config)
    config.save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path / "config.json"), "--ep", "2"]) == 2
    err = capsys.readouterr().err
    assert err == (f"moekit: error: {tmp_path / 'config.json'}: transformers has no language "
                   "model of model_type 'switch_transformers' to describe its tensors by: "
                   "plan from the checkpoint's files instead\n")


def _offered(err: str) -> set[str]:
    """The layouts a refusal offers (``plan --layout A or --layout B``)."""
    return set(re.findall(r"--layout (\w+)", err))


def _fp8_qwen3_config(folder) -> Path:
    """config.json of a tiny FP8 Qwen3-MoE whose experts (16 rows) are not a whole number
    of 128-row scale blocks: transformers' fused FP8 experts scale gate and up as one grid
    over their joined rows, which moekit cannot fill exactly from these scales."""
    tiny_config("qwen3_moe").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


def _deepseek_v3_bf16(folder) -> Path:
    """DeepSeek-V3's config.json without its quantization_config: bf16 experts and its
    multi-token-prediction layer, which the torchtitan layout cannot hold."""
    config = json.loads(DEEPSEEK_V3.read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


@pytest.mark.parametrize("make", [_fp8_qwen3_config, _deepseek_v3_bf16])
def test_a_refusal_offers_exactly_the_layouts_that_plan(make, tmp_path, capsys):
    """A layout may hold the experts' pieces and still be refused by the planner (the FP8
    scale grid of transformers' fused experts, the MTP layer in torchtitan): a refusal of
    any --layout offers the layouts that then plan, and no other; the default is the
    first of them."""
    config = make(tmp_path)
    planned, offers = [], {}
    for name in EP_LAYOUTS:
        if main(["plan", str(config), "--ep", "2", "--layout", name]) == 0:
            planned.append(name)
            capsys.readouterr()
        else:
            err = capsys.readouterr().err
            assert err.startswith("moekit: error: ") and "Traceback" not in err
            offers[name] = _offered(err)
    assert planned and offers
    assert offers == {name: set(planned) for name in offers}
    assert {r["layout"] for r in _plan(capsys, config)} == {planned[0]}


def test_transformers_refused_for_fp8_scales_defaults_to_vllm(tmp_path, capsys):
    """nemo holds no scales and transformers cannot place these: the ranks load vllm by
    default, and the planner's refusal of --layout transformers (whose remedies are
    convert's: --dequantize, the hf layout) ends with what plan takes instead."""
    config = _fp8_qwen3_config(tmp_path)
    assert {r["layout"] for r in _plan(capsys, config)} == {"vllm"}
    assert main(["plan", str(config), "--ep", "2", "--layout", "transformers"]) == 2
    err = capsys.readouterr().err
    assert "one grid over their joined 32 rows" in err
    assert err.endswith("\nfor expert parallelism: plan --layout vllm\n"), err


@pytest.mark.parametrize("model_type", BUILT_AS_SAVED)
@pytest.mark.parametrize("architectures", [None, ["NoSuchModelClass"]])
def test_a_multimodal_config_naming_no_class_plans_as_its_files(model_type, architectures,
                                                                 saved, tmp_path, capsys):
    """Without a class its architectures names that transformers has, a multimodal config
    is built with the first Auto class that builds a model of its own config class: not
    AutoModelForCausalLM's text model of Llama 4 or Qwen3.5-MoE, which transformers builds
    from their text_config and which holds other tensors than the files."""
    _, src = saved(model_type)
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = architectures
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert _plan(capsys, tmp_path / "config.json") == _plan(capsys, src)


def _built_with_another_models_class() -> list[str]:
    """MoE model types whose config transformers' AutoModelForCausalLM maps to the class
    of another model type (Sarvam-MLA's to DeepseekV3ForCausalLM), built from the config
    itself, whose tensors transformers does not convert."""
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    found = []
    for model_type in moe_causal_lm_types():
        config_class = CONFIG_MAPPING[model_type]
        model_class = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING[config_class]
        family = family_of_model_type(model_type)
        if (model_class.config_class is not config_class
                and "text_config" not in config_class.sub_configs
                and TRANSFORMERS.name not in getattr(family, "unconverted", {})):
            found.append(model_type)
    return found


@pytest.mark.parametrize("model_type", _built_with_another_models_class())
def test_a_config_transformers_builds_with_another_models_class_plans_as_its_files(
        model_type, tmp_path, capsys):
    """transformers builds such a config with the other model type's class (its
    architectures, too, names that class): the plan from config.json alone is the plan
    from the files that model saves."""
    build(model_type).save_pretrained(tmp_path)
    assert _plan(capsys, tmp_path / "config.json") == _plan(capsys, tmp_path)


def test_a_config_is_built_with_the_class_its_architectures_names(tmp_path, capsys):
    """Files saved by Qwen3-Next's sequence-classification model (a score head, no
    lm_head): its config.json names that class, with which the plan from the config alone
    is the plan from the files, not that of the causal LM the Auto classes map it to."""
    import transformers

    from moekit import samples

    model = samples.from_config(tiny_config("qwen3_next"), 0,
                                transformers.Qwen3NextForSequenceClassification._from_config)
    model.save_pretrained(tmp_path / "files")
    config = json.loads((tmp_path / "files" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3NextForSequenceClassification"]
    planned = _plan(capsys, tmp_path / "files" / "config.json")
    assert planned == _plan(capsys, tmp_path / "files")
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": None}))
    assert planned != _plan(capsys, tmp_path / "config.json")


def test_the_described_families_causal_classes_are_transformers_own():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert {t: d.architecture for t, d in DECODERS.items()} == {
        t: MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[t] for t in DECODERS}


def _classification_classes() -> list[tuple[str, str]]:
    """(model type, class) of every head transformers has for the families moekit
    describes from a config alone, other than their causal language models."""
    from transformers.models.auto import modeling_auto

    return [(t, names[t]) for t in DECODERS
            for names in (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
                          modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES)
            if t in names]


@pytest.mark.parametrize("model_type,name", _classification_classes())
def test_a_described_familys_config_naming_another_class_plans_as_its_files(
        model_type, name, tmp_path, capsys):
    """A config.json of a family moekit describes itself, saved by a classification model
    (a score head, no lm_head), plans as the files that model saves; without its
    architectures, as the causal language model's files."""
    import transformers

    from moekit import samples

    model = samples.from_config(tiny_config(model_type), 0,
                                getattr(transformers, name)._from_config)
    model.save_pretrained(tmp_path / "files")
    config = json.loads((tmp_path / "files" / "config.json").read_text())
    assert config["architectures"] == [name]
    planned = _plan(capsys, tmp_path / "files" / "config.json")
    assert planned == _plan(capsys, tmp_path / "files")
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": None}))
    assert planned != _plan(capsys, tmp_path / "config.json")


@pytest.mark.parametrize("architectures", [[], ["DeepseekV3ForCausalLM"] * 2,
                                           ["DeepseekV3ForCausalLM", "Foo"],
                                           ["Foo", "DeepseekV3ForCausalLM"], ["Foo"]])
def test_architectures_that_build_the_causal_lm_plan_as_its_files(architectures, tmp_path,
                                                                   capsys):
    """Where transformers builds the causal language model all the same (no class it
    knows is named first), the config is described as that model's files, MTP layer
    included, as for a config without architectures."""
    config = {**tiny_config("deepseek_v3").to_dict(), "architectures": None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    expected = _plan(capsys, tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({**config,
                                                      "architectures": architectures}))
    assert _plan(capsys, tmp_path / "config.json") == expected


def test_an_fp8_config_with_architectures_not_a_list_is_told_so(tmp_path, capsys):
    config = json.loads(DEEPSEEK_V3.read_text())
    (tmp_path / "config.json").write_text(json.dumps(
        {**config, "architectures": "DeepseekV3ForCausalLM"}))
    assert main(["plan", str(tmp_path / "config.json"), "--ep", "8"]) == 2
    assert capsys.readouterr().err == (
        f"moekit: error: {tmp_path / 'config.json'}: architectures is "
        '"DeepseekV3ForCausalLM"; expected a list of model class names\n')


@pytest.mark.parametrize("architectures", ["Qwen3VLMoeForConditionalGeneration", 5, True,
                                           {"a": 1}, [3], [["Qwen3VLMoeModel"]]])
def test_architectures_not_a_list_of_names_is_refused_in_one_message(architectures, saved,
                                                                     tmp_path, capsys):
    """transformers declares ``architectures: list[str] | None``; any other value is
    refused naming the config and the value, without a traceback."""
    import transformers

    assert transformers.PretrainedConfig.__annotations__["architectures"] == "list[str] | None"
    _, src = saved("qwen3_vl_moe")
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = architectures
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["plan", str(tmp_path / "config.json"), "--ep", "2"]) == 2
    assert capsys.readouterr().err == (
        f"moekit: error: {tmp_path / 'config.json'}: architectures is "
        f"{json.dumps(architectures)}; expected a list of model class names\n")
