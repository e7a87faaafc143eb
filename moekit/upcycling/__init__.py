"""Upcycling: dense checkpoints into MoE checkpoints that start where the dense model was."""

from .planner import UpcyclePlan, build_upcycle_plan
from .run import plan_upcycle, upcycle, upcycle_state_dict
from .spec import UpcycleSpec
from .targets import TARGETS

__all__ = ["TARGETS", "UpcyclePlan", "UpcycleSpec", "build_upcycle_plan", "plan_upcycle",
           "upcycle", "upcycle_state_dict"]
