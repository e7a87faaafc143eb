"""Expert LoRA adapters: PEFT's grouped form <-> per-expert keys <-> NeMo's grouped names.

With transformers v5 the experts of a layer are one parameter each (``gate_up_proj``
[E, 2I, H], ``down_proj`` [E, H, I]; gate and up concatenated, except in the families whose
table entry interleaves them, GPT-OSS: gate at even positions, up at odd, ``[E, H, 2I]``),
and PEFT adapts them with ``target_parameters``. Its adapter stores, per
parameter, ``lora_A`` [E*r, x] (expert-major rows: expert e owns rows ``e*r ... e*r + r``)
and ``lora_B`` [y, E*r] (rank-major columns: expert e owns columns ``e::E``), under
``…experts.lora_A.weight``, the first targeted parameter nested one ``.base_layer`` deeper.
Whether x is the expert's input or its output depends on the PEFT release and the model
(``PeftLayout``, ``peft_layout``). The per-expert form (what NeMo's
``_convert_lora_expert_to_hf`` writes) is ``…experts.{e}.{gate,up,down}_proj.lora_{A,B}.weight``
with A [r, in] and B [out, r]; gate and up share the fused A. NeMo's grouped form is
``lora_gate_and_up_A`` [E, H, r], ``lora_gate_and_up_B`` [E, r, 2I], ``lora_down_A``
[E, I, r] and ``lora_down_B`` [E, r, H] (its experts compute ``x @ W``), gate and up of
``lora_gate_and_up_B`` joined as the family's NeMo layout joins them (NeMo AutoModel 0.7's
``GroupedExpertsLoRA`` adds ``x @ A @ B`` to the fused gate_and_up output before its
activation splits it). Which way a fused
gate_up LoRA joins gate and up cannot be read from the adapter, so every conversion takes
the base model's ``model_type`` (its config.json's) and reads it from the family table.
Every conversion is a plan of exact data movements, so round trips are byte-identical.
"""

from __future__ import annotations

import enum
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .conversion import state_dict_meta
from .dtypes import to_safetensors
from .errors import MoekitError, printable
from .executors.memory import run_plan
from .layouts.base import is_canonical
from .layouts.families import MAX_EXPERTS, family_of_model_type
from .plan import Concat, Expr, Plan, Read, Stack, TensorPlan, Transpose
from .sources import DictSource

_PEFT = re.compile(r"^(?P<experts>.*\.experts)(?P<nest>(?:\.base_layer)*)\.lora_(?P<ab>[AB])\.weight\Z")
_PER_EXPERT = re.compile(
    r"^(?P<experts>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.lora_(?P<ab>[AB])\.weight\Z")
_NEMO = re.compile(r"^(?P<experts>.*\.experts)\.lora_(?P<group>gate_and_up|down)_(?P<ab>[AB])\Z")
PARAMETERS = ("gate_up_proj", "down_proj")
"""The order PEFT wrapped the experts' parameters in (the first is nested deeper).
adapter_config.json's ``target_parameters`` does not keep it (PEFT 0.19.1 and later sort
the list), so the order is read from the adapter's keys (``parameter_order``)."""

# Which side of a 3-D parameter [E, d1, d2] PEFT's fused lora_A spans (``ParamWrapper``
# in peft/tuners/lora/layer.py: lora_A [E*r, x], lora_B [y, E*r], {x, y} = {d1, d2}):
#   peft 0.17.0 - 0.18.1   x = d1, always.
#   peft 0.19.0            x = d2 where the experts module sets ``is_transposed`` (GPT-OSS),
#                          otherwise d1.
#   peft 0.19.1 - 0.21.2   x = d1 where the experts module sets ``is_transposed``, otherwise d2.
# transformers v5 stores most families' experts [E, out, in] without ``is_transposed``
# (Qwen3-MoE, Mixtral, DeepSeek-V3, OLMoE, ...): their adapters are A_OUT up to 0.19.0 and
# A_IN from 0.19.1. Llama 4 stores [E, in, out] without setting ``is_transposed``: A_IN up to
# 0.19.0, A_OUT from 0.19.1. PEFT records its release in adapter_config.json
# (``peft_version``, from 0.18.0 on) but not the model's storage, so the release does not
# name the layout; the shapes do: with both gate_up_proj and down_proj adapted, exactly one
# of the two layouts fits them, even where a parameter is square (``_fit``). PEFT itself
# converts neither way: an adapter saved on one side of 0.19.1 fails to load on the other
# with a size mismatch (down_proj), while its square gate_up_proj alone would load transposed.


class PeftLayout(enum.Enum):
    """How PEFT laid out one adapter's fused expert LoRA (the release table above)."""

    A_IN = "lora_A [E*r, in], lora_B [out, E*r]"
    """lora_A reads the expert's input (peft >= 0.19.1 on [E, out, in] experts)."""
    A_OUT = "lora_A [E*r, out], lora_B [in, E*r]"
    """lora_A spans the expert's output (peft <= 0.19.0 on [E, out, in] experts)."""


@dataclass(frozen=True)
class _Layer:
    """One layer's expert LoRA in canonical per-expert pieces: (name, e) -> [out, r] or
    [r, in] recipe, for names gate_A, gate_B, up_A, up_B, down_A, down_B."""

    experts: str
    pieces: dict[tuple[str, int], Expr]


@dataclass(frozen=True)
class _PeftPair:
    """The lora_A and lora_B keys PEFT saved for one expert parameter, and how deeply they
    are nested (``.base_layer`` repeated)."""

    nest: str
    a: str
    b: str


@dataclass(frozen=True)
class _PeftLayer:
    """One layer's PEFT expert LoRA: its layout and its two parameters' keys."""

    layout: PeftLayout
    gate_up: _PeftPair
    down: _PeftPair


def peft_to_hf(adapter: Mapping[str, torch.Tensor], n_experts: int,
               rank: int | None = None, *, model_type: str) -> dict[str, torch.Tensor]:
    """PEFT's grouped expert LoRA, either layout -> per-expert keys (other adapter tensors
    unchanged). ``rank`` (adapter_config.json's ``r``), when given, checks ``n_experts``:
    lora_A's rows are n_experts x rank, and an n_experts that divides them but is wrong
    (3 for 6 experts of rank 2, say) would otherwise split the experts' rows wrongly.
    ``model_type`` (the base model's) says how gate_up_proj joins gate and up."""
    _check_adapter(adapter, n_experts)
    return _run(adapter, _from_peft(adapter, n_experts, _checked_rank(rank),
                                    _interleaved(model_type, "transformers")), _emit_hf)


def peft_to_nemo(adapter: Mapping[str, torch.Tensor], n_experts: int,
                 rank: int | None = None, *, model_type: str) -> dict[str, torch.Tensor]:
    """PEFT's grouped expert LoRA, either layout -> NeMo's ``lora_gate_and_up_A/B``,
    ``lora_down_A/B`` (``rank`` and ``model_type`` as for ``peft_to_hf``)."""
    _check_adapter(adapter, n_experts)
    layers = _from_peft(adapter, n_experts, _checked_rank(rank),
                        _interleaved(model_type, "transformers"))
    nemo = _interleaved(model_type, "nemo")
    return _run(adapter, layers, lambda layer: _emit_nemo(layer, nemo))


def hf_to_peft(adapter: Mapping[str, torch.Tensor], n_experts: int,
               parameters: Sequence[str] = PARAMETERS,
               layout: PeftLayout = PeftLayout.A_IN, *, model_type: str
               ) -> dict[str, torch.Tensor]:
    """Per-expert LoRA keys -> PEFT's grouped form (``parameters``: the adapter's wrapping
    order; ``layout``: what the PEFT release that loads it expects, see ``PeftLayout``;
    ``model_type``: the base model's, which says how gate_up_proj joins gate and up)."""
    _check_adapter(adapter, n_experts)
    _check_peft_form(parameters, layout)
    interleaved = _interleaved(model_type, "transformers")
    return _run(adapter, _from_hf(adapter, n_experts),
                lambda layer: _emit_peft(layer, n_experts, parameters, layout, interleaved))


def nemo_to_peft(adapter: Mapping[str, torch.Tensor], n_experts: int,
                 parameters: Sequence[str] = PARAMETERS,
                 layout: PeftLayout = PeftLayout.A_IN, *, model_type: str
                 ) -> dict[str, torch.Tensor]:
    """NeMo's grouped LoRA names -> PEFT's grouped form (arguments as ``hf_to_peft``)."""
    _check_adapter(adapter, n_experts)
    _check_peft_form(parameters, layout)
    interleaved = _interleaved(model_type, "transformers")
    layers = _from_nemo(adapter, n_experts, _interleaved(model_type, "nemo"))
    return _run(adapter, layers,
                lambda layer: _emit_peft(layer, n_experts, parameters, layout, interleaved))


def _check_adapter(adapter: object, n: object) -> None:
    """Refuse an adapter that is not a mapping of names to tensors of data, and an
    ``n_experts`` that is not an integer from 1 to ``MAX_EXPERTS`` (the per-expert
    pieces are listed by expert)."""
    state_dict_meta(adapter, "adapter")
    if type(n) is not int or not 1 <= n <= MAX_EXPERTS:
        raise MoekitError(f"n_experts must be an integer from 1 to {MAX_EXPERTS}, not {n!r}")


def _interleaved(model_type: object, layout: str) -> bool:
    """Whether the family of ``model_type`` interleaves gate and up in ``layout``'s fused
    gate_up tensor (GPT-OSS) rather than concatenating them; a model_type that names no
    family is refused, since the adapter alone does not tell."""
    family = family_of_model_type(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise MoekitError(f"model_type must be the base model's config.json model_type, of a "
                          f"family moekit knows (it says whether gate_up_proj interleaves gate "
                          f"and up), not {printable(repr(model_type))}")
    return family.interleaved.get(layout, False)


def _gate_and_up(size: int, interleaved: bool) -> tuple[slice, slice]:
    """Where gate and up lie along a fused gate_up dimension of ``2 * size``: at even and
    odd positions when ``interleaved``, else gate then up."""
    if interleaved:
        return slice(0, None, 2), slice(1, None, 2)
    return slice(0, size), slice(size, 2 * size)


def _checked_rank(rank: object) -> int | None:
    if rank is not None and (type(rank) is not int or rank < 1):
        raise MoekitError(f"rank must be the LoRA rank (adapter_config.json's r, an integer of "
                          f"at least 1) or None, not {rank!r}")
    return rank


def _check_peft_form(parameters: object, layout: object) -> None:
    """``parameters`` must order both fused expert parameters; ``layout`` be a PeftLayout."""
    if (isinstance(parameters, str) or not isinstance(parameters, Sequence)
            or sorted(parameters) != sorted(PARAMETERS)):
        raise MoekitError(f"parameters must order {' and '.join(PARAMETERS)} (as "
                          f"parameter_order gives them), not {parameters!r}")
    if not isinstance(layout, PeftLayout):
        raise MoekitError(f"layout must be a PeftLayout ({', '.join(PeftLayout.__members__)}, "
                          f"as peft_layout gives it), not {layout!r}")


def parameter_order(adapter: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """The order in which PEFT wrapped gate_up_proj and down_proj in this adapter (the
    more deeply nested first), for converting back to it."""
    layers = _peft_layers(adapter)
    if not layers:
        return PARAMETERS
    first = next(iter(layers.values()))
    pairs = {"gate_up_proj": first.gate_up, "down_proj": first.down}
    return tuple(sorted(pairs, key=lambda name: -len(pairs[name].nest)))


def peft_layout(adapter: Mapping[str, torch.Tensor]) -> PeftLayout:
    """The layout of this PEFT adapter's fused expert LoRA, read from its shapes (for
    converting back to it). Raises ``MoekitError`` if the adapter has no expert LoRA or
    its layers disagree."""
    layers = _peft_layers(adapter)
    layouts = {layer.layout for layer in layers.values()}
    if len(layouts) != 1:
        found = ", ".join(f"{experts}: {layer.layout.name}" for experts, layer in layers.items())
        raise MoekitError("expected one PEFT expert LoRA layout in the adapter, found "
                          f"{found or 'no fused expert LoRA (…experts.lora_A.weight)'}")
    return layouts.pop()


def _peft_layers(adapter: Mapping[str, torch.Tensor]) -> dict[str, _PeftLayer]:
    """Every layer's PEFT expert LoRA, by experts prefix, in key order."""
    state_dict_meta(adapter, "adapter")
    found: dict[str, dict[str, dict[str, str]]] = {}
    for key in adapter:
        match = _PEFT.match(key)
        if match:
            found.setdefault(match["experts"], {}).setdefault(match["nest"], {})[match["ab"]] = key
    return {experts: _peft_layer(adapter, experts, by_nest) for experts, by_nest in found.items()}


def _peft_layer(adapter: Mapping[str, torch.Tensor], experts: str,
                by_nest: dict[str, dict[str, str]]) -> _PeftLayer:
    """Which nesting holds gate_up_proj and which down_proj, and in which layout: the one
    assignment whose shapes fit (``_fit``)."""
    if len(by_nest) != 2 or any(set(ab) != {"A", "B"} for ab in by_nest.values()):
        raise MoekitError(f"{experts}: expected LoRA A and B for gate_up_proj and down_proj, "
                          f"found {sorted(k for ab in by_nest.values() for k in ab.values())}")
    first, second = (_PeftPair(nest, ab["A"], ab["B"]) for nest, ab in by_nest.items())
    fits = [_PeftLayer(layout, gate_up, down)
            for gate_up, down in ((first, second), (second, first))
            if (layout := _fit(adapter, gate_up, down)) is not None]
    if len(fits) != 1:
        shapes = ", ".join(f"{key.removeprefix(experts + '.')} {list(adapter[key].shape)}"
                           for pair in (first, second) for key in (pair.a, pair.b))
        raise MoekitError(
            f"{experts}: LoRA shapes {shapes} fit neither PEFT layout of fused experts "
            f"gate_up_proj [E, 2I, H] and down_proj [E, H, I] ({PeftLayout.A_IN.value}; or "
            f"{PeftLayout.A_OUT.value}); is this an adapter of a model with such experts?")
    return fits[0]


def _fit(adapter: Mapping[str, torch.Tensor], gate_up: _PeftPair, down: _PeftPair
         ) -> PeftLayout | None:
    """The layout in which ``gate_up`` and ``down`` are gate_up_proj and down_proj, if any.

    With x the columns of lora_A and y the rows of lora_B: A_IN has gate_up (H, 2I) and
    down (I, H); A_OUT has gate_up (2I, H) and down (H, I). Of the two assignments of two
    saved pairs and the two layouts, only one can fit, since 2I != I.
    """
    if any(adapter[key].dim() != 2 for key in (gate_up.a, gate_up.b, down.a, down.b)):
        return None
    gu_x, gu_y = adapter[gate_up.a].shape[1], adapter[gate_up.b].shape[0]
    down_x, down_y = adapter[down.a].shape[1], adapter[down.b].shape[0]
    if gu_y == 2 * down_x and gu_x == down_y:
        return PeftLayout.A_IN
    if gu_x == 2 * down_y and gu_y == down_x:
        return PeftLayout.A_OUT
    return None


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


@dataclass(frozen=True)
class _PeftFactors:
    """One saved parameter's fused LoRA, read per expert as the factors of the expert's
    linear map, whatever the layout: ``a(e)`` [r, in] and ``b(e, out)`` [out rows, r]."""

    adapter: Mapping[str, torch.Tensor]
    pair: _PeftPair
    layout: PeftLayout
    n: int
    rank: int

    def a(self, e: int) -> Expr:
        if self.layout is PeftLayout.A_IN:
            return _read(self.adapter, self.pair.a, (self._rows(e),))
        return Transpose(_read(self.adapter, self.pair.b, (slice(None), self._columns(e))))

    def b(self, e: int, out: slice = slice(None)) -> Expr:
        if self.layout is PeftLayout.A_IN:
            return _read(self.adapter, self.pair.b, (out, self._columns(e)))
        return Transpose(_read(self.adapter, self.pair.a, (self._rows(e), out)))

    def _rows(self, e: int) -> slice:
        return slice(e * self.rank, (e + 1) * self.rank)

    def _columns(self, e: int) -> slice:
        return slice(e, None, self.n)


def _factors(adapter: Mapping[str, torch.Tensor], pair: _PeftPair, layout: PeftLayout,
             n: int, rank: int | None) -> _PeftFactors:
    """``pair``'s factors; lora_A must have E*r rows and lora_B E*r columns."""
    rows, columns = adapter[pair.a].shape[0], adapter[pair.b].shape[1]
    if rows != columns or rows % n:
        raise MoekitError(f"{pair.a} has {rows} rows and {pair.b} {columns} columns; expected "
                          f"both to be n_experts ({n}) times the LoRA rank: is n_experts right?")
    if rank is not None and rows != n * rank:
        raise MoekitError(f"{pair.a} has {rows} rows; expected n_experts x rank = {n} x {rank} "
                          f"= {n * rank}: is n_experts, or the rank, right?")
    return _PeftFactors(adapter, pair, layout, n, rows // n)


def _from_peft(adapter: Mapping[str, torch.Tensor], n: int, rank: int | None,
               interleaved: bool) -> dict[str, tuple[_Layer, set[str]]]:
    layers = {}
    for experts, found in _peft_layers(adapter).items():
        gate_up = _factors(adapter, found.gate_up, found.layout, n, rank)
        down = _factors(adapter, found.down, found.layout, n, rank)
        gate, up = _gate_and_up(down.a(0).shape[1], interleaved)
        pieces: dict[tuple[str, int], Expr] = {}
        for e in range(n):
            pieces[("gate_A", e)] = pieces[("up_A", e)] = gate_up.a(e)
            pieces[("gate_B", e)] = gate_up.b(e, gate)
            pieces[("up_B", e)] = gate_up.b(e, up)
            pieces[("down_A", e)] = down.a(e)
            pieces[("down_B", e)] = down.b(e)
        keys = {found.gate_up.a, found.gate_up.b, found.down.a, found.down.b}
        layers[experts] = (_checked_layer(_Layer(experts, pieces), n), keys)
    return layers


def _from_hf(adapter: Mapping[str, torch.Tensor], n: int) -> dict[str, tuple[_Layer, set[str]]]:
    layers: dict[str, tuple[_Layer, set[str]]] = {}
    for key in adapter:
        match = _PER_EXPERT.match(key)
        if match:
            if not is_canonical(match["e"]) or int(match["e"]) >= n:
                raise MoekitError(f"{printable(key)}: the expert number is not one of 0-{n - 1} "
                                  "written canonically (ASCII digits, no leading zero)")
            layer, keys = layers.setdefault(match["experts"], (_Layer(match["experts"], {}), set()))
            layer.pieces[(f"{match['proj']}_{match['ab']}", int(match["e"]))] = _read(adapter, key)
            keys.add(key)
    for experts, (layer, _) in layers.items():
        _checked_layer(layer, n)
        unequal = [e for e in range(n) if not torch.equal(adapter[layer.pieces[("gate_A", e)].key],
                                                          adapter[layer.pieces[("up_A", e)].key])]
        if unequal:
            raise MoekitError(f"{experts}: experts {unequal} have different gate and up lora_A; "
                              "the fused gate_up_proj LoRA shares one A per expert")
    return layers


NEMO_TENSORS = ("gate_and_up_A", "gate_and_up_B", "down_A", "down_B")
"""NeMo's grouped LoRA tensors of one layer (``…experts.lora_{name}``)."""


def _from_nemo(adapter: Mapping[str, torch.Tensor], n: int, interleaved: bool
               ) -> dict[str, tuple[_Layer, set[str]]]:
    found: dict[str, dict[str, str]] = {}
    for key in adapter:
        match = _NEMO.match(key)
        if match:
            found.setdefault(match["experts"], {})[f"{match['group']}_{match['ab']}"] = key
    layers = {}
    for experts, keys in found.items():
        _check_nemo_layer(adapter, experts, keys, n)
        gate_up_b = keys["gate_and_up_B"]
        gate, up = _gate_and_up(adapter[gate_up_b].shape[2] // 2, interleaved)
        pieces: dict[tuple[str, int], Expr] = {}
        for e in range(n):
            pieces[("gate_A", e)] = pieces[("up_A", e)] = Transpose(
                _read(adapter, keys["gate_and_up_A"], (e,)))
            pieces[("gate_B", e)] = Transpose(_read(adapter, gate_up_b, (e, slice(None), gate)))
            pieces[("up_B", e)] = Transpose(_read(adapter, gate_up_b, (e, slice(None), up)))
            pieces[("down_A", e)] = Transpose(_read(adapter, keys["down_A"], (e,)))
            pieces[("down_B", e)] = Transpose(_read(adapter, keys["down_B"], (e,)))
        layers[experts] = (_checked_layer(_Layer(experts, pieces), n), set(keys.values()))
    return layers


def _check_nemo_layer(adapter: Mapping[str, torch.Tensor], experts: str,
                      keys: dict[str, str], n: int) -> None:
    """A layer's four NeMo LoRA tensors present, each [n_experts, ., .], and the gate and
    up halves of ``lora_gate_and_up_B`` equal in size."""
    missing = [f"{experts}.lora_{name}" for name in NEMO_TENSORS if name not in keys]
    if missing:
        raise MoekitError(f"{experts}: NeMo expert LoRA lacks {', '.join(missing)}")
    shapes = {name: tuple(adapter[keys[name]].shape) for name in NEMO_TENSORS}
    odd = {name: list(shape) for name, shape in shapes.items()
           if len(shape) != 3 or shape[0] != n}
    if odd:
        listed = ", ".join(f"lora_{name} {shape}" for name, shape in odd.items())
        raise MoekitError(f"{experts}: {listed}; expected [n_experts ({n}), ., .] each")
    if shapes["gate_and_up_B"][2] % 2:
        raise MoekitError(f"{experts}.lora_gate_and_up_B is {list(shapes['gate_and_up_B'])}; "
                          "its last dimension holds gate then up, of equal size")


_PIECES = ("gate_A", "up_A", "gate_B", "up_B", "down_A", "down_B")
_SIZES = {"gate_A": ("r_gate_up", "H"), "up_A": ("r_gate_up", "H"),
          "gate_B": ("I", "r_gate_up"), "up_B": ("I", "r_gate_up"),
          "down_A": ("r_down", "I"), "down_B": ("H", "r_down")}
"""Each canonical piece's [rows, columns] by name: A [r, in] and B [out, r], gate and up
[I, H], down [H, I], gate and up sharing a rank (their A is fused)."""


def _checked_layer(layer: _Layer, n: int) -> _Layer:
    """``layer`` once every piece is present for experts 0 to n - 1 (its readers take no
    other experts) and the pieces fit together (``_shape_problems``)."""
    missing = [f"{name}[{e}]" for e in range(n) for name in _PIECES
               if (name, e) not in layer.pieces]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        problems = [f"LoRA pieces missing: {', '.join(missing[:8])}{more}"]
    else:
        problems = _shape_problems(layer, n)
    if problems:
        raise MoekitError(f"{layer.experts}: " + "; ".join(problems))
    return layer


def _shape_problems(layer: _Layer, n: int) -> list[str]:
    """What keeps a layer's pieces from being stacked and joined: a piece whose shape or
    dtype differs across experts, a piece that is not 2-D, sizes that disagree
    (``_SIZES``), gate and up lora_B of two dtypes (they are concatenated)."""
    kinds = {name: {(tuple(layer.pieces[(name, e)].shape), layer.pieces[(name, e)].dtype)
                    for e in range(n)} for name in _PIECES}
    varying = [f"{name} differs across experts "
               f"({', '.join(f'{list(shape)} {dtype}' for shape, dtype in sorted(found))})"
               for name, found in kinds.items() if len(found) > 1]
    if varying:
        return varying
    shapes = {name: next(iter(found))[0] for name, found in kinds.items()}
    flat = [f"{name} {list(shape)}" for name, shape in shapes.items() if len(shape) != 2]
    if flat:
        return [f"pieces that are not 2-D: {', '.join(flat)}"]
    sizes: dict[str, set[int]] = defaultdict(set)
    for name, shape in shapes.items():
        for size_name, size in zip(_SIZES[name], shape):
            sizes[size_name].add(size)
    problems = [f"{size_name} is not one size: " + ", ".join(
                    f"{name} {list(shapes[name])}" for name in _PIECES if size_name in _SIZES[name])
                for size_name, found in sizes.items() if len(found) > 1]
    dtypes = sorted({next(iter(kinds[name]))[1] for name in ("gate_B", "up_B")})
    if len(dtypes) > 1:
        problems.append(f"gate and up lora_B differ in dtype ({', '.join(dtypes)})")
    return problems


def _experts(layer: _Layer) -> range:
    return range(1 + max(e for _, e in layer.pieces))


def _emit_hf(layer: _Layer) -> list[TensorPlan]:
    return [TensorPlan(f"{layer.experts}.{e}.{proj}_proj.lora_{ab}.weight",
                       layer.pieces[(f"{proj}_{ab}", e)])
            for e in _experts(layer) for proj in ("gate", "up", "down") for ab in "AB"]


def _joined(gate: Expr, up: Expr, interleaved: bool) -> Concat:
    """A fused gate_up LoRA B [2I, r] from gate's and up's [I, r] (see ``_gate_and_up``)."""
    return Concat((gate, up), 0, interleave=interleaved)


def _emit_nemo(layer: _Layer, interleaved: bool) -> list[TensorPlan]:
    experts = _experts(layer)

    def stacked(make) -> Stack:
        return Stack(tuple(make(e) for e in experts))

    p = layer.pieces
    return [
        TensorPlan(f"{layer.experts}.lora_gate_and_up_A", stacked(lambda e: Transpose(p[("gate_A", e)]))),
        TensorPlan(f"{layer.experts}.lora_gate_and_up_B", stacked(
            lambda e: Transpose(_joined(p[("gate_B", e)], p[("up_B", e)], interleaved)))),
        TensorPlan(f"{layer.experts}.lora_down_A", stacked(lambda e: Transpose(p[("down_A", e)]))),
        TensorPlan(f"{layer.experts}.lora_down_B", stacked(lambda e: Transpose(p[("down_B", e)]))),
    ]


def _emit_peft(layer: _Layer, n: int, parameters: Sequence[str], layout: PeftLayout,
               interleaved: bool) -> list[TensorPlan]:
    p = layer.pieces
    experts = range(n)
    factors = {
        "gate_up_proj": [(p[("gate_A", e)], _joined(p[("gate_B", e)], p[("up_B", e)],
                                                    interleaved))
                         for e in experts],
        "down_proj": [(p[("down_A", e)], p[("down_B", e)]) for e in experts],
    }
    out = []
    for depth, name in enumerate(parameters):
        nest = ".base_layer" * (len(parameters) - 1 - depth)
        a, b = _fuse(factors[name], layout)
        out += [TensorPlan(f"{layer.experts}{nest}.lora_A.weight", a),
                TensorPlan(f"{layer.experts}{nest}.lora_B.weight", b)]
    return out


def _fuse(factors: list[tuple[Expr, Expr]], layout: PeftLayout) -> tuple[Expr, Expr]:
    """PEFT's lora_A and lora_B of one parameter from each expert's (A [r, in], B [out, r]):
    A_IN stacks the A rows expert-major and interleaves the B columns; A_OUT does the same
    with B transposed as lora_A and A transposed as lora_B."""
    if layout is PeftLayout.A_OUT:
        factors = [(Transpose(b), Transpose(a)) for a, b in factors]
    return (Concat(tuple(a for a, _ in factors), 0),
            Concat(tuple(b for _, b in factors), 1, interleave=True))
