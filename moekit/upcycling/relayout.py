"""An upcycling plan written in another layout: the conversion plan from the upcycled model's
HF naming to that layout, with each of its reads replaced by the upcycling recipe that
makes the tensor read.

The conversion is planned by ``moekit.planner.build_plan`` from the upcycling plan's
tensors (names, shapes, dtypes: all a plan needs of its source), so the layout's names,
checks and extra tensors (torchtitan's ``expert_bias_E``) are those ``convert`` writes;
the composed plan still reads only the dense checkpoint, and goes through the same job
pipeline and sinks.
"""

from __future__ import annotations

from dataclasses import replace

from ..layouts.base import Layout
from ..plan import Plan, composed_plan
from ..planner import analyse, build_plan


def in_layout(plan: Plan, config: dict, layout: Layout, label: str) -> Plan:
    """``plan`` (an upcycling plan in HF naming, whose model's config.json is ``config``)
    written in ``layout`` instead; ``plan`` itself where that is its layout already."""
    if layout.name == plan.dst_layout:
        return plan
    made = {t.name: t.recipe for t in plan.tensors}
    analysis = analyse({t.name: t for t in plan.tensors}, config, {}, label,
                       from_=plan.dst_layout, family=plan.family)
    converted = build_plan(analysis, layout)
    return replace(composed_plan(converted, made), src_layout=plan.src_layout)
