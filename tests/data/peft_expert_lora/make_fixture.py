"""Writes one expert LoRA fixture with whichever PEFT release is importable.

The fixtures let the tests check moekit against PEFT releases other than the installed one
without installing them: each folder ``peft-<version>/`` holds the adapter PEFT saved
(``adapter_model.safetensors``, ``adapter_config.json``) and PEFT's own
``get_delta_weight`` of every targeted expert parameter (``delta_weights.safetensors``,
keys ``model.layers.{i}.mlp.experts.{gate_up_proj,down_proj}``).

The model is a tiny Qwen3-MoE (hidden 8, expert intermediate 4, 3 experts, 2 layers) so
that the fused ``gate_up_proj`` [3, 8, 8] is square: its LoRA shapes alone do not tell
PEFT's two layouts apart. Regenerate a fixture from the repository root with an unpacked
PEFT wheel first on the path, e.g.::

    pip download --no-deps peft==0.18.1 -d /tmp/w && unzip -q /tmp/w/peft-*.whl -d /tmp/p
    PYTHONPATH=/tmp/p .venv/bin/python tests/data/peft_expert_lora/make_fixture.py
"""

from __future__ import annotations

from pathlib import Path

import peft
import torch
from safetensors.torch import save_file

from moekit import samples

EXPERTS, RANK, ALPHA = 3, 2, 6


def main() -> None:
    model = samples.build_model("qwen3_moe", hidden_size=8, moe_intermediate_size=4,
                                num_experts=EXPERTS, num_hidden_layers=2, vocab_size=16)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj"],
                             target_parameters=["mlp.experts.gate_up_proj",
                                                "mlp.experts.down_proj"])
    wrapped = peft.get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
    folder = Path(__file__).parent / f"peft-{peft.__version__}"
    wrapped.save_pretrained(folder)
    deltas = {}
    for i, layer in enumerate(wrapped.base_model.model.model.layers):
        wrapper = layer.mlp.experts
        while hasattr(wrapper, "parameter_name"):
            deltas[f"model.layers.{i}.mlp.experts.{wrapper.parameter_name}"] = (
                wrapper.get_delta_weight("default").detach().contiguous())
            wrapper = wrapper.base_layer
    save_file(deltas, folder / "delta_weights.safetensors")
    (folder / "README.md").unlink(missing_ok=True)
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
