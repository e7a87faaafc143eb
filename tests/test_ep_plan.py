"""``moekit plan --ep N``: per-rank experts, bytes and peak memory from headers or config."""

from __future__ import annotations

import json
from pathlib import Path

from moekit.cli import main

from .conftest import answered_at_once

DEEPSEEK_V3 = Path(__file__).parent / "data" / "deepseek_v3_671b_config.json"


def test_plan_of_a_checkpoint_counts_the_experts_each_rank_reads(family_checkpoints, capsys):
    assert main(["plan", str(family_checkpoints["qwen3_moe"]), "--ep", "4", "--json"]) == 0
    ranks = json.loads(capsys.readouterr().out)
    per_expert = 3 * 16 * 32 * 4  # I=16, H=32, fp32
    assert [r["experts"] for r in ranks] == [[0, 1], [2, 3], [4, 5], []]
    assert [r["expert_bytes"] for r in ranks] == [2 * 3 * per_expert] * 3 + [0]
    assert len({r["other_bytes"] for r in ranks}) == 1
    assert main(["plan", str(family_checkpoints["qwen3_moe"]), "--ep", "2"]) == 0
    assert "0-2" in capsys.readouterr().out


def test_a_config_alone_declaring_a_million_layers_is_refused_at_once(tmp_path, capsys):
    """Building the model to learn its shapes takes time per layer, even on the meta
    device: a config.json alone may declare at most MAX_BUILT_LAYERS, of any model type."""
    from moekit.model_config import MAX_BUILT_LAYERS

    for config in ({**json.loads(DEEPSEEK_V3.read_text()), "num_hidden_layers": 10**6},
                   {"model_type": "llama", "num_hidden_layers": 10**6},
                   {"model_type": "nemotron_h", "hybrid_override_pattern": "E" * 5000}):
        (tmp_path / "config.json").write_text(json.dumps(config))
        with answered_at_once():
            assert main(["plan", str(tmp_path / "config.json"), "--ep", "8"]) == 2
        err = capsys.readouterr().err
        assert "decoder layers" in err and f"at most {MAX_BUILT_LAYERS}" in err


def test_a_mesh_of_more_ranks_than_moekit_reports_is_refused_at_once(capsys):
    """A mistyped --dp (or --ep on a model with very many experts) is refused before any
    rank is tabulated, instead of building a row per rank for minutes."""
    from moekit.expert_parallel.report import MAX_RANKS

    for ep, dp in ((4, 10**8), (256, MAX_RANKS // 128)):
        with answered_at_once():
            assert main(["plan", str(DEEPSEEK_V3), "--ep", str(ep), "--dp", str(dp)]) == 2
        err = capsys.readouterr().err
        assert f"{dp} x {ep} = {dp * ep:,} ranks" in err and f"at most {MAX_RANKS:,}" in err


def test_the_largest_mesh_reported_is_tabulated_in_seconds(capsys):
    import time

    from moekit.expert_parallel.report import MAX_RANKS

    start = time.process_time()  # CPU time: a busy machine's stalls add none
    assert main(["plan", str(DEEPSEEK_V3), "--ep", "256", "--dp", str(MAX_RANKS // 256),
                 "--json"]) == 0
    assert time.process_time() - start < 30
    ranks = json.loads(capsys.readouterr().out)
    assert len(ranks) == MAX_RANKS and ranks[-1]["rank"] == MAX_RANKS - 1


def test_a_json_file_that_is_no_model_config_is_named_as_such(family_checkpoints, capsys):
    """The safetensors index (or any JSON without a model_type) is no config.json: said so,
    rather than handed to transformers to fail on."""
    index = family_checkpoints["qwen3_moe"] / "model.safetensors.index.json"
    assert main(["plan", str(index), "--ep", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{index} has no model_type" in err and "transformers" not in err


def test_a_layout_that_cannot_hold_the_experts_names_the_plan_options_that_can(capsys):
    """plan has no --dequantize: a refusal of nemo for FP8 experts names the layouts plan
    takes that hold them, not convert's options."""
    assert main(["plan", str(DEEPSEEK_V3), "--ep", "8", "--layout", "nemo"]) == 2
    err = capsys.readouterr().err
    assert "--dequantize" not in err and "gate_scale" in err
    assert "plan --layout transformers or --layout vllm" in err


def test_a_config_saved_by_transformers_with_an_infinite_float_is_planned(tmp_path, capsys):
    """save_pretrained writes Nemotron-H's infinite time_step_limit as {"__float__":
    "Infinity"}: planning from that config.json reads it as transformers does."""
    from transformers import AutoConfig

    AutoConfig.for_model("nemotron_h").save_pretrained(tmp_path)
    assert "__float__" in (tmp_path / "config.json").read_text()
    assert main(["plan", str(tmp_path / "config.json"), "--ep", "4", "--json"]) == 0
    ranks = json.loads(capsys.readouterr().out)
    assert [r["experts"] for r in ranks] == [[0, 1], [2, 3], [4, 5], [6, 7]]
