"""Every (family x layout) entry of moekit's tables, over synthetic headers (no transformers,
no models): a family's HF tensors, converted to the layout and back, come back under their
names, shapes and dtypes, and with their values (tiny ``torch.arange`` tensors); and the plan
of each conversion is the one recorded in ``tests/data/layout_plans.json``, so that a change
to a table or a layout shows up as a reviewed change of that file.

``MOEKIT_UPDATE_LAYOUT_PLANS=1`` rewrites the file from the current tables.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from moekit.errors import MoekitError
from moekit.executors.memory import run_plan
from moekit.layouts import FAMILIES, HF, LAYOUTS, ExpertBlock, Family, Layout
from moekit.layouts.families import GENERIC_FAMILIES
from moekit.plan import Plan, Read, describe
from moekit.planner import analyse, build_plan
from moekit.sources import DictSource

SNAPSHOT = Path(__file__).parent / "data" / "layout_plans.json"
UPDATE = os.environ.get("MOEKIT_UPDATE_LAYOUT_PLANS") == "1"
EXPERTS, HIDDEN, INTER = 3, 8, 4
"""Distinct sizes, so that a transposition or a wrong expert count changes a shape."""
EMBEDDINGS_AND_NORM = {"backbone.": ("embeddings", "norm_f")}
"""The embeddings' and final norm's module names of a model under ``backbone.``
(Nemotron-H's files, transformers 5.24); ``embed_tokens`` and ``norm`` elsewhere."""
HEADS = {"thinker.model.": "thinker.lm_head.weight"}
"""The output head of a model whose layers are under the key's prefix, where it is not
``lm_head.weight`` (Qwen3-Omni's thinker's)."""
PAIRS = [(family, layout) for family in FAMILIES + GENERIC_FAMILIES
         for layout in LAYOUTS.values()]


def _piece_shape(piece: str) -> tuple[int, ...]:
    """A canonical piece's shape: weights [out, in], biases [out]."""
    out, inp = (HIDDEN, INTER) if piece.startswith("down") else (INTER, HIDDEN)
    return (out,) if piece.endswith("_bias") else (out, inp)


def hf_headers(family: Family) -> dict[str, Read]:
    """A one-layer model of ``family`` in HF naming (the ``hf`` layout's emit of canonical
    pieces), with its router, shared expert, attention, norms, embeddings and head; for a
    family of several expert groups, ``EXPERTS`` in each and each group's router and
    score-correction bias as its files hold them."""
    block = ExpertBlock(1, family.block.format(layer=1))
    for piece in family.pieces:
        for expert in range(EXPERTS * family.n_groups):
            block.pieces[(piece, expert)] = Read(f"{piece}.{expert}", (), _piece_shape(piece),
                                                 "F32")
    headers = {t.name: Read(t.name, (), t.shape, t.dtype)
               for t in HF.emit(block, EXPERTS * family.n_groups, family)}
    prefix = family.block.split("layers.")[0]
    embeddings, norm = EMBEDDINGS_AND_NORM.get(prefix, ("embed_tokens", "norm"))
    routers = {f"{block.block}.{part.hf}": (family.n_groups, EXPERTS) if part.row else
               (HIDDEN, EXPERTS) if part.transposed else (EXPERTS, HIDDEN)
               for group in family.expert_groups for part in group.parts}
    if not routers and family.router is not None:  # (Zaya's router, an MLP, is left out)
        routers = {f"{block.block}.{family.router}": (EXPERTS, HIDDEN)}
    others = dict(routers)
    others |= {f"{prefix}{embeddings}.weight": (16, HIDDEN), f"{prefix}{norm}.weight": (HIDDEN,),
               HEADS.get(prefix, "lm_head.weight"): (16, HIDDEN)}
    layer = f"{prefix}layers.1."
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        others[f"{layer}self_attn.{name}.weight"] = (HIDDEN, HIDDEN)
    for name in ("input_layernorm", "post_attention_layernorm"):
        others[f"{layer}{name}.weight"] = (HIDDEN,)
    for layout in LAYOUTS.values():  # tensors a layout needs beside the router: the
        for key in layout.needs(block.block, family):  # router's score-correction bias [E]
            others[key] = (EXPERTS,)
    if family.shared_expert:
        for name, shape in (("gate_proj", (INTER, HIDDEN)), ("up_proj", (INTER, HIDDEN)),
                            ("down_proj", (HIDDEN, INTER))):
            others[f"{block.block}.{family.shared_expert}.{name}.weight"] = shape
    headers.update({key: Read(key, (), shape, "F32") for key, shape in others.items()})
    return headers


def plan_between(headers: dict, family: Family, src: str, dst: Layout) -> Plan:
    analysis = analyse(headers, None, {}, f"{family.name} in {src}", from_=src,
                       family=family.name)
    return build_plan(analysis, dst)


def values(headers: dict[str, Read]) -> dict[str, torch.Tensor]:
    """Each tensor a distinct run of integers (exact in float32)."""
    out, start = {}, 0
    for key, meta in headers.items():
        count = math.prod(meta.shape)
        out[key] = torch.arange(start, start + count, dtype=torch.float32).reshape(meta.shape)
        start += count
    return out


def described(plan: Plan) -> list[str]:
    """The plan, one line a tensor: what --dry-run shows of it."""
    return [f"{t.name} {list(t.shape)} {t.dtype} = {describe(t.recipe)}" for t in plan.tensors]


def recorded(family: Family, layout: Layout) -> list[str]:
    """The plan of ``family``'s headers from hf to ``layout``, or the reason it is refused:
    the message up to its first colon, without the list of what is offered instead, which
    grows with the tables."""
    try:
        return described(plan_between(hf_headers(family), family, "hf", layout))
    except MoekitError as err:
        return [f"refused: {str(err).split(':')[0]}"]


@pytest.fixture(scope="module")
def snapshot() -> dict[str, list[str]]:
    if UPDATE:
        plans = {f"{family.name} -> {layout.name}": recorded(family, layout)
                 for family, layout in PAIRS}
        SNAPSHOT.write_text(json.dumps(plans, indent=1, ensure_ascii=False) + "\n")
    return json.loads(SNAPSHOT.read_text())


def test_the_snapshot_holds_every_pair_of_the_tables(snapshot):
    assert set(snapshot) == {f"{family.name} -> {layout.name}" for family, layout in PAIRS}


@pytest.mark.parametrize("family,layout", PAIRS,
                         ids=[f"{family.name}-{layout.name}" for family, layout in PAIRS])
def test_hf_to_layout_to_hf_is_the_identity_and_the_plan_is_the_recorded_one(family, layout,
                                                                            snapshot):
    assert recorded(family, layout) == snapshot[f"{family.name} -> {layout.name}"]
    headers = hf_headers(family)
    try:
        there = plan_between(headers, family, "hf", layout)
    except MoekitError:
        return  # recorded above: the layout refuses the family, naming why
    assert there.moe_layers == {1: EXPERTS * family.n_groups}
    laid_out = {t.name: t for t in there.tensors}
    back = plan_between(laid_out, family, layout.name, HF)
    assert [(t.name, t.shape, t.dtype) for t in back.tensors] == \
        [(key, meta.shape, meta.dtype) for key, meta in headers.items()]
    original = values(headers)
    returned = run_plan(back, DictSource(run_plan(there, DictSource(original))))
    assert all(torch.equal(returned[key], original[key]) for key in original)


def test_the_recorded_transformers_gate_up_is_gate_then_up_per_expert(snapshot):
    """The snapshot is read against a consumer's fact: transformers 5.24 holds Qwen3-MoE's
    ``gate_up_proj`` as [E, 2I, H], each expert's gate rows then its up rows."""
    line = next(line for line in snapshot["qwen3_moe -> transformers"]
                if ".experts.gate_up_proj " in line)
    parts = ", ".join(f"cat(model.layers.1.mlp.experts.{e}.gate_proj.weight, "
                      f"model.layers.1.mlp.experts.{e}.up_proj.weight, dim=0)"
                      for e in range(EXPERTS))
    assert line == (f"model.layers.1.mlp.experts.gate_up_proj [{EXPERTS}, {2 * INTER}, "
                    f"{HIDDEN}] F32 = stack({parts})")
