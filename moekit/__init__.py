"""moekit: convert, shard and upcycle Mixture-of-Experts checkpoints, bit-exact.

Everything flows one way: read headers -> build a plan -> execute the plan.
The public names below are imported on first use, so that ``moekit convert`` does not
pay for torch.distributed (DTensor) imports it does not need.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointInfo": "inspection", "inspect": "inspection",
    "ExpertAdapter": "adapter",
    "convert": "conversion", "convert_state_dict": "conversion", "load": "conversion",
    "MoekitError": "errors", "PlanError": "errors",
    "expert_range": "expert_parallel", "load_experts": "expert_parallel",
    "save_experts": "expert_parallel",
    "Report": "verification", "verify": "verification",
    "UpcycleSpec": "upcycling", "upcycle": "upcycling", "upcycle_state_dict": "upcycling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
