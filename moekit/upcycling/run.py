"""Running upcycling plans: dense checkpoint folder -> MoE folder, and state dict -> state dict."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..conversion import run_checkpoint_job, state_dict_meta
from ..errors import MoekitError
from ..executors.memory import run_plan
from ..layouts import layout_named
from ..plan import composed_plan
from ..sources import DictSource
from .planner import UpcyclePlan, build_upcycle_plan
from .relayout import in_layout
from .spec import UpcycleSpec


def plan_upcycle(dense_path: str | Path, spec: UpcycleSpec, to: str = "hf"
                 ) -> tuple[Checkpoint, UpcyclePlan]:
    """Read a dense checkpoint's headers and plan its upcycling into layout ``to``
    (nothing is read or written)."""
    checkpoint = Checkpoint.open(dense_path)
    label = str(checkpoint.path)
    plan = build_upcycle_plan(checkpoint.made or checkpoint.tensors, checkpoint.config, spec,
                              label, where=checkpoint.file_of)
    if checkpoint.made:
        plan = replace(plan, plan=composed_plan(plan.plan, checkpoint.made))
    try:
        relaid = in_layout(plan.plan, plan.config, layout_named(to), label)
    except MoekitError as err:
        raise MoekitError(f"--to {to} cannot hold the upcycled {_upcycled_model(spec, plan)}: "
                          f"{err}") from None
    return checkpoint, replace(plan, plan=relaid)


def _upcycled_model(asked: UpcycleSpec, plan: UpcyclePlan) -> str:
    """The upcycled model's family and shared expert, naming the options that chose them
    (``asked``: the spec as given, before ``--target auto`` is resolved), for a message
    refusing the model in a layout."""
    family = plan.target.family
    model = f"{family} (--target {asked.target})"
    if not plan.spec.shared_expert:
        return model
    why = "--shared-expert" if asked.shared_expert else f"every {family} block has one"
    return f"{model} with a shared expert ({why})"


def upcycle(dense_path: str | Path, dst_path: str | Path, spec: UpcycleSpec,
            max_shard_size: int | str = "5GB", dry_run: bool = False, overwrite: bool = False,
            show_progress: bool | None = None, format: str | None = None, to: str = "hf"
            ) -> UpcyclePlan:
    """Write the MoE checkpoint ``spec`` describes from the dense checkpoint at
    ``dense_path``, in layout ``to`` (HF naming by default; ``torchtitan``: the whole model
    under torchtitan's names), in ``format`` (None: the layout's ``default_format``: HF
    safetensors shards and index, or one torch.distributed.checkpoint folder), with
    config.json and the dense folder's other files (tokenizer, generation config).
    Streams one tensor at a time, validates everything first, and writes atomically as
    ``convert`` does."""
    checkpoint, plan = plan_upcycle(dense_path, spec, to)
    run_checkpoint_job(plan.plan, checkpoint, dst_path, max_shard_size, overwrite, dry_run,
                       show_progress, config=plan.config,
                       format=format or layout_named(to).default_format)
    return plan


def upcycle_state_dict(dense_sd: Mapping[str, torch.Tensor], spec: UpcycleSpec,
                       config: dict | None = None) -> dict[str, torch.Tensor]:
    """The MoE state dict (HF naming of the target family) of a dense HF state dict.

    Non-MLP tensors are passed through (the same objects); new tensors are made on the
    dense tensors' device. ``config`` (the dense config.json) picks the target for
    ``target="auto"``; without it the dense family is recognised from the keys.
    """
    plan = build_upcycle_plan(state_dict_meta(dense_sd), config, spec, "state dict")
    device = next((t.device for t in dense_sd.values()), None)
    return run_plan(plan.plan, DictSource(dense_sd), device)
