"""The vllm layout is what vLLM's FusedMoE holds (vLLM 0.33). vLLM cannot be installed
here, so its shapes, names and activation semantics are written down from its source
in these tests, and checked against transformers' own output.

From vLLM 0.33:
- the expert parameters sit on ``FusedMoE.routed_experts`` (a module), so
  ``named_parameters()`` names them ``...mlp.experts.routed_experts.w13_weight``;
- ``vllm/model_executor/layers/activation.py``, ``SwigluOAIAndMul.forward_native``
  (GPT-OSS's ``swigluoai`` activation over ``x = h @ w13.T + w13_bias``)::

      gate, up = x[..., ::2], x[..., 1::2]
      gate = gate.clamp(min=None, max=self.limit)
      up = up.clamp(min=-self.limit, max=self.limit)
      glu = gate * torch.sigmoid(gate * self.alpha)
      gated_output = (up + 1) * glu

- ``Mxfp4MoEMethod.create_weights``: ``w13_weight`` uint8 [E, 2I, H/2],
  ``w13_weight_scale`` uint8 [E, 2I, H/32], ``w2_weight`` uint8 [E, H, I/2],
  ``w2_weight_scale`` uint8 [E, H, I/32]; GPT-OSS's ``load_weights`` copies the Hub's
  ``gate_up_proj_blocks`` [E, 2I, H/32, 16] into ``w13_weight`` as
  ``weight.view(num_experts, 2 * intermediate_size, -1)``, rows unchanged;
- ``determine_expert_map`` ("linear", the default placement)::

      base_experts = global_num_experts // ep_size
      remainder = global_num_experts % ep_size
      local_num_experts = base_experts + 1 if ep_rank < remainder else base_experts
      start_idx = ep_rank * base_experts + min(ep_rank, remainder)
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from moekit import convert, expert_range
from moekit.checkpoint import Checkpoint
from moekit.cli import main
from moekit.executors.device import read_plan
from moekit.expert_parallel.ranges import rank_plan
from moekit.planner import understand_checkpoint

from .conftest import load_all, pack_mxfp4, same_bytes
from .test_fp8 import mxfp4  # noqa: F401  (the MXFP4 GPT-OSS checkpoint fixture)

EXPERTS = "mlp.experts.routed_experts"


def _swigluoai(x: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """vLLM's SwigluOAIAndMul.forward_native, as quoted above."""
    gate, up = x[..., ::2], x[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    glu = gate * torch.sigmoid(gate * alpha)
    return (up + 1) * glu


def _vllm_gpt_oss_moe(params: dict[str, torch.Tensor], block: str, x: torch.Tensor,
                      top_k: int, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's MoE block computed from vLLM's parameters as vLLM computes it: the router
    (a plain linear layer), softmax top-k renormalised, and for each chosen expert
    ``swigluoai(x @ w13.T + w13_bias) @ w2.T + w2_bias`` weighted by its routing weight."""
    logits = x @ params[f"{block}.router.weight"].T + params[f"{block}.router.bias"]
    weights, chosen = torch.softmax(logits, -1).topk(top_k, -1)
    weights = weights / weights.sum(-1, keepdim=True)
    w13, b13 = params[f"{block}.experts.routed_experts.w13_weight"], \
        params[f"{block}.experts.routed_experts.w13_bias"]
    w2, b2 = params[f"{block}.experts.routed_experts.w2_weight"], \
        params[f"{block}.experts.routed_experts.w2_bias"]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for weight, e in zip(weights[t], chosen[t]):
            hidden = _swigluoai(x[t] @ w13[e].T + b13[e], alpha, limit)
            out[t] += weight * (hidden @ w2[e].T + b2[e])
    return out


def test_gpt_oss_in_vllm_computes_what_transformers_computes(family_checkpoints,
                                                            family_models, tmp_path):
    convert(family_checkpoints["gpt_oss"], tmp_path / "vllm", to="vllm")
    params = load_all(tmp_path / "vllm")
    model = family_models["gpt_oss"]
    config = model.config
    x = torch.randn(7, config.hidden_size, generator=torch.Generator().manual_seed(3))
    for layer in range(config.num_hidden_layers):
        with torch.no_grad():
            expected, _ = model.model.layers[layer].mlp(x[None])
        ours = _vllm_gpt_oss_moe(params, f"model.layers.{layer}.mlp", x,
                                 config.num_experts_per_tok, config.swiglu_alpha,
                                 config.swiglu_limit)
        torch.testing.assert_close(ours, expected[0])


def test_mxfp4_experts_are_held_as_vllm_holds_them(mxfp4, tmp_path):  # noqa: F811
    convert(mxfp4, tmp_path / "vllm", to="vllm")
    hub, vllm = load_all(mxfp4), load_all(tmp_path / "vllm")
    block = "model.layers.1.mlp.experts"
    blocks = hub[f"{block}.gate_up_proj_blocks"]
    experts, rows = blocks.shape[:2]
    down = hub[f"{block}.down_proj_blocks"]
    hidden, inter = down.shape[1], rows // 2
    expected = {"w13_weight": (experts, 2 * inter, hidden // 2),
                "w13_weight_scale": (experts, 2 * inter, hidden // 32),
                "w2_weight": (experts, hidden, inter // 2),
                "w2_weight_scale": (experts, hidden, inter // 32),
                "w13_bias": (experts, 2 * inter), "w2_bias": (experts, hidden)}
    ours = {k.rsplit(".", 1)[1]: tuple(v.shape) for k, v in vllm.items()
            if k.startswith(f"{block}.routed_experts.")}
    assert ours == expected
    assert same_bytes(vllm[f"{block}.routed_experts.w13_weight"], blocks.view(experts, rows, -1))
    assert same_bytes(vllm[f"{block}.routed_experts.w13_weight_scale"],
                      hub[f"{block}.gate_up_proj_scales"])
    assert same_bytes(vllm[f"{block}.routed_experts.w2_weight"], down.view(experts, hidden, -1))
    assert vllm[f"{block}.routed_experts.w13_weight"].dtype == torch.uint8

    convert(tmp_path / "vllm", tmp_path / "back", to="transformers")
    back = load_all(tmp_path / "back")
    assert back.keys() == hub.keys() and all(same_bytes(hub[k], back[k]) for k in hub)


def test_mxfp4_state_dicts_move_between_transformers_and_vllm_in_memory():
    """The in-memory executor's path (convert_state_dict), as RL weight sync uses it."""
    from moekit import convert_state_dict, samples

    model = samples.build_model("gpt_oss", intermediate_size=32)
    config = model.config.to_dict()
    state = dict(model.state_dict())
    generator = torch.Generator().manual_seed(1)
    pack_mxfp4(state, generator)
    vllm = convert_state_dict(state, "transformers", "vllm", config=config)
    blocks = state["model.layers.2.mlp.experts.gate_up_proj_blocks"]
    assert same_bytes(vllm[f"model.layers.2.{EXPERTS}.w13_weight"],
                      blocks.view(*blocks.shape[:2], -1))
    back = convert_state_dict(vllm, "vllm", "transformers", config=config)
    assert back.keys() == state.keys() and all(same_bytes(state[k], back[k]) for k in state)


def test_mxfp4_in_vllm_dequantizes_like_transformers(mxfp4, tmp_path):  # noqa: F811
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    convert(mxfp4, tmp_path / "vllm", to="vllm")
    convert(tmp_path / "vllm", tmp_path / "bf16", to="transformers", dequantize=True)
    hub, out = load_all(mxfp4), load_all(tmp_path / "bf16")
    for name in ("gate_up_proj", "down_proj"):
        key = f"model.layers.0.mlp.experts.{name}"
        assert same_bytes(out[key], convert_moe_packed_tensors(hub[key + "_blocks"],
                                                               hub[key + "_scales"]))


def test_the_names_of_vllm_before_routed_experts_are_read(family_checkpoints, tmp_path):
    source = family_checkpoints["qwen3_moe"]
    convert(source, tmp_path / "vllm", to="vllm")
    older = {k.replace(".routed_experts.", "."): v for k, v in load_all(tmp_path / "vllm").items()}
    assert "model.layers.0.mlp.experts.w13_weight" in older
    folder = tmp_path / "older"
    folder.mkdir()
    save_file(older, folder / "model.safetensors")
    (folder / "config.json").write_text((source / "config.json").read_text())
    convert(folder, tmp_path / "back", to="hf")
    hf, back = load_all(source), load_all(tmp_path / "back")
    assert back.keys() == hf.keys() and all(same_bytes(hf[k], back[k]) for k in hf)


def test_a_layer_holding_both_the_older_and_the_newer_vllm_name_is_refused(
        family_checkpoints, tmp_path, capsys):
    """Which of two tensors for one parameter is meant is not moekit's to guess: reading
    either would give wrong bytes half the time."""
    source = family_checkpoints["qwen3_moe"]
    convert(source, tmp_path / "vllm", to="vllm")
    newer = load_all(tmp_path / "vllm")
    key = "model.layers.0.mlp.experts.routed_experts.w13_weight"
    both = {**newer, key.replace(".routed_experts.", "."): torch.zeros_like(newer[key])}
    folder = tmp_path / "both"
    folder.mkdir()
    save_file(both, folder / "model.safetensors")
    (folder / "config.json").write_text((source / "config.json").read_text())
    assert main(["convert", str(folder), str(tmp_path / "back"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert f"{key} and {key.replace('.routed_experts.', '.')} both name" in err
    assert "Traceback" not in err and not (tmp_path / "back").exists()


def _vllm_expert_map(n_experts: int, ep_size: int, ep_rank: int) -> range:
    """vLLM's determine_expert_map, "linear", as quoted above."""
    base_experts = n_experts // ep_size
    remainder = n_experts % ep_size
    local_num_experts = base_experts + 1 if ep_rank < remainder else base_experts
    start_idx = ep_rank * base_experts + min(ep_rank, remainder)
    return range(start_idx, start_idx + local_num_experts)


def test_vllm_placement_is_vllms_expert_map():
    for n_experts in range(1, 40):
        for size in range(1, n_experts + 1):
            for rank in range(size):
                assert expert_range(n_experts, size, rank, placement="vllm") == \
                    _vllm_expert_map(n_experts, size, rank)
    assert [len(expert_range(10, 4, r)) for r in range(4)] == [3, 3, 3, 1]
    assert [len(expert_range(10, 4, r, "vllm")) for r in range(4)] == [3, 3, 2, 2]


@pytest.mark.parametrize("rank", range(4))
def test_a_rank_plan_in_vllm_placement_holds_that_vllm_ranks_experts(family_checkpoints,
                                                                   tmp_path, rank):
    source = family_checkpoints["qwen3_moe"]
    convert(source, tmp_path / "vllm", to="vllm")
    whole = load_all(tmp_path / "vllm")
    checkpoint = Checkpoint.open(source)
    analysis = understand_checkpoint(checkpoint)
    local = read_plan(rank_plan(analysis, 4, rank, "vllm", placement="vllm"), checkpoint)
    mine = _vllm_expert_map(analysis.n_experts, 4, rank)
    key = f"model.layers.0.{EXPERTS}.w13_weight"
    assert same_bytes(local[key], whole[key][mine.start:mine.stop])


def test_help_says_what_each_layout_is_for_and_the_release_it_follows(capsys):
    """vLLM's loader reads per-expert HF keys or transformers' fused tensors from disk;
    ``w13_weight`` names are its engine's parameters, which RL weight sync copies into:
    ``--help`` says which layout serves which, and the release each follows."""
    from moekit.cli import main

    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for said in ("vllm: vLLM's FusedMoE parameters (0.33), to copy into a running engine's "
                 "parameters (RL weight sync), not for vLLM's loader, which reads hf or "
                 "transformers from disk",
                 "nemo: NeMo AutoModel's own format (0.7)", "transformers v5 in memory (5.24)",
                 "hf: Hugging Face: what save_pretrained writes and the Hub holds",
                 "torchtitan: torchtitan 0.3's model state dict"):
        assert said in text


def test_moekit_plan_reports_the_vllm_placement(family_checkpoints, capsys):
    assert main(["plan", str(family_checkpoints["qwen3_moe"]), "--ep", "4", "--layout", "vllm",
                 "--placement", "vllm", "--json"]) == 0
    owned = [rank["experts"] for rank in json.loads(capsys.readouterr().out)]
    assert owned == [[0, 1], [2, 3], [4, 4], [5, 5]]
