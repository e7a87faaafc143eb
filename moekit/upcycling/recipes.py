"""Recipes of an upcycled MoE block, from the reads of one dense MLP.

Pure functions from a dense MLP's source regions to plan expressions; the Hugging Face
planner and the Megatron-Core adapter both name their tensors and call these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import MoekitError
from ..plan import Concat, Constant, Expr, Random, Read, Redraw, Scale
from .spec import UpcycleSpec, derive_seed

NEURON_DIM = {"gate": 0, "up": 0, "down": 1}
"""The dimension of each projection that runs over the intermediate neurons."""


@dataclass(frozen=True)
class DenseMLP:
    """The source regions of one dense MLP: gate and up [I, H], down [H, I]. A non-gated
    MLP (``act(fc1 x)``, e.g. ReLU² or GeLU) has no up projection; its fc1 is ``gate``."""

    gate: Read
    up: Read | None
    down: Read

    @property
    def projections(self) -> tuple[str, ...]:
        return ("gate", "down") if self.up is None else ("gate", "up", "down")

    @property
    def intermediate(self) -> int:
        return self.gate.shape[0]

    @property
    def hidden(self) -> int:
        return self.gate.shape[1]

    @property
    def dtype(self) -> str:
        return self.gate.dtype

    def projection(self, name: str) -> Read:
        found = {"gate": self.gate, "up": self.up, "down": self.down}[name]
        assert found is not None, name
        return found


def narrow(read: Read, dim: int, start: int, length: int) -> Read:
    """``read`` restricted to ``[start, start + length)`` along ``dim`` (contiguous
    slices only, as every region moekit builds for upcycling is)."""
    region = list(read.region) + [slice(None)] * (dim + 1 - len(read.region))
    current = region[dim]
    assert isinstance(current, slice) and current.step in (None, 1), read
    base = current.start or 0
    region[dim] = slice(base + start, base + start + length)
    shape = list(read.shape)
    shape[dim] = length
    return Read(read.key, tuple(region), tuple(shape), read.dtype)


def neuron_slice(read: Read, dim: int, spec: UpcycleSpec, expert: int) -> Read:
    """The neurons of ``read`` along ``dim`` that expert ``expert`` holds: slice
    ``expert % G`` of G, or all of them when G is 1."""
    if spec.granularity == 1:
        return read
    size = read.shape[dim] // spec.granularity
    return narrow(read, dim, (expert % spec.granularity) * size, size)


def expert_projections(mlp: DenseMLP, spec: UpcycleSpec, layer: int | str, expert: int,
                       scales: dict[str, float] | None = None) -> dict[str, Expr]:
    """Gate, up and down of one routed expert (global index ``expert``), each multiplied
    by ``scales`` (default: the spec's for a gated MLP)."""
    scales = scales or spec.projection_scales()
    out: dict[str, Expr] = {}
    for name in mlp.projections:
        dense = mlp.projection(name)
        part: Expr = neuron_slice(dense, NEURON_DIM[name], spec, expert)
        if spec.method == "drop":
            part = Redraw(part, NEURON_DIM[name], float(spec.drop_ratio),
                          select_seed=derive_seed(spec.seed, layer, expert, "neurons"),
                          noise_seed=derive_seed(spec.seed, layer, expert, name), stats=dense)
        out[name] = scaled(part, scales[name])
    return out


def scaled(part: Expr, factor: float) -> Expr:
    """``part`` times ``factor``, or ``part`` itself for a factor of one."""
    return part if factor == 1.0 else Scale(part, factor)


def router(spec: UpcycleSpec, layer: int, hidden: int, dtype: str, std: float | None) -> Expr:
    """The [N, H] router weight: zero, random rows, or random rows shared by the G
    experts of each virtual group (so that they always get equal logits). ``std`` is
    the rows' std, None for a zero router."""
    init = spec.router_init
    if init == "zero":
        return Constant((spec.experts, hidden), dtype)
    if init == "random":
        return Random((spec.experts, hidden), dtype, std, derive_seed(spec.seed, layer, "router"))
    rows = [Random((1, hidden), dtype, std, derive_seed(spec.seed, layer, "router", group))
            for group in range(spec.groups)]
    return Concat(tuple(row for row in rows for _ in range(spec.granularity)), dim=0)


def shared_expert(mlp: DenseMLP, gated: bool) -> dict[str, Expr]:
    """The shared expert's gate, up and down: the dense MLP, halved when ungated (a gated
    one is halved by ``sigmoid(0)``); the routed experts carry the other half."""
    return {"gate": mlp.gate, "up": mlp.up, "down": scaled(mlp.down, 1.0 if gated else 0.5)}


def shared_expert_gate(mlp: DenseMLP) -> Expr:
    """A zero [1, H] shared-expert gate: ``sigmoid(0) = 1/2`` for every token."""
    return Constant((1, mlp.hidden), mlp.dtype)


def check_drop_ratio(ratio: float, mlps: Mapping[int, DenseMLP], name: str) -> None:
    """Refuse a drop ratio that re-initialises no neuron: Drop-Upcycling redraws
    ``round(ratio * I)`` of an MLP's I intermediate neurons (``redrawn_indices`` of
    ``moekit.executors.evaluate``), so below half a neuron the expert would be a plain copy
    of the dense MLP, not the Drop-Upcycling asked for. ``name`` is the setting, in the
    message."""
    smallest = min(mlp.intermediate for mlp in mlps.values())
    if round(ratio * smallest) == 0:
        raise MoekitError(f"{name} {ratio:g} re-initialises no neuron of an MLP of "
                          f"{smallest} intermediate neurons (it redraws round({ratio:g} x "
                          f"{smallest}) = 0); 1/{smallest} = {1 / smallest:.3g} redraws one")
