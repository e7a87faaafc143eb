"""Expert LoRA adapters saved by PEFT for a tiny transformers MoE model: per-expert and
NeMo grouped forms, byte-identical round trips, and PEFT's own delta weights as oracle."""

from __future__ import annotations

import pytest
import torch

from moekit import samples
from moekit.lora import hf_to_peft, nemo_to_peft, parameter_order, peft_to_hf, peft_to_nemo

from .conftest import load_all, same_bytes

peft = pytest.importorskip("peft")

E, R = 6, 4


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A PEFT adapter on the experts (and q_proj) of the Qwen3-MoE sample, saved by peft,
    with every LoRA weight drawn at random (PEFT initialises B to zero)."""
    model = samples.build_model("qwen3_moe")
    config = peft.LoraConfig(r=R, lora_alpha=8, target_modules=["q_proj"],
                             target_parameters=["mlp.experts.gate_up_proj",
                                                "mlp.experts.down_proj"])
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp("lora")
    wrapped.save_pretrained(folder)
    return folder, wrapped


def test_round_trips_through_per_expert_and_nemo_forms_are_byte_identical(adapter):
    folder, _ = adapter
    saved = load_all(folder)
    parameters = parameter_order(saved)
    assert parameters == ("gate_up_proj", "down_proj")
    for back in (hf_to_peft(peft_to_hf(saved, E), E, parameters),
                 nemo_to_peft(peft_to_nemo(saved, E), E, parameters)):
        assert back.keys() == saved.keys()
        assert all(same_bytes(back[k], saved[k]) for k in saved)


def test_per_expert_deltas_equal_peft_own_delta_weights(adapter):
    folder, wrapped = adapter
    hf = peft_to_hf(load_all(folder), E)
    nemo = peft_to_nemo(load_all(folder), E)
    experts = wrapped.base_model.model.model.layers[1].mlp.experts
    layers = {}
    module = experts
    while hasattr(module, "base_layer"):
        layers[module.parameter_name] = module
        module = module.base_layer
    prefix = "base_model.model.model.layers.1.mlp.experts"
    gate_up = layers["gate_up_proj"].get_delta_weight("default")
    down = layers["down_proj"].get_delta_weight("default")
    scaling = layers["down_proj"].scaling["default"]
    inter = down.shape[2]
    for e in range(E):
        def delta(proj):
            return (hf[f"{prefix}.{e}.{proj}_proj.lora_B.weight"]
                    @ hf[f"{prefix}.{e}.{proj}_proj.lora_A.weight"]) * scaling
        torch.testing.assert_close(delta("gate"), gate_up[e][:inter])
        torch.testing.assert_close(delta("up"), gate_up[e][inter:])
        torch.testing.assert_close(delta("down"), down[e])
        grouped = (nemo[f"{prefix}.lora_gate_and_up_A"][e]
                   @ nemo[f"{prefix}.lora_gate_and_up_B"][e]) * scaling
        torch.testing.assert_close(grouped, gate_up[e].T)
    assert nemo[f"{prefix}.lora_gate_and_up_A"].shape == (E, 32, R)
    assert nemo[f"{prefix}.lora_down_B"].shape == (E, R, 32)
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in nemo


def test_per_expert_lora_with_different_gate_and_up_a_is_refused(adapter):
    from moekit import MoekitError

    folder, _ = adapter
    hf = peft_to_hf(load_all(folder), E)
    key = "base_model.model.model.layers.2.mlp.experts.3.up_proj.lora_A.weight"
    hf[key] = hf[key] + 1
    with pytest.raises(MoekitError, match=r"experts \[3\] have different gate and up lora_A"):
        hf_to_peft(hf, E)
