"""moekit merge against mergekit-moe itself (mergekit 0.1.5, CPU, offline): the same YAML
through both gives the same tensors, as transformers loads them; refusals come before
anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from moekit import MoekitError, PlanError
from moekit.cli import main
from moekit.merging import ExpertSource, MergeConfig, merge

from .conftest import answered_at_once
from .merge_fixtures import run_mergekit, save_models, write_yaml


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, list[Path]]:
    return save_models(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> tuple[Path, list[Path]]:
    return save_models(tmp_path_factory.mktemp("qwen2"), "qwen2", finetunes=2,
                       dtype=torch.bfloat16)


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).state_dict()


def _assert_same_model(a: Path, b: Path) -> None:
    sa, sb = _state_dict(a), _state_dict(b)
    assert sa.keys() == sb.keys()
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different


@pytest.mark.parametrize("mode", ["random", "uniform_random", "cheap_embed", "hidden",
                                  "hidden_avg"])
def test_mixtral_merge_is_mergekits_tensor_for_tensor(llama, tmp_path, mode):
    # Router rows too are equal bit for bit: moekit computes them with mergekit's
    # operations in its order (the hidden states in bfloat16, as mergekit loads the model),
    # in the same process.
    base, finetunes = llama
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode=mode,
                        experts_per_token=2)
    run_mergekit(config, tmp_path / "mergekit", seed=7)
    plan = merge(config, tmp_path / "moekit", seed=7)
    assert plan.target.family == "mixtral"
    _assert_same_model(tmp_path / "mergekit", tmp_path / "moekit")
    assert (tmp_path / "moekit" / "tokenizer.json").read_bytes() == \
        (base / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("mode", ["random", "cheap_embed"])
def test_qwen2_moe_with_shared_expert_and_residual_scale_is_mergekits(qwen2, tmp_path, mode):
    base, finetunes = qwen2
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode=mode,
                        architecture="qwen", dtype="bfloat16", experts_per_token=1)
    data = yaml.safe_load(config.read_text())
    data["experts"][1]["residual_scale"] = 0.3
    data["shared_experts"] = [{"source_model": str(base), "residual_scale": 0.7,
                               "positive_prompts": ["story"]}]
    config.write_text(yaml.safe_dump(data))
    run_mergekit(config, tmp_path / "mergekit", seed=1)
    plan = merge(config, tmp_path / "moekit", seed=1)
    assert plan.target.family == "qwen2_moe"
    _assert_same_model(tmp_path / "mergekit", tmp_path / "moekit")


@pytest.mark.parametrize("models, dtype, mode", [
    ("llama", "bfloat16", "random"), ("llama", "torch.float16", "hidden"),
    ("qwen2", "float32", "uniform_random")])
def test_dtype_casts_every_tensor_as_mergekit_does(request, tmp_path, models, dtype, mode):
    # A residual_scale is applied in the sources' dtype before the cast, as mergekit does,
    # so the bytes differ from a cast first; routers are rounded once from float32.
    base, finetunes = request.getfixturevalue(models)
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode=mode, dtype=dtype,
                        experts_per_token=1)
    data = yaml.safe_load(config.read_text())
    data["experts"][1]["residual_scale"] = 0.3
    if models == "qwen2":  # of mergekit's outputs, only Qwen MoE takes Qwen2 models
        data["shared_experts"] = [{"source_model": str(base), "residual_scale": 0.7,
                                   "positive_prompts": ["story"]}]
    config.write_text(yaml.safe_dump(data))
    run_mergekit(config, tmp_path / "mergekit", seed=3)
    merge(config, tmp_path / "moekit", seed=3)
    _assert_same_model(tmp_path / "mergekit", tmp_path / "moekit")
    written = json.loads((tmp_path / "moekit" / "config.json").read_text())["dtype"]
    assert written == dtype.removeprefix("torch.")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "moekit" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == \
            {{"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[written]}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_router_rows_from_prompts_on_a_gpu_are_mergekits_on_that_gpu(llama, tmp_path,
                                                                     monkeypatch, mode):
    # --device cuda runs the base model there, as mergekit-moe's --device cuda does.
    from moekit.merging import gates

    base, finetunes = llama
    devices = []
    run = gates._hidden_states

    def hidden_states(model, batch, average):
        devices.append(model.device.type)
        return run(model, batch, average)

    monkeypatch.setattr(gates, "_hidden_states", hidden_states)
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode=mode)
    run_mergekit(config, tmp_path / "mergekit", device="cuda")
    merge(config, tmp_path / "moekit", device="cuda")
    assert devices and set(devices) == {"cuda"}
    _assert_same_model(tmp_path / "mergekit", tmp_path / "moekit")


def test_qwen3_moe_from_prompts_is_mergekits(tmp_path):
    base, finetunes = save_models(tmp_path / "models", "qwen3", finetunes=2)
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode="hidden",
                        architecture="qwen3", experts_per_token=1)
    run_mergekit(config, tmp_path / "mergekit")
    plan = merge(config, tmp_path / "moekit")
    assert plan.target.family == "qwen3_moe"
    _assert_same_model(tmp_path / "mergekit", tmp_path / "moekit")


def test_experts_all_the_base_model_preserve_the_dense_function(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    base, _ = llama
    config = write_yaml(tmp_path / "moe.yml", base, [base, base, base], gate_mode="random")
    merge(config, tmp_path / "moe")
    ids = torch.tensor([[1, 3, 4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(str(base))(ids).logits
        moe = AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"))(ids).logits
    torch.testing.assert_close(moe, dense, rtol=0, atol=1e-5)


def test_every_mismatching_source_tensor_is_reported_before_writing(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from .merge_fixtures import dense_config

    base, finetunes = llama
    config = dense_config()
    config.intermediate_size = 40
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "other"))
    yml = write_yaml(tmp_path / "moe.yml", base, [finetunes[0], tmp_path / "other"],
                     gate_mode="random")
    with pytest.raises(PlanError) as err:
        merge(yml, tmp_path / "out")
    assert len(err.value.problems) == 3 * 2  # gate, up, down of both layers
    assert all(p.startswith("expert1 (") for p in err.value.problems)
    assert "model.layers.1.mlp.down_proj.weight is [32, 40] F32" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_each_source_is_checked_for_model_type_dtypes_and_names_before_writing(llama, tmp_path,
                                                                               capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    base, finetunes = llama
    retyped, edited = tmp_path / "retyped", tmp_path / "edited"
    shutil.copytree(finetunes[0], retyped)
    shutil.copytree(finetunes[1], edited)
    config = json.loads((retyped / "config.json").read_text())
    (retyped / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    tensors = load_file(edited / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].bfloat16()
    del tensors["lm_head.weight"]
    tensors["model.layers.0.mlp.bias"] = torch.zeros(3)
    save_file(tensors, edited / "model.safetensors", metadata={"format": "pt"})
    yml = write_yaml(tmp_path / "moe.yml", base, [retyped, edited, finetunes[2]],
                     gate_mode="random")
    assert main(["merge", str(yml), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    for problem in ("4 problems",
                    f"expert0 ({retyped}): model_type 'mistral', the base model's is 'llama'",
                    f"expert1 ({edited}): model.norm.weight is [32] BF16, the base model's is "
                    "[32] F32",
                    f"expert1 ({edited}): lacks lm_head.weight",
                    f"expert1 ({edited}): has model.layers.0.mlp.bias, which the base model "
                    "lacks"):
        assert problem in err
    assert "expert2" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"dtype": "int8"}, "dtype 'int8' is not one of float16, bfloat16, float32, float64"),
    ({"gate_mode": "hidden_first"}, "gate_mode 'hidden_first' is not one of"),
    ({"architecture": "deepseek"}, "architecture 'deepseek': mergekit-moe's DeepSeek MoE output "
                                   "is model_type 'deepseek'"),
    ({"architecture": "deepseek_v3"}, "architecture 'deepseek_v3': names none of Mixtral"),
    ({"experts_per_token": 4}, "more than the 3 experts"),
    ({"architecture": "mixtral", "shared_experts": [{"source_model": "BASE"}]},
     "no merge target holds 1 shared expert of a 'llama' base model as architecture mixtral"),
    ({"experts": [{"source_model": "x", "noise_scale": 0.1}]},
     "experts[0].noise_scale: mergekit-moe adds torch.randn_like noise from torch's global"),
    ({"bogus": 1}, "unknown field bogus"),
    ({"granularity": 2}, "unknown field granularity (known: "),
    ({"granularity": 2}, "granularity is a setting of moekit's own: write it under moekit:"),
    ({"moekit": {"granularity": 5}},
     "intermediate size 48 is not divisible by the granularity 5"),
    ({"moekit": {"granularity": 0}}, "granularity must be an integer of at least 1, not 0"),
    ({"moekit": {"drop_ratio": 0.5}}, "moekit.drop_ratio is not a setting of moekit's own here "
                                      "(known: granularity)"),
    ({"moekit": [2]}, "moekit must be a mapping of granularity"),
    ({"experts": [{"source_model": "BASE", "drop_ratio": 0.5}], "experts_per_token": 1},
     "experts[0] has unknown field drop_ratio; drop_ratio is a setting of moekit's own"),
    ({"experts": [{"source_model": "BASE", "moekit": {"drop_ratio": 0}}],
      "experts_per_token": 1}, "experts[0].moekit.drop_ratio must lie in (0, 1], not 0"),
    ({"experts": [{"source_model": "BASE", "moekit": {"drop_ratio": 0.01}}],
      "experts_per_token": 1}, "experts[0].moekit.drop_ratio 0.01 re-initialises no neuron of "
                               "an MLP of 48 intermediate neurons"),
    ({"experts": [{"source_model": "BASE", "moekit": {"drop_ratio": 0.5}}],
      "experts_per_token": 1, "moekit": {"granularity": 2}},
     "drop_ratio (experts[0]) does not combine with granularity 2"),
    ({"architecture": "qwen", "experts_per_token": 1,
      "shared_experts": [{"source_model": "BASE", "moekit": {"drop_ratio": 0.5}}]},
     "shared_experts[0].drop_ratio: Drop-Upcycling re-initialises routed experts only"),
    ({"gate_mode": None}, "gate_mode must be a non-empty string, not None"),
    ({"experts": [{"source_model": "BASE", "residual_scale": float("nan")}],
      "experts_per_token": 1}, "experts[0].residual_scale must be a finite number in float32, "
                               "not nan"),
    ({"experts": [{"source_model": "BASE", "residual_scale": float("-inf")}],
      "experts_per_token": 1}, "experts[0].residual_scale must be a finite number in float32, "
                               "not -inf"),
    ({"experts": [{"source_model": "BASE", "residual_scale": 1e300}], "experts_per_token": 1},
     "experts[0].residual_scale must be a finite number in float32, not 1e+300"),
    ({"experts": [{"source_model": "BASE", "residual_scale": True}], "experts_per_token": 1},
     "experts[0].residual_scale must be a number, not True"),
    ({"experts": [{"source_model": "/nonexistent/x"}], "experts_per_token": 1},
     "expert0 (source_model): no checkpoint at /nonexistent/x"),
])
def test_settings_moekit_cannot_honour_are_refused_by_name(llama, tmp_path, capsys, change,
                                                             message):
    base, finetunes = llama
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode="random")
    data = {**yaml.safe_load(config.read_text()), **change}
    config.write_text(yaml.safe_dump(data).replace("BASE", str(base)))
    assert main(["merge", str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_merge_configuration_too_large_to_be_one_is_refused_unread(tmp_path, capsys,
                                                                    monkeypatch):
    from moekit.merging import config as merge_config

    monkeypatch.setattr(merge_config, "MAX_CONFIG_BYTES", 1000)
    huge = tmp_path / "moe.yml"
    huge.write_text("experts:\n" + "  - source_model: a\n" * 100)
    assert main(["merge", str(huge), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"the merge configuration {huge} is larger than 1,000 bytes" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, key", [
    (lambda text: text + "gate_mode: hidden\n", "gate_mode"),
    (lambda text: text + "moekit: {granularity: 2, granularity: 4}\n", "granularity"),
    (lambda text: text.replace("\n  source_model: ", "\n  source_model: other\n  source_model: ",
                               1), "source_model"),
])
def test_a_key_written_twice_is_refused_where_mergekit_keeps_the_last(llama, tmp_path, capsys,
                                                                       edit, key):
    from mergekit.moe.config import MoEMergeConfig

    base, finetunes = llama
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode="random")
    text = edit(config.read_text())
    config.write_text(text)
    MoEMergeConfig.model_validate(yaml.safe_load(text))  # mergekit-moe reads it, one lost
    second = text.index(f"{key}:", text.index(f"{key}:") + 1)
    line = text.count("\n", 0, second) + 1
    assert main(["merge", str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"line {line}: the key {key} appears twice in one mapping" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["hidden", "cheap_embed"])
@pytest.mark.parametrize("removed", [("tokenizer.json",),
                                     ("tokenizer.json", "tokenizer_config.json",
                                      "special_tokens_map.json")])
def test_a_base_model_without_tokenizer_files_is_refused_not_given_zero_routers(
        llama, tmp_path, capsys, mode, removed):
    import shutil

    base, finetunes = llama
    shutil.copytree(base, tmp_path / "base")
    for name in removed:
        (tmp_path / "base" / name).unlink(missing_ok=True)
    config = write_yaml(tmp_path / "moe.yml", tmp_path / "base", finetunes, gate_mode=mode)
    assert main(["merge", str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "tokenizer" in err and str(tmp_path / "base") in err and "Traceback" not in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["hidden", "cheap_embed"])
def test_a_prompt_that_gives_no_token_is_refused_not_given_a_zero_router_row(llama, tmp_path,
                                                                             capsys, mode):
    """Without a BOS token to start each prompt, an empty prompt is no token at all: its
    expert's router row would be zeros (cheap_embed) or fail in the model (hidden)."""
    import shutil

    import yaml

    base, finetunes = llama
    shutil.copytree(base, tmp_path / "base")
    settings = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    settings.pop("bos_token", None)
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps(settings))
    (tmp_path / "base" / "special_tokens_map.json").unlink(missing_ok=True)
    config = write_yaml(tmp_path / "moe.yml", tmp_path / "base", finetunes, gate_mode=mode)
    fields = yaml.safe_load(config.read_text())
    fields["experts"][1]["positive_prompts"] = [""]
    config.write_text(yaml.safe_dump(fields))
    assert main(["merge", str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "gives no token for the prompt ''" in err and "Traceback" not in err
    assert err.count("moekit: error") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["hidden", "cheap_embed"])
def test_a_base_tokenizer_without_bos_or_eos_is_refused_where_mergekit_fails(llama, tmp_path,
                                                                              capsys, mode):
    # mergekit-moe pads prompts with BOS, else EOS; with neither, transformers refuses to pad.
    import shutil

    base, finetunes = llama
    shutil.copytree(base, tmp_path / "base")
    settings = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    for token in ("bos_token", "eos_token"):
        settings.pop(token, None)
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps(settings))
    (tmp_path / "base" / "special_tokens_map.json").unlink(missing_ok=True)
    config = write_yaml(tmp_path / "moe.yml", tmp_path / "base", finetunes, gate_mode=mode)
    with pytest.raises(ValueError, match="does not have a padding token"):
        run_mergekit(config, tmp_path / "mergekit")
    assert main(["merge", str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "has neither a BOS nor an EOS token" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seed, edge", [(-2**63 - 1, -2**63), (2**64, 2**64 - 1)])
def test_a_seed_torchs_generator_cannot_take_is_refused_for_random_gates(llama, tmp_path, capsys,
                                                                          seed, edge):
    with pytest.raises(ValueError):
        torch.Generator().manual_seed(seed)
    torch.Generator().manual_seed(edge)
    base, finetunes = llama
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode="uniform_random")
    assert main(["merge", str(config), str(tmp_path / "out"), "--seed", str(seed)]) == 2
    err = capsys.readouterr().err
    assert f"seed {seed} is outside [-2**63, 2**64)" in err and "Traceback" not in err
    assert main(["merge", str(config), str(tmp_path / "out"), "--seed", str(edge),
                 "--dry-run"]) == 0
    assert list(tmp_path.iterdir()) == [config]


def test_prompt_modes_need_distinct_prompts_for_every_expert(llama, tmp_path):
    base, finetunes = llama
    config = tmp_path / "moe.yml"
    config.write_text(yaml.safe_dump({"base_model": str(base), "gate_mode": "hidden",
                                      "experts": [{"source_model": str(f)} for f in finetunes]}))
    with pytest.raises(MoekitError, match="expert 0 .* has no positive_prompts"):
        merge(config, tmp_path / "out")


def test_router_rows_run_each_prompt_list_as_one_batch_under_a_progress_bar(
        llama, tmp_path, monkeypatch, capsys):
    # One forward pass of the base model per prompt list, as mergekit-moe batches them;
    # the bar counts experts.
    from moekit.merging import gates

    from .merge_fixtures import PROMPTS

    base, finetunes = llama
    batches = []
    run = gates._hidden_states

    def hidden_states(model, batch, average):
        batches.append(tuple(batch["input_ids"].shape))
        return run(model, batch, average)

    monkeypatch.setattr(gates, "_hidden_states", hidden_states)
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode="hidden")
    merge(config, tmp_path / "out", show_progress=True)
    lists = [prompts for positive, negative in PROMPTS for prompts in (positive, negative)
             if prompts]
    assert [rows for rows, _ in batches] == [len(prompts) for prompts in lists]
    err = capsys.readouterr().err
    assert "router rows from prompts" in err and "/3 " in err  # the count shown varies with timing


def test_dry_run_json_lists_where_each_expert_is_read_from(llama, tmp_path, capsys):
    base, finetunes = llama
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode="hidden")
    assert main(["merge", str(config), str(tmp_path / "out"), "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    recipes = {t["name"]: t["recipe"] for t in out["tensors"]}
    assert "expert2/model.layers.1.mlp.down_proj.weight" in \
        recipes["model.layers.1.block_sparse_moe.experts.2.w2.weight"]
    assert out["config"]["num_local_experts"] == 3
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_dcp_output_holds_the_merged_tensors(llama, tmp_path):
    # The safetensors merge is mergekit's model (the tests above); DCP's own reader reads
    # the same tensors from the --format dcp folder.
    from safetensors.torch import load_file

    from .test_dcp import dcp_state_dict

    base, finetunes = llama
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode="cheap_embed")
    merge(config, tmp_path / "safetensors")
    assert main(["merge", str(config), str(tmp_path / "dcp"), "--format", "dcp"]) == 0
    expected = load_file(str(tmp_path / "safetensors" / "model.safetensors"))
    loaded = dcp_state_dict(tmp_path / "dcp", expected)
    assert [k for k, v in expected.items() if not torch.equal(loaded[k], v)] == []


def test_a_read_failing_while_writing_leaves_nothing(llama, tmp_path, monkeypatch, capsys):
    # A source read fails after the routers are computed and the temporary folder beside
    # the destination is made: neither folder remains.
    from moekit.merging import run

    base, finetunes = llama
    byte_range = run.TaggedSource.byte_range
    beside = []

    def fail_at_layer_1(self, region):
        if region.key.startswith("expert1/model.layers.1."):
            beside.extend(p.name for p in tmp_path.iterdir() if p.name != "moe.yml")
            raise MoekitError(f"cannot read {region.key}")
        return byte_range(self, region)

    monkeypatch.setattr(run.TaggedSource, "byte_range", fail_at_layer_1)
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode="random")
    assert main(["merge", str(config), str(tmp_path / "out")]) == 2
    assert "cannot read expert1/model.layers.1." in capsys.readouterr().err
    assert beside and "out" not in beside
    assert list(tmp_path.iterdir()) == [config]


def test_an_existing_destination_is_replaced_only_with_overwrite(llama, tmp_path, capsys):
    base, finetunes = llama
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode="random")
    out = tmp_path / "out"
    assert main(["merge", str(config), str(out), "--seed", "1"]) == 0
    first = (out / "model.safetensors").read_bytes()
    assert main(["merge", str(config), str(out), "--seed", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == first
    assert main(["merge", str(config), str(out), "--seed", "2", "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != first


def test_qwen2_moe_from_llama_computes_mergekits_model_without_its_zero_biases(llama, tmp_path):
    # mergekit-moe writes zero q/k/v biases for a Llama base (Qwen2-MoE attention may hold
    # them); moekit writes qkv_bias false instead, which transformers reads as no bias.
    from transformers import AutoModelForCausalLM

    base, finetunes = llama
    config = write_yaml(tmp_path / "moe.yml", base, finetunes[:2], gate_mode="random",
                        architecture="qwen")
    data = yaml.safe_load(config.read_text())
    data["shared_experts"] = [{"source_model": str(base)}]
    config.write_text(yaml.safe_dump(data))
    run_mergekit(config, tmp_path / "mergekit")
    merge(config, tmp_path / "moekit")
    theirs, ours = _state_dict(tmp_path / "mergekit"), _state_dict(tmp_path / "moekit")
    extra = {k: v for k, v in theirs.items() if k not in ours}
    assert extra and all(k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))
                         and not v.any() for k, v in extra.items())
    assert all(torch.equal(theirs[k], v) for k, v in ours.items())
    ids = torch.tensor([[1, 3, 4, 5, 6]])
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(str(tmp_path / name))(ids).logits
                  for name in ("mergekit", "moekit")]
    assert torch.equal(*logits)


def test_the_yaml_fields_are_mergekits():
    # Every field of mergekit-moe's own configuration models is read, or refused by name.
    from mergekit.moe.config import Expert, MoEMergeConfig

    from moekit.merging.config import EXPERT_FIELDS, FIELDS, REFUSED_EXPERT_FIELDS

    assert set(FIELDS) == set(MoEMergeConfig.model_fields)
    assert {*EXPERT_FIELDS, *REFUSED_EXPERT_FIELDS} == set(Expert.model_fields)


@pytest.mark.parametrize("expert,top", [({"residual_scale": "1e-1"}, 1.0), ({}, "2"),
                                        ({"residual_scale": 3}, "1.0"),
                                        ({"residual_scale": " 1.5\n"}, " 2 ")])
def test_numbers_are_read_as_mergekits_pydantic_reads_them(expert, top):
    """PyYAML reads ``1e-1`` (no dot) as a string, which mergekit-moe's pydantic models
    take as 0.1, as they take ``1.0`` or ``"2"`` for an integer."""
    from mergekit.moe.config import MoEMergeConfig

    from moekit.merging.config import merge_config_from

    data = {"base_model": "b", "gate_mode": "random", "experts_per_token": top,
            "experts": [{"source_model": "x", **expert}, {"source_model": "y"}]}
    ours, theirs = merge_config_from(data), MoEMergeConfig.model_validate(data)
    assert ours.experts_per_token == theirs.experts_per_token
    assert type(ours.experts_per_token) is int
    assert ours.experts[0].residual_scale == theirs.experts[0].residual_scale


def test_a_yaml_whose_aliases_nest_deep_is_refused_at_once(tmp_path, capsys):
    """Aliases make a 500-byte file a structure of millions of references: its message
    shows a bounded part of it."""
    levels = ["&l0 [x, x, x, x, x, x, x, x, x]"] + [
        f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    config = tmp_path / "bomb.yml"
    config.write_text("base_model: b\nexperts:\n  - source_model: x\n"
                      f"    positive_prompts: [{', '.join(levels)}]\n")
    with answered_at_once():
        assert main(["merge", str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "experts[0].positive_prompts must be a list of strings, not [['x', " in err
    assert len(err) < 1000


def test_mergekit_reads_moekits_own_settings_as_nothing(llama, tmp_path):
    # What the README tells mergekit-moe users: its models ignore the moekit: mapping (and
    # declare no field of that name), so the same YAML runs through mergekit without it.
    from mergekit.moe.config import Expert, MoEMergeConfig

    from moekit.merging.config import MOEKIT_KEY

    base, finetunes = llama
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode="random")
    data = yaml.safe_load(_with_moekit(config, {"granularity": 2},
                                       expert0={"drop_ratio": 0.5}).read_text())
    plain = {**data, "experts": [{k: v for k, v in e.items() if k != MOEKIT_KEY}
                                 for e in data["experts"]]}
    del plain[MOEKIT_KEY]
    assert MOEKIT_KEY not in {*MoEMergeConfig.model_fields, *Expert.model_fields}
    assert MoEMergeConfig.model_validate(data) == MoEMergeConfig.model_validate(plain)


@pytest.mark.parametrize("build, message", [
    (lambda: ExpertSource("x", "code"), "positive_prompts must be a list of strings"),
    (lambda: ExpertSource("x", negative_prompts=[1]), "negative_prompts must be a list of"),
    (lambda: ExpertSource("x", residual_scale="two"), "residual_scale must be a number"),
    (lambda: ExpertSource("x", residual_scale=10**400),
     "residual_scale must be a finite number in float32, not inf"),
    (lambda: ExpertSource("x", residual_scale=float("inf")),
     "residual_scale must be a finite number in float32, not inf"),
    (lambda: ExpertSource(""), "source_model must be a non-empty string"),
    (lambda: MergeConfig(Path("b"), (ExpertSource("x"),)), "base_model must be a non-empty"),
    (lambda: MergeConfig("b", ("x",)), "experts must be a list of ExpertSource"),
    (lambda: MergeConfig("b", ()), "experts lists no expert"),
    (lambda: MergeConfig("b", (ExpertSource("x"),), gate_mode=None), "gate_mode must be a"),
    (lambda: MergeConfig("b", (ExpertSource("x"),), dtype=16), "dtype must be a non-empty"),
    (lambda: MergeConfig("b", (ExpertSource("x"),), architecture=["mixtral"]),
     "architecture must be a non-empty string"),
    (lambda: MergeConfig("b", (ExpertSource("x"),), gate_mode="random",
                         experts_per_token=1, shared_experts=({"source_model": "y"},)),
     "shared_experts must be a list of ExpertSource"),
    (lambda: MergeConfig("b", (ExpertSource("x"),), gate_mode="random", experts_per_token=1,
                         shared_experts=(ExpertSource("y"), ExpertSource("z"))),
     "2 shared_experts: the targets hold at most 1"),
    (lambda: MergeConfig("b", (ExpertSource("x"),), gate_mode="random",
                         experts_per_token="1.5"), "experts_per_token must be an integer"),
    (lambda: MergeConfig("b", (ExpertSource("x"),), gate_mode="random",
                         experts_per_token=True), "experts_per_token must be an integer"),
    (lambda: ExpertSource("x", drop_ratio="half"), "drop_ratio must be a number"),
    (lambda: ExpertSource("x", drop_ratio=1.5), r"drop_ratio must lie in \(0, 1\], not 1.5"),
    (lambda: MergeConfig("b", (ExpertSource("x"),), gate_mode="random", experts_per_token=1,
                         granularity=2.5), "granularity must be an integer"),
    (lambda: MergeConfig("b", (ExpertSource("x"),) * 3, gate_mode="random",
                         granularity=1 << 15), "3 experts split into 32768 make more than 65536"),
])
def test_a_config_built_in_python_is_checked_as_the_yaml_is(build, message):
    with pytest.raises(MoekitError, match=message):
        build()


def test_a_config_built_in_python_takes_lists():
    prompts = ExpertSource("x", ["code", "python"])
    config = MergeConfig("b", [prompts, ExpertSource("y", ["math"])])
    assert prompts.positive_prompts == ("code", "python")
    assert config.experts == (prompts, ExpertSource("y", ("math",)))
    assert hash(config) == hash(MergeConfig("b", (prompts, ExpertSource("y", ("math",)))))


def test_an_unknown_device_is_refused_before_anything_is_written(llama, tmp_path, capsys):
    base, finetunes = llama
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode="random")
    assert main(["merge", str(config), str(tmp_path / "out"), "--device", "foo"]) == 2
    err = capsys.readouterr().err
    assert "device 'foo' is not a device torch knows" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [config]


def test_a_destination_inside_any_source_model_is_refused(llama, tmp_path, capsys):
    base, finetunes = llama
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode="random")
    for source in (base, finetunes[-1]):
        assert main(["merge", str(config), str(source / "merged"), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert f"is inside the source {source.resolve()}" in err and "Traceback" not in err


def test_download_fetches_the_hub_ids_the_yaml_names(llama, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from .test_hub import REPO, hub_cache

    base, finetunes = llama
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    offline = huggingface_hub.snapshot_download
    fetched = []

    def snapshot_download(repo, revision, local_files_only, allow_patterns):
        if not local_files_only and not fetched:
            fetched.append(repo)
            hub_cache(cache, base, repo)
        return offline(repo, revision=revision, local_files_only=True,
                       allow_patterns=allow_patterns)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    config = write_yaml(tmp_path / "moe.yml", REPO, finetunes, gate_mode="random")
    assert main(["merge", str(config), str(tmp_path / "out")]) == 2
    assert "pass --download" in capsys.readouterr().err
    assert main(["merge", str(config), str(tmp_path / "out"), "--download"]) == 0
    assert fetched == [REPO]
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == \
        (base / "tokenizer.json").read_bytes()


def test_the_dtype_names_are_mergekits():
    from mergekit.common import dtype_from_name

    from moekit.dtypes import to_torch
    from moekit.merging.planner import DTYPE_NAMES

    for name, dtype in DTYPE_NAMES.items():
        assert dtype_from_name(name) == dtype_from_name(f"torch.{name}") == to_torch(dtype)


@pytest.mark.parametrize("architecture", [None, "Mixtral", "qwen", "Qwen MoE", "qwen3"])
def test_architecture_picks_the_target_mergekit_picks(qwen2, tmp_path, architecture):
    # A Qwen2 base with one shared expert: of mergekit's outputs only Qwen MoE holds it.
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import select_output_arch

    from moekit.merging.config import MERGE_TARGETS

    base, finetunes = qwen2
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode="random",
                        architecture=architecture, experts_per_token=1,
                        shared_experts=[{"source_model": str(base)}])
    mergekit_config = MoEMergeConfig.model_validate(yaml.safe_load(config.read_text()))
    try:
        expected = select_output_arch(mergekit_config, MergeOptions()).name()
    except SystemExit:  # mergekit's "no output architecture ... compatible"
        expected = None
    try:
        picked = MERGE_TARGETS[merge(config, tmp_path / "out", dry_run=True).target.family].name
    except MoekitError:
        picked = None
    assert picked == expected


def test_where_mergekit_would_write_deepseek_moe_the_merge_is_refused(llama, tmp_path):
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import select_output_arch

    base, finetunes = llama
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode="random",
                        experts_per_token=1, shared_experts=[{"source_model": str(base)}])
    mergekit_config = MoEMergeConfig.model_validate(yaml.safe_load(config.read_text()))
    assert select_output_arch(mergekit_config, MergeOptions()).name() == "DeepSeek MoE"
    with pytest.raises(MoekitError, match="mergekit-moe picks it for a llama base model"):
        merge(config, tmp_path / "out", dry_run=True)


def test_null_stands_for_the_fields_mergekit_declares_optional(llama, tmp_path):
    from mergekit.moe.config import MoEMergeConfig

    base, finetunes = llama
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode="random",
                        dtype=None, architecture=None, shared_experts=None)
    data = yaml.safe_load(config.read_text())
    data["experts"][0].update(positive_prompts=None, residual_scale=None)
    config.write_text(yaml.safe_dump(data))
    MoEMergeConfig.model_validate(data)
    assert merge(config, tmp_path / "out", dry_run=True).target.family == "mixtral"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's safetensors files, as saved."""
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _with_moekit(config: Path, moekit: dict | None = None, **per_expert: dict) -> Path:
    """``config`` with moekit's own settings added: ``moekit`` at the top level, and
    ``expertN=...`` in expert N."""
    data = yaml.safe_load(config.read_text())
    if moekit is not None:
        data["moekit"] = moekit
    for tag, settings in per_expert.items():
        data["experts"][int(tag.removeprefix("expert"))]["moekit"] = settings
    config.write_text(yaml.safe_dump(data))
    return config


@pytest.mark.parametrize("models, mode", [("llama", "random"), ("llama", "hidden"),
                                          ("qwen2", "cheap_embed")])
def test_granular_experts_are_slices_of_mergekits_with_its_router_rows_repeated(
        request, tmp_path, models, mode):
    # mergekit-moe ignores the moekit: mapping, so it merges the same YAML without it: its
    # expert e is the whole MLP that moekit's experts 2e and 2e+1 hold in halves (down_proj
    # times 2, exact, also after a residual_scale), its router row e their two rows.
    base, finetunes = request.getfixturevalue(models)
    config = write_yaml(tmp_path / "moe.yml", base, finetunes[:2], gate_mode=mode,
                        experts_per_token=1)
    data = yaml.safe_load(config.read_text())
    data["experts"][1]["residual_scale"] = 0.3
    if models == "qwen2":
        data["shared_experts"] = [{"source_model": str(base), "positive_prompts": ["story"]}]
    config.write_text(yaml.safe_dump(data))
    _with_moekit(config, {"granularity": 2})
    run_mergekit(config, tmp_path / "mergekit", seed=2)
    merge(config, tmp_path / "moekit", seed=2)
    theirs, ours = _state_dict(tmp_path / "mergekit"), _state_dict(tmp_path / "moekit")
    expected = dict(theirs)
    for layer in range(2):
        block = f"model.layers.{layer}.mlp"
        gate, up = theirs[f"{block}.experts.gate_up_proj"].chunk(2, dim=1)
        down = theirs[f"{block}.experts.down_proj"]
        halves = (slice(0, 24), slice(24, 48))  # intermediate_size 48 in two slices
        expected[f"{block}.experts.gate_up_proj"] = torch.stack([
            torch.cat([gate[e // 2, halves[e % 2]], up[e // 2, halves[e % 2]]])
            for e in range(4)])
        expected[f"{block}.experts.down_proj"] = torch.stack([
            down[e // 2][:, halves[e % 2]] * 2 for e in range(4)])
        expected[f"{block}.gate.weight"] = theirs[f"{block}.gate.weight"].repeat_interleave(
            2, dim=0)
    assert ours.keys() == expected.keys()
    assert [k for k, v in ours.items() if not torch.equal(v, expected[k])] == []
    written = json.loads((tmp_path / "moekit" / "config.json").read_text())
    assert written["num_experts_per_tok"] == 2
    if models == "llama":  # float32: the two models compute the same function
        from transformers import AutoModelForCausalLM

        ids = torch.tensor([[1, 3, 4, 5, 6, 7, 8, 9]])
        with torch.no_grad():
            logits = [AutoModelForCausalLM.from_pretrained(str(tmp_path / name))(ids).logits
                      for name in ("mergekit", "moekit")]
        torch.testing.assert_close(*logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["random", "hidden"])
def test_granular_experts_all_the_base_model_preserve_the_dense_function(llama, tmp_path, mode):
    from transformers import AutoModelForCausalLM

    base, _ = llama
    config = write_yaml(tmp_path / "moe.yml", base, [base, base, base], gate_mode=mode)
    merge(_with_moekit(config, {"granularity": 4}), tmp_path / "moe")
    ids = torch.tensor([[1, 3, 4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(str(base))(ids).logits
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"))
        moe = model(ids).logits
    assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (12, 8)
    torch.testing.assert_close(moe, dense, rtol=0, atol=1e-5)


def test_drop_ratio_redraws_the_neurons_upcycle_drop_redraws(llama, tmp_path):
    # Expert e of layer l re-initialises what upcycle --method drop --seed S makes expert e
    # of layer l re-initialise: from the base model, the same bytes; from a fine-tune, the
    # same neurons (drawn from the fine-tune's statistics), its other neurons as they are.
    from moekit import UpcycleSpec, upcycle
    from moekit.layouts.families import family_named

    base, finetunes = llama
    upcycle(base, tmp_path / "upcycled", UpcycleSpec(experts=3, top_k=2, method="drop",
                                                     drop_ratio=0.25, seed=5))
    config = write_yaml(tmp_path / "moe.yml", base, [base, finetunes[0], finetunes[1]],
                        gate_mode="random")
    _with_moekit(config, expert0={"drop_ratio": 0.25}, expert1={"drop_ratio": 0.25})
    merge(config, tmp_path / "moekit", seed=5)
    upcycled, ours = _tensors(tmp_path / "upcycled"), _tensors(tmp_path / "moekit")
    sources = [_tensors(base), _tensors(finetunes[0]), _tensors(finetunes[1])]
    key = family_named("mixtral").expert_key
    for layer in range(2):
        for name, module, dim in (("gate", "gate_proj", 0), ("up", "up_proj", 0),
                                  ("down", "down_proj", 1)):
            dense = f"model.layers.{layer}.mlp.{module}.weight"
            assert torch.equal(ours[key(layer, 0, name)], upcycled[key(layer, 0, name)])
            redrawn = _changed(upcycled[key(layer, 1, name)], sources[0][dense], dim)
            assert len(redrawn) == 12  # a quarter of 48 neurons
            assert _changed(ours[key(layer, 1, name)], sources[1][dense], dim) == redrawn
            assert torch.equal(ours[key(layer, 2, name)], sources[2][dense])


def _changed(tensor: torch.Tensor, source: torch.Tensor, dim: int) -> list[int]:
    """The indices along ``dim`` where ``tensor`` and ``source`` differ."""
    other = 1 - dim
    return (tensor != source).any(dim=other).nonzero().flatten().tolist()


def test_dry_run_shows_granularity_and_drop_ratios(llama, tmp_path, capsys):
    base, finetunes = llama
    config = write_yaml(tmp_path / "moe.yml", base, finetunes, gate_mode="random")
    _with_moekit(config, expert1={"drop_ratio": 0.5})
    args = ["merge", str(config), str(tmp_path / "out"), "--dry-run", "--seed", "9"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {k: out["merge"][k] for k in ("seed", "granularity", "routed_experts", "top_k")} == \
        {"seed": 9, "granularity": 1, "routed_experts": 3, "top_k": 2}
    assert [(s["tag"], s["drop_ratio"], s["experts"]) for s in out["merge"]["sources"]] == \
        [("expert0", None, [0]), ("expert1", 0.5, [1]), ("expert2", None, [2])]
    recipes = {t["name"]: t["recipe"] for t in out["tensors"]}
    assert recipes["model.layers.0.block_sparse_moe.experts.1.w2.weight"].startswith(
        "redraw(expert1/model.layers.0.mlp.down_proj.weight, 50% of dim 1")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "seed 9" in printed and "expert1: " in printed and "(drop ratio 0.5)" in printed
    _with_moekit(config, {"granularity": 2}, expert1={})
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["experts"] for s in out["merge"]["sources"]] == [[0, 1], [2, 3], [4, 5]]
    recipes = {t["name"]: t["recipe"] for t in out["tensors"]}
    assert recipes["model.layers.0.block_sparse_moe.experts.3.w2.weight"] == \
        "2*expert1/model.layers.0.mlp.down_proj.weight[:, 24:48]"
    assert main(args) == 0
    assert "each split into 2 (6 routed experts, router rows repeated for each source's 2)" \
        in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
