"""Conversions between layouts: file to file (streaming) and state dict to state dict, and
the one job pipeline that every command writing a checkpoint runs.

A job (convert, upcycle, merge) is planned from headers, then validated (the sink's options,
the destination), then either reported (a dry run) or written through a **sink**: the
object that turns the plan's tensors into files inside the output folder, which
``moekit.output`` makes atomic and durable.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .checkpoint import FAMILY_METADATA_KEY, LAYOUT_METADATA_KEY, Checkpoint, as_path
from .dtypes import ITEMSIZES, to_safetensors
from .errors import MoekitError
from .executors.streaming import write_plan
from .gc_pauses import without_gc_pauses
from .layouts import layout_named
from .output import atomic_output, check_destination
from .plan import Plan
from .planner import analyse, analyse_checkpoint, analyse_opened, build_plan
from .sizes import parse_size
from .sources import FileSource, TensorSource

if TYPE_CHECKING:
    import torch


class Sink(Protocol):
    """Writes a plan's tensors as files of one checkpoint format into a folder."""

    def check(self, plan: Plan) -> None:
        """Refuse, naming the format, a plan this sink cannot write: called before anything
        is read or written, dry runs included."""

    def write(self, plan: Plan, source: TensorSource, folder: Path,
              show_progress: bool | None, finished: Callable[[Path], object]) -> None:
        """Write every tensor of ``plan``, read from ``source``, into ``folder``; call
        ``finished(path)`` with each file once it is complete (so that it is synced while
        the next is written)."""


@dataclass(frozen=True)
class SafetensorsShards:
    """HF-sharded safetensors files and their index, each file's metadata naming the
    layout and family (what ``save_pretrained`` writes, plus moekit's two keys)."""

    max_shard_bytes: int

    def check(self, plan: Plan) -> None:
        plan.refuse_chunks("safetensors")

    def write(self, plan: Plan, source: TensorSource, folder: Path,
              show_progress: bool | None, finished: Callable[[Path], object]) -> None:
        metadata = {"format": "pt", LAYOUT_METADATA_KEY: plan.dst_layout,
                    FAMILY_METADATA_KEY: plan.family}
        write_plan(plan, source, folder, self.max_shard_bytes, metadata, show_progress,
                   finished)


FORMATS = ("safetensors", "dcp", "megatron")
"""Output formats, each written by one sink: HF-sharded safetensors files, one
``torch.distributed.checkpoint`` folder (``moekit.dcp``), or a Megatron-Core
``torch_dist`` checkpoint folder (``moekit.megatron_io``)."""


def sink_for(format: str, max_shard_size: int | str) -> Sink:
    """The sink writing ``format``; its options are checked here, before anything is read
    or written (a bad ``max_shard_size`` or format is refused naming it)."""
    max_shard_bytes = parse_size(max_shard_size)
    if format == "safetensors":
        return SafetensorsShards(max_shard_bytes)
    if format == "dcp":
        from .dcp import DcpFolder  # imports torch.distributed.checkpoint

        return DcpFolder(max_shard_bytes)
    if format == "megatron":
        from .megatron_io import MegatronFolder

        return MegatronFolder(max_shard_bytes)
    raise MoekitError(f"unknown output format {format!r}: moekit writes {', '.join(FORMATS)}")


class JobSource(TensorSource, Protocol):
    """The source a job's tensors are read from: a context manager that checks, once
    everything is read, that no file it read changed meanwhile."""

    def check_unchanged(self) -> None:
        """Raise a MoekitError naming a source file that changed since it was opened."""

    def __enter__(self) -> "JobSource": ...

    def __exit__(self, *exc: object) -> None: ...


def run_job(plan: Plan, sources: Sequence[Path], source_files: Sequence[Path],
            open_source: Callable[[], JobSource], dst: str | Path,
            max_shard_size: int | str, overwrite: bool, dry_run: bool,
            show_progress: bool | None = None, extra_files: Iterable[Path] = (),
            config: dict | None = None, format: str = "safetensors") -> None:
    """The pipeline of every job that writes a checkpoint, after planning: validate the
    sink's options, that it can write the plan, and the destination, then (unless
    ``dry_run``) write ``plan``'s tensors, read from ``open_source()``, through the sink of
    ``format`` into a temporary folder that is put in place at ``dst`` when complete
    (``moekit.output``), with ``extra_files`` (sidecars: tokenizer, generation config);
    ``config`` replaces their config.json. ``sources`` are the checkpoints (folders, or
    files) the user named, which the destination may neither be, lie inside nor hold, and
    ``source_files`` the files the destination must never replace."""
    sink = sink_for(format, max_shard_size)
    sink.check(plan)
    dst = as_path(dst, "destination")
    check_destination(dst, sources, overwrite, source_files)
    if dry_run:
        return
    with atomic_output(dst, sources, overwrite, source_files) as output:
        with open_source() as source:
            sink.write(plan, source, output.folder, show_progress, output.sync_soon)
            source.check_unchanged()
        output.copy_in(extra for extra in extra_files
                       if config is None or extra.name != "config.json")
        if config is not None:
            (output.folder / "config.json").write_text(
                json.dumps(config, indent=2, sort_keys=True) + "\n")


def run_checkpoint_job(plan: Plan, checkpoint: Checkpoint, dst: str | Path,
                       max_shard_size: int | str, overwrite: bool, dry_run: bool,
                       show_progress: bool | None = None, config: dict | None = None,
                       format: str = "safetensors") -> None:
    """``run_job`` of a plan that reads one checkpoint's files, copying its sidecars."""
    run_job(plan, [checkpoint.named], checkpoint.source_files(),
            lambda: FileSource(checkpoint), dst, max_shard_size, overwrite, dry_run, show_progress,
            extra_files=checkpoint.extra_files(), config=config, format=format)


def convert(src: str | Path, dst: str | Path, to: str, from_: str | None = None,
            max_shard_size: int | str = "5GB", dry_run: bool = False, overwrite: bool = False,
            show_progress: bool | None = None, dequantize: bool = False,
            format: str | None = None, config: str | Path | None = None) -> Plan:
    """Convert the checkpoint at ``src`` into layout ``to`` at ``dst``, written in
    ``format`` (one of ``FORMATS``; None: the layout's ``default_format``); return the plan.
    ``config`` names the model's config.json where the checkpoint has none, or to read it
    by instead of its own (``Checkpoint.open``): it is the one written beside the output.

    The whole plan is built and validated from headers before anything is written; the
    output is written to a temporary folder beside ``dst`` and renamed into place when
    complete. ``dry_run`` validates and returns the plan, writing nothing. ``dequantize``
    writes FP8 block-scaled weights as bf16 (their scales dropped). Imports no torch
    unless a recipe computes, so that a dry run answers at once.
    """
    checkpoint, analysis = analyse_checkpoint(src, from_, config)
    layout = layout_named(to)
    plan = build_plan(analysis, layout, dequantize=dequantize)
    run_checkpoint_job(plan, checkpoint, dst, max_shard_size, overwrite, dry_run,
                       show_progress, format=format or layout.default_format)
    return plan


@without_gc_pauses
def load(path: str | Path, layout: str = "nemo", device: "torch.device | str | None" = None,
         from_: str | None = None, config: str | Path | None = None
         ) -> "dict[str, torch.Tensor]":
    """The whole checkpoint at ``path`` as a state dict in ``layout``, on ``device``;
    ``config`` names its model's config.json where it has none, or to read it by instead
    of its own (``Checkpoint.open``).

    Validated from headers first, like ``convert``. On an accelerator the bytes go through
    a small pool of pinned host buffers, or kvikio's, which reads the first of them while
    the plan is made (``read_ahead``), and the grouped tensors are built on the device.
    """
    from .executors.device import pin_ahead, read_ahead, read_plan, start_readers
    from .executors.memory import checked_device

    checked_device(device)
    start_readers(device)
    checkpoint = Checkpoint.open(path, config)
    pinned = pin_ahead(device)
    ahead = None
    try:
        ahead = read_ahead(checkpoint, device)
        plan = build_plan(analyse_opened(checkpoint, from_), layout_named(layout))
        return read_plan(plan, checkpoint, device, pinned=pinned, ahead=ahead)
    finally:
        try:
            if ahead is not None:
                ahead.close()
        finally:
            if pinned is not None:
                pinned.join()


def prepare_loads(device: "torch.device | str" = "cuda") -> None:
    """Start setting up, in the background, what the process's first load onto ``device``
    would otherwise set up while it runs, and return: kvikio loaded and warmed up on the
    device where loads read through it (it is installed and ``MOEKIT_KVIKIO`` is not 0),
    else moekit's reader threads started and their host buffers pinned.

    A training job that calls this as it starts (once it has chosen its GPU, before it
    sets up its process group and builds its model) has its first load (``load``,
    ``load_experts``, ``load_sharded``) onto that device read through what is set up; a
    load that starts before the set-up is done reads with what is ready then. ``"cuda"``
    is the calling thread's current device: each rank names its own GPU, or calls this
    after ``torch.cuda.set_device``. Nothing for a CPU device; MoekitError for a device
    this machine does not have."""
    from .executors.device import prepare_loads as prepare
    from .executors.memory import checked_device

    found = checked_device(device)
    if found is not None:
        prepare(found)


@dataclass(frozen=True)
class _Meta:
    shape: tuple[int, ...]
    dtype: str


def state_dict_meta(state_dict: "Mapping[str, torch.Tensor]", label: str = "state dict",
                    allow_meta: bool = False) -> dict[str, _Meta]:
    """Shapes and dtypes of a state dict, in the form the planner reads headers. A value
    that is not a tensor, a dtype moekit does not handle and (unless ``allow_meta``) a
    tensor without data are refused, naming the key."""
    from .executors.memory import checked_state_dict

    meta = {}
    for key, value in checked_state_dict(state_dict, label, allow_meta).items():
        try:
            dtype = to_safetensors(value.dtype)
        except KeyError:
            raise MoekitError(f"{label} tensor {key} has dtype {value.dtype}, which moekit does "
                              f"not handle (it handles {', '.join(ITEMSIZES)})") from None
        meta[key] = _Meta(tuple(value.shape), dtype)
    return meta


def convert_state_dict(state_dict: "Mapping[str, torch.Tensor]", src_layout: str | None,
                       dst_layout: str, family: str | None = None, n_experts: int | None = None,
                       config: dict | None = None) -> "dict[str, torch.Tensor]":
    """Convert an in-memory state dict between layouts.

    Non-expert tensors are passed through (the same tensor objects); expert tensors are
    built on the device of their source tensors (which must share one). ``src_layout=None``
    detects the layout; ``family`` (a moekit family name) or ``config`` (a config.json
    dict) name the model family when the keys alone are ambiguous.
    """
    analysis = analyse(state_dict_meta(state_dict), config, {}, "state dict", from_=src_layout,
                       family=family, n_experts=n_experts)
    from .executors.memory import run_on_state_dict

    return run_on_state_dict(build_plan(analysis, layout_named(dst_layout)), state_dict)
