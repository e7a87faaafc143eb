"""Expert parallelism: each rank loads and saves only its own experts, as DTensors."""

from .load import load_experts
from .ranges import expert_range
from .save import save_experts

__all__ = ["expert_range", "load_experts", "save_experts"]
