"""Expert LoRA adapters: PEFT's grouped form <-> per-expert keys <-> NeMo's grouped names.

With transformers v5 the experts of a layer are one parameter each (``gate_up_proj``
[E, 2I, H], ``down_proj`` [E, H, I]), and PEFT adapts them with ``target_parameters``.
Its adapter stores, per parameter, ``lora_A`` [E*r, in] (expert-major rows: expert e owns
rows ``e*r ... e*r + r``) and ``lora_B`` [out, E*r] (rank-major columns: expert e owns
columns ``e::E``), under ``…experts.lora_A.weight``, the first targeted parameter nested
one ``.base_layer`` deeper. The per-expert form (what NeMo's ``_convert_lora_expert_to_hf``
writes) is ``…experts.{e}.{gate,up,down}_proj.lora_{A,B}.weight`` with A [r, in] and
B [out, r]; gate and up share the fused A. NeMo's grouped form is ``lora_gate_and_up_A``
[E, H, r], ``lora_gate_and_up_B`` [E, r, 2I], ``lora_down_A`` [E, I, r] and ``lora_down_B``
[E, r, H] (its experts compute ``x @ W``). Every conversion is a plan of exact data
movements, so round trips are byte-identical.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .conversion import state_dict_meta
from .dtypes import to_safetensors
from .errors import MoekitError
from .executors.memory import run_plan
from .plan import Concat, Expr, Plan, Read, Stack, TensorPlan, Transpose
from .sources import DictSource

_PEFT = re.compile(r"^(?P<experts>.*\.experts)(?P<nest>(?:\.base_layer)*)\.lora_(?P<ab>[AB])\.weight$")
_PER_EXPERT = re.compile(
    r"^(?P<experts>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.lora_(?P<ab>[AB])\.weight$")
_NEMO = re.compile(r"^(?P<experts>.*\.experts)\.lora_(?P<group>gate_and_up|down)_(?P<ab>[AB])$")
PARAMETERS = ("gate_up_proj", "down_proj")
"""The order PEFT wrapped the experts' parameters in (the first is nested deeper). PEFT's
adapter_config.json lists ``target_parameters`` sorted, so the order is read from the
adapter's keys (``parameter_order``)."""


@dataclass(frozen=True)
class _Layer:
    """One layer's expert LoRA in canonical per-expert pieces: (name, e) -> [out, r] or
    [r, in] recipe, for names gate_A, gate_B, up_A, up_B, down_A, down_B."""

    experts: str
    pieces: dict[tuple[str, int], Expr]


def peft_to_hf(adapter: Mapping[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """PEFT's grouped expert LoRA -> per-expert keys (other adapter tensors unchanged)."""
    return _run(adapter, _from_peft(adapter, n_experts), _emit_hf)


def peft_to_nemo(adapter: Mapping[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """PEFT's grouped expert LoRA -> NeMo's ``lora_gate_and_up_A/B``, ``lora_down_A/B``."""
    return _run(adapter, _from_peft(adapter, n_experts), _emit_nemo)


def hf_to_peft(adapter: Mapping[str, torch.Tensor], n_experts: int,
               parameters: Sequence[str] = PARAMETERS) -> dict[str, torch.Tensor]:
    """Per-expert LoRA keys -> PEFT's grouped form (``parameters``: the adapter's
    ``target_parameters`` order)."""
    return _run(adapter, _from_hf(adapter, n_experts), lambda l: _emit_peft(l, n_experts,
                                                                            parameters))


def nemo_to_peft(adapter: Mapping[str, torch.Tensor], n_experts: int,
                 parameters: Sequence[str] = PARAMETERS) -> dict[str, torch.Tensor]:
    """NeMo's grouped LoRA names -> PEFT's grouped form."""
    return _run(adapter, _from_nemo(adapter), lambda l: _emit_peft(l, n_experts, parameters))


def parameter_order(adapter: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """The order in which PEFT wrapped gate_up_proj and down_proj in this adapter (the
    more deeply nested first), for converting back to it."""
    for key in adapter:
        match = _PEFT.match(key)
        if match:
            pairs = _peft_pairs(adapter, match["experts"])
            depth = {name: len(nest) for name, (nest, _) in pairs.items()}
            return tuple(sorted(depth, key=lambda name: -depth[name]))
    return PARAMETERS


def _peft_pairs(adapter: Mapping[str, torch.Tensor], experts: str
                ) -> dict[str, tuple[str, dict[str, str]]]:
    """gate_up_proj and down_proj of one layer: (nesting, {"A": key, "B": key}) each. The
    fused gate_up has twice as many outputs as down has inputs."""
    by_nest: dict[str, dict[str, str]] = {}
    for key in adapter:
        match = _PEFT.match(key)
        if match and match["experts"] == experts:
            by_nest.setdefault(match["nest"], {})[match["ab"]] = key
    if len(by_nest) != 2 or any(set(ab) != {"A", "B"} for ab in by_nest.values()):
        raise MoekitError(f"{experts}: expected LoRA A and B for gate_up_proj and down_proj, "
                          f"found {sorted(k for ab in by_nest.values() for k in ab.values())}")
    (nest1, first), (nest2, second) = by_nest.items()
    if adapter[first["B"]].shape[0] == 2 * adapter[second["A"]].shape[1]:
        return {"gate_up_proj": (nest1, first), "down_proj": (nest2, second)}
    return {"gate_up_proj": (nest2, second), "down_proj": (nest1, first)}


def _run(adapter: Mapping[str, torch.Tensor], layers: dict[str, tuple[_Layer, set[str]]],
         emit: Callable[[_Layer], list[TensorPlan]]) -> dict[str, torch.Tensor]:
    """Every adapter tensor: each layer's expert LoRA in the form ``emit`` writes, the
    others (attention LoRA, ...) unchanged."""
    meta = state_dict_meta(adapter)
    used = {key for _, keys in layers.values() for key in keys}
    tensors = [t for layer, _ in layers.values() for t in emit(layer)]
    tensors += [TensorPlan(k, Read.whole(k, m)) for k, m in meta.items() if k not in used]
    return run_plan(Plan("lora", "", "", tensors), DictSource(adapter))


def _read(adapter: Mapping[str, torch.Tensor], key: str, region: tuple = ()) -> Read:
    view = adapter[key][region] if region else adapter[key]
    return Read(key, region, tuple(view.shape), to_safetensors(view.dtype))


def _from_peft(adapter: Mapping[str, torch.Tensor], n: int) -> dict[str, tuple[_Layer, set[str]]]:
    layers = {}
    for experts in dict.fromkeys(m["experts"] for m in map(_PEFT.match, adapter) if m):
        pairs = _peft_pairs(adapter, experts)
        gate_up, down = pairs["gate_up_proj"][1], pairs["down_proj"][1]
        size = adapter[down["A"]].shape[1]
        rank = adapter[down["A"]].shape[0] // n
        pieces: dict[tuple[str, int], Expr] = {}
        for e in range(n):
            rows = (slice(e * rank, (e + 1) * rank),)
            columns = slice(e, None, n)
            pieces[("gate_A", e)] = pieces[("up_A", e)] = _read(adapter, gate_up["A"], rows)
            pieces[("gate_B", e)] = _read(adapter, gate_up["B"], (slice(0, size), columns))
            pieces[("up_B", e)] = _read(adapter, gate_up["B"], (slice(size, 2 * size), columns))
            pieces[("down_A", e)] = _read(adapter, down["A"], rows)
            pieces[("down_B", e)] = _read(adapter, down["B"], (slice(None), columns))
        keys = {k for p in (gate_up, down) for k in p.values()}
        layers[experts] = (_Layer(experts, pieces), keys)
    return layers


def _from_hf(adapter: Mapping[str, torch.Tensor], n: int) -> dict[str, tuple[_Layer, set[str]]]:
    layers: dict[str, tuple[_Layer, set[str]]] = {}
    for key in adapter:
        match = _PER_EXPERT.match(key)
        if match:
            layer, keys = layers.setdefault(match["experts"], (_Layer(match["experts"], {}), set()))
            layer.pieces[(f"{match['proj']}_{match['ab']}", int(match["e"]))] = _read(adapter, key)
            keys.add(key)
    for experts, (layer, _) in layers.items():
        missing = [f"{name}[{e}]" for e in range(n) for name in
                   ("gate_A", "gate_B", "up_A", "up_B", "down_A", "down_B")
                   if (name, e) not in layer.pieces]
        if missing:
            raise MoekitError(f"{experts}: LoRA pieces missing: {', '.join(missing[:8])}")
        unequal = [e for e in range(n) if not torch.equal(adapter[layer.pieces[("gate_A", e)].key],
                                                          adapter[layer.pieces[("up_A", e)].key])]
        if unequal:
            raise MoekitError(f"{experts}: experts {unequal} have different gate and up lora_A; "
                              "the fused gate_up_proj LoRA shares one A per expert")
    return layers


def _from_nemo(adapter: Mapping[str, torch.Tensor]) -> dict[str, tuple[_Layer, set[str]]]:
    found: dict[str, dict[str, str]] = {}
    for key in adapter:
        match = _NEMO.match(key)
        if match:
            found.setdefault(match["experts"], {})[f"{match['group']}_{match['ab']}"] = key
    layers = {}
    for experts, keys in found.items():
        gate_up_b = keys["gate_and_up_B"]
        size = adapter[gate_up_b].shape[2] // 2
        pieces: dict[tuple[str, int], Expr] = {}
        for e in range(adapter[gate_up_b].shape[0]):
            pieces[("gate_A", e)] = pieces[("up_A", e)] = Transpose(
                _read(adapter, keys["gate_and_up_A"], (e,)))
            pieces[("gate_B", e)] = Transpose(_read(adapter, gate_up_b, (e, slice(None),
                                                                          slice(0, size))))
            pieces[("up_B", e)] = Transpose(_read(adapter, gate_up_b, (e, slice(None),
                                                                        slice(size, 2 * size))))
            pieces[("down_A", e)] = Transpose(_read(adapter, keys["down_A"], (e,)))
            pieces[("down_B", e)] = Transpose(_read(adapter, keys["down_B"], (e,)))
        layers[experts] = (_Layer(experts, pieces), set(keys.values()))
    return layers


def _experts(layer: _Layer) -> range:
    return range(1 + max(e for _, e in layer.pieces))


def _emit_hf(layer: _Layer) -> list[TensorPlan]:
    return [TensorPlan(f"{layer.experts}.{e}.{proj}_proj.lora_{ab}.weight",
                       layer.pieces[(f"{proj}_{ab}", e)])
            for e in _experts(layer) for proj in ("gate", "up", "down") for ab in "AB"]


def _emit_nemo(layer: _Layer) -> list[TensorPlan]:
    experts = _experts(layer)

    def stacked(make) -> Stack:
        return Stack(tuple(make(e) for e in experts))

    p = layer.pieces
    return [
        TensorPlan(f"{layer.experts}.lora_gate_and_up_A", stacked(lambda e: Transpose(p[("gate_A", e)]))),
        TensorPlan(f"{layer.experts}.lora_gate_and_up_B", stacked(
            lambda e: Transpose(Concat((p[("gate_B", e)], p[("up_B", e)]), 0)))),
        TensorPlan(f"{layer.experts}.lora_down_A", stacked(lambda e: Transpose(p[("down_A", e)]))),
        TensorPlan(f"{layer.experts}.lora_down_B", stacked(lambda e: Transpose(p[("down_B", e)]))),
    ]


def _emit_peft(layer: _Layer, n: int, parameters: Sequence[str]) -> list[TensorPlan]:
    p = layer.pieces
    experts = range(n)
    fused = {
        "gate_up_proj": (Concat(tuple(p[("gate_A", e)] for e in experts), 0),
                         Concat(tuple(Concat((p[("gate_B", e)], p[("up_B", e)]), 0)
                                      for e in experts), 1, interleave=True)),
        "down_proj": (Concat(tuple(p[("down_A", e)] for e in experts), 0),
                      Concat(tuple(p[("down_B", e)] for e in experts), 1, interleave=True)),
    }
    out = []
    for depth, name in enumerate(parameters):
        nest = ".base_layer" * (len(parameters) - 1 - depth)
        a, b = fused[name]
        out += [TensorPlan(f"{layer.experts}{nest}.lora_A.weight", a),
                TensorPlan(f"{layer.experts}{nest}.lora_B.weight", b)]
    return out
