"""Expert LoRA adapters saved by PEFT for a tiny transformers MoE model: per-expert and
NeMo grouped forms, byte-identical round trips, and PEFT's own delta weights as oracle.

PEFT laid out fused-expert LoRA one way up to 0.19.0 and the other way from 0.19.1
(``moekit.lora.PeftLayout``). Adapters and delta weights saved by releases on both sides
of the change are kept under tests/data/peft_expert_lora/ (``make_fixture.py`` there
regenerates them), so both are checked without installing old releases; the installed
PEFT is checked live.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit import MoekitError, samples
from moekit.lora import (PeftLayout, hf_to_peft, nemo_to_peft, parameter_order, peft_layout,
                         peft_to_hf, peft_to_nemo)

from .conftest import load_all, same_bytes

E, R = 6, 4
FIXTURES = Path(__file__).parent / "data" / "peft_expert_lora"
RELEASES = {"0.18.1": PeftLayout.A_OUT, "0.19.0": PeftLayout.A_OUT, "0.19.1": PeftLayout.A_IN}
"""PEFT releases with a saved fixture, and the layout each writes for Qwen3-MoE experts."""
FIXTURE_EXPERTS = 3
PREFIX = "base_model.model.model.layers.{}.mlp.experts"
QWEN = "qwen3_moe"
"""The model_type of the sample and of the fixtures' model (gate and up concatenated)."""


def saved_with_random_weights(wrapped, folder):
    """A PEFT model with every LoRA weight drawn from N(0, 0.3) (PEFT initialises B to
    zero, which would hide a misplaced factor), saved into ``folder``."""
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
    wrapped.save_pretrained(folder)
    return wrapped


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A PEFT adapter on the experts (and q_proj) of the Qwen3-MoE sample, saved by the
    installed peft, with every LoRA weight drawn at random (PEFT initialises B to zero)."""
    peft = pytest.importorskip("peft")
    model = samples.build_model("qwen3_moe")
    config = peft.LoraConfig(r=R, lora_alpha=8, target_modules=["q_proj"],
                             target_parameters=["mlp.experts.gate_up_proj",
                                                "mlp.experts.down_proj"])
    folder = tmp_path_factory.mktemp("lora")
    return folder, saved_with_random_weights(peft.get_peft_model(model, config), folder)


def _fixture(release: str) -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor]]:
    """The adapter tensors, adapter_config.json and PEFT's delta weights saved by ``release``."""
    folder = FIXTURES / f"peft-{release}"
    config = json.loads((folder / "adapter_config.json").read_text())
    return (load_file(folder / "adapter_model.safetensors"), config,
            load_file(folder / "delta_weights.safetensors"))


def _delta_weights(wrapped) -> dict[str, torch.Tensor]:
    """PEFT's ``get_delta_weight`` of every wrapped expert parameter of a PEFT model, keyed
    as in the fixtures' delta_weights.safetensors."""
    deltas = {}
    for i, layer in enumerate(wrapped.base_model.model.model.layers):
        wrapper = layer.mlp.experts
        while hasattr(wrapper, "parameter_name"):
            deltas[f"model.layers.{i}.mlp.experts.{wrapper.parameter_name}"] = (
                wrapper.get_delta_weight("default").detach())
            wrapper = wrapper.base_layer
    return deltas


def _assert_per_expert_deltas(hf: dict[str, torch.Tensor], nemo: dict[str, torch.Tensor],
                              deltas: dict[str, torch.Tensor], scaling: float) -> None:
    """Per expert, B @ A of the per-expert form and A @ B of NeMo's equal PEFT's delta
    weights of gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""
    layers = sorted({key.split(".")[2] for key in deltas}, key=int)
    for layer in layers:
        prefix = PREFIX.format(layer)
        gate_up = deltas[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = deltas[f"model.layers.{layer}.mlp.experts.down_proj"]
        inter = down.shape[2]
        for e in range(gate_up.shape[0]):
            def delta(proj):
                return (hf[f"{prefix}.{e}.{proj}_proj.lora_B.weight"]
                        @ hf[f"{prefix}.{e}.{proj}_proj.lora_A.weight"]) * scaling
            torch.testing.assert_close(delta("gate"), gate_up[e][:inter])
            torch.testing.assert_close(delta("up"), gate_up[e][inter:])
            torch.testing.assert_close(delta("down"), down[e])
            grouped = (nemo[f"{prefix}.lora_gate_and_up_A"][e]
                       @ nemo[f"{prefix}.lora_gate_and_up_B"][e]) * scaling
            torch.testing.assert_close(grouped, gate_up[e].T)
            grouped = (nemo[f"{prefix}.lora_down_A"][e] @ nemo[f"{prefix}.lora_down_B"][e]) * scaling
            torch.testing.assert_close(grouped, down[e].T)


def test_round_trips_through_per_expert_and_nemo_forms_are_byte_identical(adapter):
    folder, _ = adapter
    saved = load_all(folder)
    parameters = parameter_order(saved)
    assert parameters == ("gate_up_proj", "down_proj")
    hf, nemo = peft_to_hf(saved, E, model_type=QWEN), peft_to_nemo(saved, E, model_type=QWEN)
    for back in (hf_to_peft(hf, E, parameters, model_type=QWEN),
                 nemo_to_peft(nemo, E, parameters, model_type=QWEN)):
        assert back.keys() == saved.keys()
        assert all(same_bytes(back[k], saved[k]) for k in saved)


def test_installed_peft_writes_the_layout_of_its_release(adapter):
    from packaging.version import Version

    peft = pytest.importorskip("peft")
    folder, _ = adapter
    expected = (PeftLayout.A_IN if Version(peft.__version__) >= Version("0.19.1")
                else PeftLayout.A_OUT)
    assert peft_layout(load_all(folder)) is expected


def test_per_expert_deltas_equal_peft_own_delta_weights(adapter):
    folder, wrapped = adapter
    hf = peft_to_hf(load_all(folder), E, model_type=QWEN)
    nemo = peft_to_nemo(load_all(folder), E, model_type=QWEN)
    experts = wrapped.base_model.model.model.layers[1].mlp.experts
    _assert_per_expert_deltas(hf, nemo, _delta_weights(wrapped), experts.scaling["default"])
    prefix = PREFIX.format(1)
    assert nemo[f"{prefix}.lora_gate_and_up_A"].shape == (E, 32, R)
    assert nemo[f"{prefix}.lora_down_B"].shape == (E, R, 32)
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in nemo


@pytest.mark.parametrize("release", RELEASES)
def test_each_peft_release_layout_is_read_from_the_shapes(release):
    saved, config, _ = _fixture(release)
    assert config["peft_version"] == release
    assert peft_layout(saved) is RELEASES[release]


@pytest.mark.parametrize("release", RELEASES)
def test_per_expert_deltas_equal_the_delta_weights_of_the_peft_release_that_saved_them(release):
    saved, config, deltas = _fixture(release)
    _assert_per_expert_deltas(peft_to_hf(saved, FIXTURE_EXPERTS, model_type=QWEN),
                              peft_to_nemo(saved, FIXTURE_EXPERTS, model_type=QWEN), deltas,
                              config["lora_alpha"] / config["r"])


@pytest.mark.parametrize("release", RELEASES)
def test_round_trips_keep_each_release_layout_byte_for_byte(release):
    saved, _, _ = _fixture(release)
    n, parameters, layout = FIXTURE_EXPERTS, parameter_order(saved), peft_layout(saved)
    hf, nemo = peft_to_hf(saved, n, model_type=QWEN), peft_to_nemo(saved, n, model_type=QWEN)
    for back in (hf_to_peft(hf, n, parameters, layout, model_type=QWEN),
                 nemo_to_peft(nemo, n, parameters, layout, model_type=QWEN)):
        assert back.keys() == saved.keys()
        assert all(same_bytes(back[k], saved[k]) for k in saved)


def test_an_old_layout_adapter_converted_to_the_new_loads_in_the_installed_peft_unchanged(tmp_path):
    """peft 0.18.1's adapter rewritten as PeftLayout.A_IN and loaded by the installed
    PEFT (0.19.1 or later) has the delta weights 0.18.1 computed."""
    peft = pytest.importorskip("peft")
    from packaging.version import Version

    if Version(peft.__version__) < Version("0.19.1"):
        pytest.skip(f"installed peft {peft.__version__} reads the old layout itself")
    saved, config, deltas = _fixture("0.18.1")
    converted = hf_to_peft(peft_to_hf(saved, FIXTURE_EXPERTS, model_type=QWEN),
                           FIXTURE_EXPERTS, parameter_order(saved), PeftLayout.A_IN,
                           model_type=QWEN)
    assert not all(same_bytes(converted[k], saved[k]) for k in saved)
    save_file(converted, tmp_path / "adapter_model.safetensors")
    shutil.copy(FIXTURES / "peft-0.18.1" / "adapter_config.json", tmp_path)
    model = samples.build_model("qwen3_moe", hidden_size=8, moe_intermediate_size=4,
                                num_experts=FIXTURE_EXPERTS, num_hidden_layers=2, vocab_size=16)
    loaded = _delta_weights(peft.PeftModel.from_pretrained(model, tmp_path))
    assert loaded.keys() == deltas.keys()
    for key, delta in deltas.items():
        torch.testing.assert_close(loaded[key], delta)


def test_per_expert_lora_with_different_gate_and_up_a_is_refused(adapter):
    folder, _ = adapter
    hf = peft_to_hf(load_all(folder), E, model_type=QWEN)
    key = "base_model.model.model.layers.2.mlp.experts.3.up_proj.lora_A.weight"
    hf[key] = hf[key] + 1
    with pytest.raises(MoekitError, match=r"experts \[3\] have different gate and up lora_A"):
        hf_to_peft(hf, E, model_type=QWEN)


def test_expert_lora_shapes_that_fit_no_peft_layout_are_refused_by_layer():
    saved, _, _ = _fixture("0.19.1")
    key = PREFIX.format(1) + ".lora_A.weight"
    saved[key] = torch.zeros(6, 5)
    with pytest.raises(MoekitError, match=r"layers\.1\.mlp\.experts: LoRA shapes .*"
                                          r"lora_A\.weight \[6, 5\].* fit neither PEFT layout"):
        peft_to_hf(saved, FIXTURE_EXPERTS, model_type=QWEN)


def test_an_expert_count_that_does_not_divide_the_lora_rows_is_refused():
    saved, _, _ = _fixture("0.18.1")
    with pytest.raises(MoekitError, match=r"has 6 rows .* n_experts \(4\) times"):
        peft_to_nemo(saved, 4, model_type=QWEN)


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("n_experts", [1, 2, 6])
def test_an_expert_count_that_divides_the_rows_but_is_wrong_is_caught_by_the_rank(release,
                                                                                 n_experts):
    """3 experts of rank 2 have 6 rows; 1, 2 or 6 experts divide them too, with the
    experts' rows split wrongly. The adapter's rank (adapter_config.json's r) tells."""
    saved, config, _ = _fixture(release)
    for convert in (peft_to_hf, peft_to_nemo):
        with pytest.raises(MoekitError, match=rf"expected n_experts x rank = {n_experts} x "
                                              rf"{config['r']} = {n_experts * config['r']}"):
            convert(saved, n_experts, rank=config["r"], model_type=QWEN)
    assert peft_to_nemo(saved, FIXTURE_EXPERTS, rank=config["r"], model_type=QWEN).keys() == \
        peft_to_nemo(saved, FIXTURE_EXPERTS, model_type=QWEN).keys()
    with pytest.raises(MoekitError, match="rank must be the LoRA rank"):
        peft_to_hf(saved, FIXTURE_EXPERTS, rank=2.0, model_type=QWEN)


def test_an_adapter_whose_layers_disagree_on_the_layout_has_no_single_layout():
    old, _, _ = _fixture("0.18.1")
    new, _, _ = _fixture("0.19.1")
    mixed = {**{k: v for k, v in old.items() if ".layers.0." in k},
             **{k: v for k, v in new.items() if ".layers.1." in k}}
    with pytest.raises(MoekitError, match=r"layers\.0\.mlp\.experts: A_OUT, .*"
                                          r"layers\.1\.mlp\.experts: A_IN"):
        peft_layout(mixed)


@pytest.mark.parametrize("expert", ["03", "\N{ARABIC-INDIC DIGIT THREE}", str(E)])
def test_a_per_expert_lora_key_numbered_other_than_0_to_e_minus_1_is_refused(adapter, expert):
    folder, _ = adapter
    hf = peft_to_hf(load_all(folder), E, model_type=QWEN)
    hf[f"base_model.model.model.layers.2.mlp.experts.{expert}.up_proj.lora_A.weight"] = (
        torch.zeros(1))
    with pytest.raises(MoekitError, match="expert number is not one of"):
        hf_to_peft(hf, E, model_type=QWEN)


@pytest.mark.parametrize("n_experts", [0, -3, 10**9, 4.0, True, None])
def test_every_conversion_refuses_an_expert_count_out_of_range(adapter, n_experts):
    folder, _ = adapter
    saved = load_all(folder)
    hf, nemo = peft_to_hf(saved, E, model_type=QWEN), peft_to_nemo(saved, E, model_type=QWEN)
    for convert, source in ((hf_to_peft, hf), (nemo_to_peft, nemo), (peft_to_hf, saved),
                            (peft_to_nemo, saved)):
        with pytest.raises(MoekitError, match="n_experts must be an integer from 1 to"):
            convert(source, n_experts, model_type=QWEN)


def _nemo_fixture() -> dict[str, torch.Tensor]:
    saved, _, _ = _fixture("0.19.1")
    return peft_to_nemo(saved, FIXTURE_EXPERTS, model_type=QWEN)


NEMO_DOWN_A = PREFIX.format(0) + ".lora_down_A"


@pytest.mark.parametrize("damage,found", [
    (lambda t: t.pop(PREFIX.format(0) + ".lora_down_B"),
     "NeMo expert LoRA lacks base_model.model.model.layers.0.mlp.experts.lora_down_B"),
    (lambda t: t.update({NEMO_DOWN_A: t[NEMO_DOWN_A][:2]}),
     r"lora_down_A \[2, 4, 2\]; expected \[n_experts \(3\), ., .\] each"),
    (lambda t: t.update({NEMO_DOWN_A: t[NEMO_DOWN_A][..., :1]}),
     r"r_down is not one size: down_A \[1, 4\], down_B \[8, 2\]"),
    (lambda t: t.update({PREFIX.format(0) + ".lora_gate_and_up_B":
                         t[PREFIX.format(0) + ".lora_gate_and_up_B"][..., :7]}),
     "holds gate then up, of equal size"),
    (lambda t: t.update({NEMO_DOWN_A: None}), "lora_down_A is a NoneType, not a torch.Tensor"),
], ids=["missing tensor", "fewer experts", "another rank", "odd gate+up", "not a tensor"])
def test_nemo_lora_that_does_not_fit_together_is_refused_by_layer(damage, found):
    nemo = _nemo_fixture()
    damage(nemo)
    with pytest.raises(MoekitError, match=found):
        nemo_to_peft(nemo, FIXTURE_EXPERTS, model_type=QWEN)


def test_nemo_lora_of_more_experts_than_n_experts_is_refused_not_cut():
    with pytest.raises(MoekitError, match=r"expected \[n_experts \(2\), ., .\] each"):
        nemo_to_peft(_nemo_fixture(), 2, model_type=QWEN)


@pytest.mark.parametrize("change,found", [
    (lambda v: v[:1], r"down_A differs across experts \(\[1, 4\] F32, \[2, 4\] F32\)"),
    (lambda v: v.double(), r"down_A differs across experts \(\[2, 4\] F32, \[2, 4\] F64\)"),
], ids=["rank", "dtype"])
def test_per_expert_lora_pieces_that_differ_across_experts_are_refused(change, found):
    saved, _, _ = _fixture("0.19.1")
    hf = peft_to_hf(saved, FIXTURE_EXPERTS, model_type=QWEN)
    key = PREFIX.format(1) + ".0.down_proj.lora_A.weight"
    hf[key] = change(hf[key])
    with pytest.raises(MoekitError, match=found):
        hf_to_peft(hf, FIXTURE_EXPERTS, model_type=QWEN)


@pytest.mark.parametrize("kwargs,found", [
    ({"parameters": ("down_proj",)}, "parameters must order gate_up_proj and down_proj"),
    ({"parameters": "gate_up_proj"}, "parameters must order"),
    ({"layout": "A_OUT"}, "layout must be a PeftLayout"),
])
def test_the_peft_form_asked_for_is_checked(kwargs, found):
    saved, _, _ = _fixture("0.19.1")
    hf = peft_to_hf(saved, FIXTURE_EXPERTS, model_type=QWEN)
    with pytest.raises(MoekitError, match=found):
        hf_to_peft(hf, FIXTURE_EXPERTS, **kwargs, model_type=QWEN)
    with pytest.raises(MoekitError, match=found):
        nemo_to_peft(_nemo_fixture(), FIXTURE_EXPERTS, **kwargs, model_type=QWEN)


def test_an_adapter_that_is_not_tensors_is_refused():
    with pytest.raises(MoekitError, match="the adapter is a NoneType"):
        peft_layout(None)
    saved, _, _ = _fixture("0.19.1")
    with pytest.raises(MoekitError, match="is a int, not a torch.Tensor"):
        parameter_order({**saved, PREFIX.format(0) + ".lora_A.weight": 3})


@pytest.fixture(scope="module")
def gpt_oss_adapter(tmp_path_factory):
    """A PEFT adapter on the experts of the GPT-OSS sample (gate_up_proj [E, H, 2I] with
    gate and up interleaved, down_proj [E, I, H]), saved by the installed peft, every LoRA
    weight drawn at random; and PEFT's delta weights."""
    peft = pytest.importorskip("peft")
    model = samples.build_model("gpt_oss")
    config = peft.LoraConfig(r=R, lora_alpha=8, target_parameters=["mlp.experts.gate_up_proj",
                                                                   "mlp.experts.down_proj"])
    folder = tmp_path_factory.mktemp("gpt_oss_lora")
    wrapped = saved_with_random_weights(peft.get_peft_model(model, config), folder)
    return load_all(folder), _delta_weights(wrapped), config.lora_alpha / config.r


def test_gpt_oss_expert_deltas_split_gate_and_up_as_its_interleave(gpt_oss_adapter):
    # PEFT's delta of gate_up_proj is [E, H, 2I] like the parameter: gate at even columns,
    # up at odd. NeMo keeps GPT-OSS's gate_and_up interleaved too (x @ W).
    saved, deltas, scaling = gpt_oss_adapter
    n = samples.build_model("gpt_oss").config.num_local_experts
    hf = peft_to_hf(saved, n, model_type="gpt_oss")
    nemo = peft_to_nemo(saved, n, model_type="gpt_oss")
    for layer in sorted({key.split(".")[2] for key in deltas}, key=int):
        prefix = PREFIX.format(layer)
        gate_up = deltas[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = deltas[f"model.layers.{layer}.mlp.experts.down_proj"]
        for e in range(n):
            def delta(proj):
                return (hf[f"{prefix}.{e}.{proj}_proj.lora_B.weight"]
                        @ hf[f"{prefix}.{e}.{proj}_proj.lora_A.weight"]) * scaling
            torch.testing.assert_close(delta("gate"), gate_up[e][:, ::2].T)
            torch.testing.assert_close(delta("up"), gate_up[e][:, 1::2].T)
            torch.testing.assert_close(delta("down"), down[e].T)
            grouped = (nemo[f"{prefix}.lora_gate_and_up_A"][e]
                       @ nemo[f"{prefix}.lora_gate_and_up_B"][e]) * scaling
            torch.testing.assert_close(grouped, gate_up[e])
    parameters, layout = parameter_order(saved), peft_layout(saved)
    for back in (hf_to_peft(hf, n, parameters, layout, model_type="gpt_oss"),
                 nemo_to_peft(nemo, n, parameters, layout, model_type="gpt_oss")):
        assert back.keys() == saved.keys()
        assert all(same_bytes(back[k], saved[k]) for k in saved)


@pytest.mark.parametrize("model_type", [None, "gpt-oss", 3])
def test_a_model_type_that_names_no_family_is_refused(adapter, model_type):
    folder, _ = adapter
    saved = load_all(folder)
    for convert in (peft_to_hf, peft_to_nemo):
        with pytest.raises(MoekitError, match="model_type must be the base model's config.json"):
            convert(saved, E, model_type=model_type)
