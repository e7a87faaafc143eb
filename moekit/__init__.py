"""moekit: convert, shard, upcycle and merge Mixture-of-Experts checkpoints, bit-exact.

Everything flows one way: read headers -> build a plan -> execute the plan.
The public names below are imported on first use, so that ``moekit convert`` does not
pay for torch.distributed (DTensor) imports it does not need.
"""

from __future__ import annotations

from .lazy_exports import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointInfo": "inspection", "inspect": "inspection",
    "ExpertAdapter": "adapter",
    "convert": "conversion", "convert_state_dict": "conversion", "load": "conversion",
    "prepare_loads": "conversion",
    "MoekitError": "errors", "PlanError": "errors",
    "expert_range": "expert_parallel", "load_experts": "expert_parallel",
    "load_sharded": "expert_parallel", "save_sharded": "expert_parallel",
    "save_experts": "expert_parallel",
    "Report": "verification", "verify": "verification",
    "UpcycleSpec": "upcycling", "upcycle": "upcycling", "upcycle_state_dict": "upcycling",
    "MergeConfig": "merging", "merge": "merging",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
