"""moekit: convert, shard and upcycle Mixture-of-Experts checkpoints, bit-exact.

Everything flows one way: read headers -> build a plan -> execute the plan.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .adapter import ExpertAdapter
from .convert import convert, convert_state_dict
from .errors import MoekitError, PlanError
from .expert_parallel import expert_range, load_experts, save_experts
from .inspect import CheckpointInfo, inspect
from .verify import Report, verify

__all__ = [
    "CheckpointInfo", "ExpertAdapter", "MoekitError", "PlanError", "Report", "convert",
    "convert_state_dict", "expert_range", "inspect", "load_experts", "save_experts", "verify",
]
