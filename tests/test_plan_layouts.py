"""``moekit plan --ep``'s layout and the models it describes from a config.json alone: the
default layout is the first of nemo, transformers, vllm and torchtitan that holds the
checkpoint (named in the output), a refused ``--layout`` offers only layouts ``--layout``
takes that plan it, and a multimodal config is built with the class transformers saves
its files with. The figures are held to the tensors of transformers' own models and files."""

from __future__ import annotations

import json

import pytest

from moekit.cli import main
from moekit.expert_parallel.ranges import EP_LAYOUTS
from moekit.layouts import TRANSFORMERS, family_of_model_type

from .conftest import load_all
from .tiny_families import MULTIMODAL, build_multimodal

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
    root, built = tmp_path_factory.mktemp("plan-layouts"), {}

    def get(model_type: str):
        if model_type not in built:
            model = build_multimodal(model_type)
            model.save_pretrained(root / model_type)
            built[model_type] = model, root / model_type
        return built[model_type]

    return get


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
