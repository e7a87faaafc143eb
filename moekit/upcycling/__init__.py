"""Upcycling: dense checkpoints into MoE checkpoints that start where the dense model was.

Names are imported on first use: the command line reads the choices of ``spec`` and
``targets`` without importing torch."""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_EXPORTS = {
    "TARGETS": "targets", "UpcyclePlan": "planner", "UpcycleSpec": "spec",
    "build_upcycle_plan": "planner", "plan_upcycle": "run", "upcycle": "run",
    "upcycle_state_dict": "run",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
