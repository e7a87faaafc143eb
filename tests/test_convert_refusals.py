"""A refusal offers only what then works. ``convert --to X`` refused names layouts ("use
A, B instead", "Layouts that hold them: A, B", "write the A or B layout") and
``--dequantize``: each is taken and must convert. The expert-parallel library calls
(``rank_plan``, ``load_experts``, ``load_sharded``) have neither: they name the
``layout=`` values in which the checkpoint plans, each of which then plans."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moekit import MoekitError, load_experts, load_sharded
from moekit.checkpoint import Checkpoint
from moekit.cli import main
from moekit.expert_parallel.ranges import EP_LAYOUTS, rank_plan
from moekit.layouts import LAYOUTS, family_of_model_type
from moekit.planner import understand_checkpoint

from . import ep_workers
from .test_fp8 import fp8_checkpoint
from .tiny_families import MULTIMODAL, build, build_multimodal, moe_causal_lm_types

OFFERED = re.compile(r"use ([\w, ]+) instead|Layouts that hold them: ([\w, ]+)"
                     r"|write the ([\w ]+?) layout")


def _offers(err: str) -> tuple[set[str], bool]:
    """The layouts a refusal of convert names, and whether it offers ``--dequantize``."""
    layouts = set()
    for match in OFFERED.finditer(err):
        layouts.update(re.split(r", | or ", next(g for g in match.groups() if g)))
    return layouts, "pass --dequantize" in err


def _converts(src: Path, out: Path, capsys, *options: str) -> tuple[int, str]:
    """``convert src out *options``: its exit code and what it wrote to stderr."""
    code = main(["convert", str(src), str(out), *options])
    return code, capsys.readouterr().err


def _check_offers(src: Path, tmp_path: Path, capsys, *options: str) -> dict[str, set[str]]:
    """Convert ``src`` to every layout (with ``options``); every layout and
    ``--dequantize`` a refusal offers then converts. The layouts each refusal offers."""
    codes, offers = {}, {}
    for name in LAYOUTS:
        codes[name], err = _converts(src, tmp_path / f"{name}{len(options)}", capsys,
                                     "--to", name, *options)
        if codes[name]:
            assert err.startswith("moekit: error: ") and "Traceback" not in err, err
            offers[name], dequantize = _offers(err)
            if dequantize:
                assert _converts(src, tmp_path / f"{name}-dequantized", capsys, "--to", name,
                                 "--dequantize", *options)[0] == 0, err
    for name, offered in offers.items():
        assert offered <= set(LAYOUTS), offered
        assert not [other for other in offered if codes[other]], (name, offered, codes)
    return offers


TINY = [(t, build) for t in moe_causal_lm_types()] + [(t, build_multimodal) for t in MULTIMODAL]
"""Every tiny model of tests/tiny_families.py: causal LMs and multimodal models."""


@pytest.mark.parametrize("model_type, builder", TINY, ids=[t for t, _ in TINY])
def test_a_refused_layout_offers_only_layouts_that_then_convert(model_type, builder,
                                                                tmp_path, capsys):
    """Each layout a refusal names converts the checkpoint (not megatron for a model type
    Megatron-Core's writer does not take, Mistral-Large-4's among them); a layout refused
    for the family (``Family.unconverted``) offers some."""
    builder(model_type).save_pretrained(tmp_path / "src")
    offers = _check_offers(tmp_path / "src", tmp_path, capsys)
    family = family_of_model_type(model_type)
    for refused in getattr(family, "unconverted", {}):
        assert offers[refused], refused


def test_fp8_refusals_offer_only_what_converts(tmp_path, capsys):
    """FP8 experts whose size (200 rows) is not a whole number of 128-row blocks:
    transformers' joined gate+up scale grid cannot hold their scales, so a layout without
    scales (nemo) offers hf and vllm, not transformers; a config.json without attention
    heads makes megatron refuse --dequantize's bf16 weights too, so it is not offered."""
    src = fp8_checkpoint(tmp_path / "fp8", intermediate=200)
    offers = _check_offers(src, tmp_path, capsys)
    assert offers["nemo"] == {"hf", "vllm"}
    code, err = _converts(src, tmp_path / "megatron", capsys, "--to", "megatron")
    assert code == 2 and _offers(err) == ({"hf", "vllm"}, False), err
    code, err = _converts(src, tmp_path / "nemo", capsys, "--to", "nemo")
    assert code == 2 and _offers(err)[1], err
    _check_offers(src, tmp_path, capsys, "--dequantize")


def test_a_refused_source_offers_layouts_whose_checkpoints_convert(tmp_path, capsys):
    """transformers' own state dict of Sarvam-MoE (its attention split, which moekit does
    not undo) is refused as a source; each layout offered instead is one the model's files
    convert to, and back from (not megatron, whose writer takes no sarvam_moe)."""
    from safetensors.torch import save_file

    model = build("sarvam_moe")
    model.save_pretrained(tmp_path / "files")
    (tmp_path / "state-dict").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              tmp_path / "state-dict" / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(tmp_path / "state-dict")
    code, err = _converts(tmp_path / "state-dict", tmp_path / "out", capsys, "--to", "hf")
    assert code == 2 and "layout of sarvam_moe is refused as a source" in err, err
    offered, _ = _offers(err)
    assert "hf" in offered
    for name in offered:
        written = tmp_path / name
        assert _converts(tmp_path / "files", written, capsys, "--to", name)[0] == 0, name
        assert _converts(written, tmp_path / f"{name}-back", capsys, "--to", "hf")[0] == 0, name


@pytest.fixture(scope="module")
def mistral_large4(tmp_path_factory) -> Path:
    """A tiny Mistral-Large-4, whose nemo and transformers layouts are refused for the
    family (tests/test_multimodal_refusals.py checks why against their code)."""
    folder = tmp_path_factory.mktemp("refusals") / "mistral_large4"
    build_multimodal("mistral_large4").save_pretrained(folder)
    return folder


def _plans(src: Path, layout: str) -> bool:
    """True where ``rank_plan`` plans EP rank 0 of 2 of ``src`` in ``layout``."""
    try:
        rank_plan(understand_checkpoint(Checkpoint.open(src)), 2, 0, layout)
    except MoekitError:
        return False
    return True


def _ep_refusal(src: Path, layout: str) -> str:
    with pytest.raises(MoekitError) as refused:
        rank_plan(understand_checkpoint(Checkpoint.open(src)), 2, 0, layout)
    return str(refused.value)


def test_rank_plan_refused_for_the_family_names_the_layout_values_that_plan(mistral_large4):
    """nemo and transformers refused for Mistral-Large-4: the refusal names
    ``layout='vllm'``, the one value of the others that plans, and none of convert's
    remedies; hf, which keeps one tensor per expert, names vllm alone too."""
    assert [name for name in EP_LAYOUTS if _plans(mistral_large4, name)] == ["vllm"]
    family = family_of_model_type("mistral_large4")
    for refused in ("nemo", "transformers"):
        err = _ep_refusal(mistral_large4, refused)
        assert family.unconverted[refused] in err
        assert err.endswith("what the layout promises: pass layout='vllm'"), err
        assert "use hf" not in err and "--" not in err
    assert _ep_refusal(mistral_large4, "hf").endswith("keeps one tensor per expert: choose vllm")


def test_rank_plan_refused_for_fp8_scales_names_the_layout_values_that_plan(tmp_path):
    """nemo holds no FP8 scales (no --dequantize to offer) and transformers' joined scale
    grid cannot hold these: each refusal names what plans, vllm."""
    src = fp8_checkpoint(tmp_path / "fp8", intermediate=200)
    assert [name for name in EP_LAYOUTS if _plans(src, name)] == ["vllm"]
    err = _ep_refusal(src, "nemo")
    assert "cannot hold the qwen3_moe experts' down_scale" in err
    assert err.endswith("holds no scale tensors): pass layout='vllm'") and "--" not in err
    err = _ep_refusal(src, "transformers")
    assert "one grid over their joined 400 rows" in err
    assert err.endswith("\nfor expert parallelism: pass layout='vllm'"), err


def load_refused(rank: int, world: int, store: str, src: str, log_dir: str) -> None:
    """On a gloo group of ``world`` ranks, ``load_experts`` (a 1-D ep mesh) and
    ``load_sharded`` (a 1 x world mesh) of ``src`` in nemo; each error message written to
    ``log_dir/{call}-{rank}.txt``."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    calls = {"load_experts": lambda: load_experts(src, init_device_mesh(
                 "cpu", (world,), mesh_dim_names=("ep",)), layout="nemo"),
             "load_sharded": lambda: load_sharded(src, init_device_mesh(
                 "cpu", (1, world), mesh_dim_names=("dp", "ep")), layout="nemo")}
    for name, call in calls.items():
        try:
            call()
            outcome = "loaded"
        except MoekitError as err:
            outcome = str(err)
        Path(log_dir, f"{name}-{rank}.txt").write_text(outcome)
    ep_workers.finish()


def test_load_experts_and_load_sharded_name_the_layout_values_that_plan(mistral_large4,
                                                                        tmp_path):
    """The library loads refuse nemo for Mistral-Large-4 on every rank, naming
    ``layout='vllm'`` rather than convert's layouts."""
    ep_workers.spawn(load_refused, 2, tmp_path, str(mistral_large4), str(tmp_path))
    for call in ("load_experts", "load_sharded"):
        for rank in range(2):
            err = (tmp_path / f"{call}-{rank}.txt").read_text()
            assert err.startswith("the nemo layout of mistral_large4 is refused"), err
            assert err.endswith(": pass layout='vllm'") and "use hf" not in err, err


def test_plan_tries_each_layout_once_for_its_default(tmp_path, capsys, monkeypatch):
    """plan --ep tries the layouts in turn and drops their refusals: a refusal met while
    trying offers nothing, so no layout is planned twice (transformers' refusal of these
    FP8 scales would otherwise plan transformers with --dequantize, hf and vllm to say what
    converts)."""
    from moekit import planner
    from moekit.expert_parallel import ranges

    build_plan, planned = planner.build_plan, []

    def counted(analysis, dst, *args, **kwargs):
        planned.append(dst.name)
        return build_plan(analysis, dst, *args, **kwargs)

    monkeypatch.setattr(planner, "build_plan", counted)
    monkeypatch.setattr(ranges, "build_plan", counted)
    src = fp8_checkpoint(tmp_path / "fp8", intermediate=200)
    assert main(["plan", str(src), "--ep", "2"]) == 0
    assert capsys.readouterr().out.startswith("layout vllm: ")
    assert planned == ["transformers", "vllm"]
