"""Merging: several dense fine-tunes of one base model into one MoE checkpoint, from
mergekit-moe's YAML. Built on upcycling: the same planner, executors and atomic output,
with each expert's tensors read from its own source checkpoint.

Names are imported on first use: the command line reads this package without torch."""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_EXPORTS = {
    "ExpertSource": "config", "MergeConfig": "config", "GATE_MODES": "config",
    "load_merge_config": "config", "MergePlan": "planner", "merge": "run",
    "plan_merge": "run",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
