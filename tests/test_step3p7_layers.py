"""Step-3.7's MoE layers, read from its config.json as transformers 5.24's
``Step3p7TextConfig`` reads them: ``mlp_layer_types``, else the Hub's legacy
``moe_layers_enum``, with the per-layer lists padded by the multi-token-prediction layers
after the stack. The oracle is transformers' config class and the files its
save_pretrained writes."""

from __future__ import annotations

import json
import re

import pytest

from moekit import convert
from moekit.cli import main
from moekit.model_config import ConfigValues, step3p7_layers

from .conftest import load_all, same_bytes
from .tiny_families import build_multimodal

TEXT_CONFIGS = {
    "hub-enum-string": dict(num_hidden_layers=6, num_nextn_predict_layers=2,
                            moe_layers_enum="1,2, 3,5,6"),
    "hub-enum-list": dict(num_hidden_layers=6, num_nextn_predict_layers=2,
                          moe_layers_enum=[3, "4", 5, 7]),
    "padded-types": dict(num_hidden_layers=6, num_nextn_predict_layers=2,
                         mlp_layer_types=["dense"] * 3 + ["sparse"] * 4 + ["dense"]),
    "default": dict(num_hidden_layers=6),
    "default-with-mtp": dict(num_hidden_layers=6, num_mtp_layers=1),
}
"""Step-3.7 text configs as the Hub writes them (moe_layers_enum as a string or a list,
MTP layers listed or not) and as transformers' defaults leave them."""


def _transformers_sparse(text: dict) -> tuple[set[int], set[int]]:
    """The stack's and the MTP layers' sparse layer numbers, as transformers' config
    class gives them."""
    from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig

    config = Step3p7TextConfig(**text)
    count = config.num_hidden_layers
    return ({i for i, kind in enumerate(config.mlp_layer_types) if kind == "sparse"},
            {count + i for i, kind in enumerate(config.mtp_mlp_layer_types or ())
             if kind == "sparse"})


def _moekit_sparse(text: dict) -> tuple[set[int], set[int]]:
    rule = step3p7_layers(ConfigValues(text, "config.json"))
    mtp = text.get("num_nextn_predict_layers", text.get("num_mtp_layers", 0))
    return ({i for i in range(rule.count) if rule.is_moe(i)},
            {i for i in range(rule.count, rule.count + mtp) if rule.is_moe(i)})


@pytest.mark.parametrize("name", TEXT_CONFIGS)
def test_moe_layers_are_those_transformers_makes_sparse(name):
    """The Hub's form and the form transformers saves (``to_dict``: ``mlp_layer_types``
    cut to the stack, ``mtp_mlp_layer_types`` beside it) give the MoE layers and the MTP
    layers that may hold experts that transformers' config gives."""
    from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig

    text = TEXT_CONFIGS[name]
    expected = _transformers_sparse(text)
    assert expected[0]
    assert _moekit_sparse(text) == expected
    saved = Step3p7TextConfig(**text).to_dict()
    assert _moekit_sparse(saved) == expected


@pytest.mark.parametrize("text,named", [
    (dict(num_hidden_layers=4, mlp_layer_types=["dense", "sparse"]), "has 2 entries"),
    (dict(num_hidden_layers=2, mlp_layer_types=["dense", "moe"]), 'holds ["moe"]'),
    (dict(num_hidden_layers=4, moe_layers_enum="1,two"), 'moe_layers_enum[1] is "two"'),
    (dict(num_hidden_layers=4, moe_layers_enum=3), "moe_layers_enum is 3"),
])
def test_layer_lists_transformers_refuses_are_refused_naming_them(text, named):
    """A per-layer list of the wrong length or kinds, or layer numbers that are not
    numbers, are refused naming the entry (transformers' config class raises too)."""
    from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig

    from moekit.errors import MoekitError

    with pytest.raises(Exception):
        Step3p7TextConfig(**text)
    with pytest.raises(MoekitError, match=re.escape(named)):
        step3p7_layers(ConfigValues(text, "config.json"))


def _hub_like(config: dict, moe_layers: str) -> dict:
    """A save_pretrained config.json of a tiny Step-3.7 rewritten as the Hub's is: the
    MoE layers as ``moe_layers_enum``, one MTP layer (dense, as the Hub's are) padding
    the per-layer attention list."""
    text = {k: v for k, v in config["text_config"].items()
            if k not in ("mlp_layer_types", "mtp_layer_types", "mtp_mlp_layer_types")}
    text.update(moe_layers_enum=moe_layers, num_nextn_predict_layers=1,
                layer_types=[*text["layer_types"], "full_attention"])
    return {**config, "text_config": text}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Step-3.7 (layer 0 dense, layers 1 and 2 MoE) as save_pretrained writes it."""
    path = tmp_path_factory.mktemp("step3p7") / "saved"
    build_multimodal("step3p7").save_pretrained(path)
    return path


def _written(path, tensors: dict, config: dict):
    from safetensors.torch import save_file

    path.mkdir()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return path


def _with_dense_mtp_layer(tensors: dict) -> dict:
    """The tensors with a dense MTP layer 3 after the stack (layer 0's, shifted), as the
    Hub's files hold theirs."""
    return {**tensors, **{key.replace("model.layers.0.", "model.layers.3."): value + 1.0
                          for key, value in tensors.items() if key.startswith("model.layers.0.")}}


@pytest.mark.parametrize("form", ["saved", "hub"])
def test_a_checkpoint_missing_a_moe_layer_is_refused_naming_it(form, saved, tmp_path, capsys):
    """Layer 1's experts removed (router and shared expert kept): refused, exit 2, naming
    the layer and the config values that make it an MoE layer, nothing written; with the
    config as save_pretrained writes it and as the Hub's (moe_layers_enum, MTP padding)."""
    config = json.loads((saved / "config.json").read_text())
    tensors = load_all(saved)
    if form == "hub":
        config, tensors = _hub_like(config, "1,2"), _with_dense_mtp_layer(tensors)
    gone = re.compile(r"model\.layers\.1\.moe\.(gate|up|down)_proj\.weight")
    src = _written(tmp_path / "src", {k: v for k, v in tensors.items() if not gone.fullmatch(k)},
                   config)
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "layer 1 holds no expert tensors" in err, err
    assert ("moe_layers_enum [1, 2]" if form == "hub" else "mlp_layer_types") in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_the_hub_form_with_its_mtp_layer_converts_byte_for_byte(saved, tmp_path, capsys):
    """The tiny files with a dense MTP layer and the Hub's form of the config (which
    transformers reads as the saved one) convert into vllm and back byte for byte; nemo,
    where NeMo AutoModel renumbers the MTP layers, is refused naming the dense one too."""
    from transformers import Step3p7Config

    config = _hub_like(json.loads((saved / "config.json").read_text()), "1,2")
    original = _with_dense_mtp_layer(load_all(saved))
    src = _written(tmp_path / "src", original, config)
    text = Step3p7Config.from_pretrained(src).text_config
    assert text.mlp_layer_types == ["dense", "sparse", "sparse"]
    assert text.mtp_mlp_layer_types == ["dense"]
    convert(src, tmp_path / "vllm", to="vllm")
    convert(tmp_path / "vllm", tmp_path / "back", to="hf")
    back = load_all(tmp_path / "back")
    assert back.keys() == original.keys()
    assert [k for k in original if not same_bytes(original[k], back[k])] == []
    assert main(["convert", str(src), str(tmp_path / "nemo"), "--to", "nemo"]) == 2
    err = capsys.readouterr().err
    assert "multi-token-prediction layers (layer 3, after num_hidden_layers 3)" in err, err
    assert "mtp.layers.N" in err and not (tmp_path / "nemo").exists()
