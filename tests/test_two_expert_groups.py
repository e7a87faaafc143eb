"""A family whose MoE layers hold two groups of routed experts: ERNIE-4.5-VL's text and
vision experts, of different intermediate sizes, each group with its own router.

Its Hugging Face files number both groups' experts in one sequence (text first), with the
routers ``mlp.gate.weight`` and ``mlp.gate.weight_1`` stored [H, E] and both groups'
score-correction biases in one [2, E] tensor; transformers 5.24 holds them apart
(``mlp.text_moe``, ``mlp.vision_moe``). The oracle is transformers: the files its
``save_pretrained`` writes, its model's ``state_dict()``, its own load-time renaming
(conversion_mapping.py "ernie4_5_vl_moe"), its logits.
"""

from __future__ import annotations

import pytest
import torch

from moekit import convert, inspect
from moekit.errors import MoekitError
from moekit.layouts import TRANSFORMERS, family_named

from .conftest import load_all, same_bytes
from .test_families import _transformers_renamer
from .tiny_families import build_multimodal

MODEL_TYPE = "ernie4_5_vl_moe"
FAMILY = family_named(MODEL_TYPE)
TEXT, VISION = 16, 8
"""The tiny model's text and vision expert intermediate sizes (``moe_intermediate_size``)."""


@pytest.fixture(scope="module")
def ernie(tmp_path_factory):
    """The tiny ERNIE-4.5-VL model and the folder its save_pretrained wrote, in shards."""
    model = build_multimodal(MODEL_TYPE, moe_intermediate_size=[TEXT, VISION])
    path = tmp_path_factory.mktemp("ernie") / "src"
    model.save_pretrained(path, max_shard_size="200KB")
    return model, path


def _untied(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without the tensors that share another's storage (the tied
    output head), which save_pretrained does not write."""
    seen, out = set(), {}
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[key] = tensor
    return out


def test_the_files_hold_both_groups_in_one_numbering(ernie):
    """What the rest relies on, read off save_pretrained's files: experts 0 to n-1 are
    [TEXT, H], n to 2n-1 [VISION, H]; two routers [H, n]; one bias [2, n]."""
    model, path = ernie
    files, n = load_all(path), model.config.text_config.moe_num_experts
    block = "model.layers.1.mlp"
    assert [files[f"{block}.experts.{e}.gate_proj.weight"].shape[0] for e in range(2 * n)] == \
        [TEXT] * n + [VISION] * n
    assert f"{block}.experts.{2 * n}.gate_proj.weight" not in files
    hidden = model.config.text_config.hidden_size
    assert files[f"{block}.gate.weight"].shape == files[f"{block}.gate.weight_1"].shape == \
        (hidden, n)
    assert files[f"{block}.moe_statics.e_score_correction_bias"].shape == (2, n)


def test_transformers_is_the_model_state_dict_and_converts_back_to_the_files(ernie, tmp_path):
    """``--to transformers`` writes the model's state dict, name for name and byte for
    byte (text_moe and vision_moe each with its experts, router and bias row); converted
    back, the files are save_pretrained's byte for byte; transformers loads the round trip
    into the same state dict and the same logits."""
    model, src = ernie
    convert(src, tmp_path / "transformers", to="transformers")
    fused, expected = load_all(tmp_path / "transformers"), _untied(model)
    assert fused.keys() == expected.keys()
    assert [k for k in expected if not same_bytes(fused[k], expected[k])] == []
    down = {k: v.shape for k, v in fused.items() if k.endswith("moe.experts.down_proj")}
    assert {shape[2] for shape in down.values()} == {TEXT, VISION}
    convert(tmp_path / "transformers", tmp_path / "back", to="hf")
    original, back = load_all(src), load_all(tmp_path / "back")
    assert back.keys() == original.keys()
    assert [k for k in original if not same_bytes(original[k], back[k])] == []
    loaded, info = type(model).from_pretrained(tmp_path / "back", dtype=torch.float32,
                                               output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = loaded.state_dict()
    assert [k for k, v in model.state_dict().items() if not same_bytes(state[k], v)] == []
    ids = torch.arange(12).reshape(1, 12) % model.config.text_config.vocab_size
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_family_table_agrees_with_transformers_conversion_mapping():
    """Names only: transformers' own load-time renaming sends each router of the files to
    the group moekit names, the first expert of each group's projections into that
    group's grouped tensors, and the tensors outside the experts where the family's
    renames do."""
    renamed = _transformers_renamer(MODEL_TYPE)
    block = "model.layers.1.mlp"
    for group in FAMILY.expert_groups:
        module = group.modules["transformers"]
        for part in group.parts:
            if not part.row:
                assert renamed(f"{block}.{part.hf}")[0] == TRANSFORMERS.from_hf_key(
                    f"{block}.{module}.{part.name}", FAMILY)
    text = FAMILY.expert_groups[0].modules["transformers"]
    for spec in TRANSFORMERS.specs(FAMILY):
        if spec.piece_dims != 2 or not set(spec.projections) <= set(FAMILY.projections):
            continue
        grouped = TRANSFORMERS.from_hf_key(f"{block}.{text}.experts.{spec.name}", FAMILY)
        for position, projection in enumerate(spec.projections):
            name, joined_as = renamed(FAMILY.expert_key(1, 0, projection))
            assert name == grouped and joined_as in (None, position), projection
    for key in ("model.vision_model.blocks.0.attn.qkv.weight", "model.norm.weight",
                "model.resampler_model.temporal_linear.3.bias", "model.embed_tokens.weight",
                "model.layers.1.mlp.shared_experts.up_proj.weight"):
        assert renamed(key)[0] == TRANSFORMERS.from_hf_key(key, FAMILY), key


def test_inspect_shows_both_groups(ernie):
    """Each group with its experts and intermediate size, as the files hold them."""
    model, src = ernie
    info = inspect(src)
    n = model.config.text_config.moe_num_experts
    assert info.family == MODEL_TYPE and info.n_experts == 2 * n
    assert info.expert_groups == [
        {"name": "text", "experts": n, "intermediate_size": TEXT},
        {"name": "vision", "experts": n, "intermediate_size": VISION}]
    shown = info.render()
    assert f"text: E={n}, I={TEXT}" in shown and f"vision: E={n}, I={VISION}" in shown


@pytest.mark.parametrize("layout", ["nemo", "vllm", "torchtitan"])
def test_layouts_without_a_place_for_two_groups_are_refused(ernie, layout, tmp_path, capsys):
    """NeMo AutoModel 0.7 has no ERNIE-4.5-VL model, vLLM holds the groups in modules the
    vllm layout does not name, torchtitan 0.3 has no such model: each is refused saying
    why, with exit code 2, and nothing is written."""
    from moekit.cli import main

    _, src = ernie
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", layout]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    reason = FAMILY.groups_unheld.get(layout, "torchtitan 0.3 has no model of it")
    assert reason in err and ("text, vision" in err or layout == "torchtitan"), err


def test_expert_parallelism_is_refused(ernie):
    """Expert parallelism splits one group of experts over the ranks; with two groups a
    rank's range would cut across them, so it is refused naming the groups."""
    from moekit.expert_parallel.report import ep_report

    _, src = ernie
    with pytest.raises(MoekitError, match=r"2 groups in each MoE layer \(text, vision\)"):
        ep_report(src, ep_size=2, layout="transformers")


def test_planning_from_the_config_alone_is_refused_naming_the_groups(ernie, capsys):
    """``moekit plan config.json --ep 2``: refused for the groups before transformers is
    asked to build the model."""
    from moekit.cli import main

    _, src = ernie
    assert main(["plan", str(src / "config.json"), "--ep", "2"]) == 2
    err = capsys.readouterr().err
    assert "2 groups in each MoE layer (text, vision)" in err and "Traceback" not in err


def test_load_experts_is_refused_on_every_rank(ernie, tmp_path):
    """``load_experts`` on two gloo ranks: each rank refuses, naming the groups, before
    reading anything."""
    from . import ep_workers

    _, src = ernie
    ep_workers.spawn(ep_workers.load_expecting_error, 2, tmp_path, str(src), str(tmp_path))
    outcomes = [(tmp_path / f"{rank}.txt").read_text() for rank in range(2)]
    assert all("2 groups in each MoE layer (text, vision)" in text for text in outcomes), \
        outcomes


def _with(path, tmp_path, change) -> str:
    """A copy of the checkpoint at ``path`` with ``change`` applied to its tensors."""
    import shutil

    from safetensors.torch import save_file

    out = tmp_path / "changed"
    shutil.copytree(path, out)
    for file in out.glob("*.safetensors"):
        file.unlink()
    tensors = load_all(path)
    change(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    return str(out)


def test_groups_of_unequal_counts_are_refused(ernie, tmp_path):
    """A transformers-layout source whose vision group holds one expert fewer than its
    text group: the two groups' tensors are named as disagreeing, nothing is guessed."""
    _, src = ernie
    convert(src, tmp_path / "transformers", to="transformers")

    def drop_one(tensors):
        for key in [k for k in tensors if ".vision_moe.experts." in k]:
            tensors[key] = tensors[key][1:].clone()

    changed = _with(tmp_path / "transformers", tmp_path, drop_one)
    with pytest.raises(MoekitError, match="disagree on the expert count"):
        convert(changed, tmp_path / "hf", to="hf")


def test_a_router_that_does_not_fit_its_group_is_refused(ernie, tmp_path):
    """The files' vision router [H, E] one expert's column short: named, with the shape
    expected for the group's experts."""
    _, src = ernie

    def cut(tensors):
        key = "model.layers.1.mlp.gate.weight_1"
        tensors[key] = tensors[key][:, :-1].clone()

    changed = _with(src, tmp_path, cut)
    with pytest.raises(MoekitError, match=r"model\.layers\.1\.mlp\.gate\.weight_1 is"):
        convert(changed, tmp_path / "out", to="transformers")


def test_the_config_decides_which_layers_hold_the_groups(ernie, tmp_path):
    """``mlp_layer_types`` (transformers 5.24's rule for ERNIE-4.5-VL): a layer the config
    makes dense but whose experts the files hold is refused, naming the layer."""
    import json
    import shutil

    _, src = ernie
    changed = tmp_path / "changed"
    shutil.copytree(src, changed)
    config = json.loads((changed / "config.json").read_text())
    config["text_config"]["mlp_layer_types"] = ["dense", "sparse", "dense"]
    (changed / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoekitError, match=r"layer 2 holds experts, but .* makes it a dense "
                                          r"layer \(num_hidden_layers 3, mlp_layer_types"):
        inspect(changed)
