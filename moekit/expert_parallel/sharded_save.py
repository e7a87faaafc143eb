"""Saving the state dict of a 2-D (fsdp, ep) device mesh, as ``load_sharded`` returns it,
each byte written by one rank.

``format="safetensors"`` writes a Hugging Face per-expert checkpoint: safetensors shards
and their index. Every rank plans the whole output from the tensors' global shapes, so
all agree on each file's header and on where each tensor lies in it (they check first
that they hold the same keys, dtypes, global shapes and placements, and then that their
writes add up to each file's tensor bytes). Rank 0 makes moekit's temporary output
folder and creates each shard file at its full size, header written; then every rank
writes (``pwrite``) the bytes it alone writes, at their place, and syncs them:

- an expert's tensors: the rank whose ep chunk holds the expert and, within that chunk,
  whose dp chunk holds it (``load_sharded``'s read split, run backwards);
- a tensor sharded over dp: the rows of its dp rank's chunk that its ep rank's chunk of
  them holds;
- a plain tensor (replicated on every rank): rank 0.

Rank 0 then writes the index, copies the sidecar files and puts the folder in place with
``moekit.output``'s guarantees; on any rank's failure nothing is put in place and every
rank raises. The destination must be one folder every rank sees (on several nodes, a
shared file system).

``format="dcp"`` hands the state dict as it is to ``torch.distributed.checkpoint.save``:
each rank writes its own chunks, DCP writes each chunk that several ranks hold once and
commits ``.metadata``, into the same kind of output folder (``save_experts``'s).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from ..checkpoint import FAMILY_METADATA_KEY, LAYOUT_METADATA_KEY
from ..conversion import state_dict_meta
from ..errors import MoekitError
from ..executors.evaluate import element_bytes, materialize
from ..executors.streaming import shard_file_names, shard_tensors, write_index
from ..layouts import HF
from ..output import OutputFolder
from ..plan import Plan, Read, TensorPlan, reads
from ..planner import build_plan, understand, validate
from ..safetensors_writer import header_bytes
from ..sizes import parse_size
from .ranges import chunk, grouped_layout
from .save import SidecarSource, _copy_sidecars, _dcp_write, answered, coordinated
from .sharded import ShardedMesh, absolute, agree, agree_on_arguments, agree_on_state

FORMATS = ("safetensors", "dcp")
"""What ``save_sharded`` writes: an HF per-expert safetensors checkpoint, or the state
dict as it is, as one DCP folder."""


def save_sharded(state_dict: Mapping[str, torch.Tensor], path: str | Path,
                 device_mesh: DeviceMesh, layout: str = "transformers", *,
                 ep_dim: str = "ep", fsdp_dim: str = "dp", format: str = "safetensors",
                 family: str | None = None, config_from: str | Path | None = None,
                 overwrite: bool = False, max_shard_size: int | str = "5GB") -> None:
    """Write the state dict that ``load_sharded`` returned (grouped expert DTensors
    ``Shard(0)`` over ``ep_dim`` of ``device_mesh``, other DTensors ``Shard(0)`` over its
    ``fsdp_dim`` submesh, plain tensors held whole on every rank) to ``path``, each byte
    by one rank (see the module docstring). Call it on every rank of the mesh.

    ``format="safetensors"`` writes the HF per-expert checkpoint (shards of at most
    ``max_shard_size``, and the index); ``format="dcp"`` writes the state dict as it is,
    in ``layout``, as one ``torch.distributed.checkpoint`` folder, which ``load_sharded``
    and DCP's own ``load`` read back. ``layout`` names the grouped layout of the expert
    tensors; ``family`` or ``config_from`` name the model family where the keys leave it
    open. ``config_from`` is a checkpoint (a folder, or a Hub repo id in the local Hub
    cache) whose non-weight files (config.json, tokenizer, ...) are copied beside the
    weights. Every rank checks its part first; when one cannot, every rank raises a
    MoekitError naming it and nothing is written. CUDA tensors are staged through the CPU.
    Ranks called with different arguments, or whose state dicts differ in a key or in a
    tensor's dtype, global shape or placement, are refused first, on every rank.
    """
    with answered("save_sharded"):
        agree_on_arguments("save_sharded", dict(
            path=absolute(path), layout=layout, ep_dim=ep_dim, fsdp_dim=fsdp_dim,
            format=format, family=family, config_from=absolute(config_from), overwrite=overwrite,
            max_shard_size=_bytes(max_shard_size)))
    if format not in FORMATS:
        raise MoekitError(f"unknown save_sharded format {format!r}: it writes "
                          f"{', '.join(FORMATS)}")
    mesh = ShardedMesh(device_mesh, ep_dim, fsdp_dim, "save_sharded")
    with answered("save_sharded"):
        agree_on_state(state_dict, "save_sharded: the ranks hold different state dicts "
                       "(every rank must hold the keys load_sharded gives, each with the same "
                       "dtype, global shape and placement)")
    try:
        config, sidecars = SidecarSource.read(config_from) if config_from else (None, None)
        job = _plan(state_dict, mesh, layout, family, config, parse_size(max_shard_size))
    except Exception as err:  # told to every rank: the others would wait in the next collective
        with answered("save_sharded"):
            agree(err, "save_sharded")
        raise
    with answered("save_sharded"):
        agree(None, "save_sharded")
    if format == "dcp":
        _dcp_write(state_dict, Path(path), overwrite, sidecars, "save_sharded")
        return
    with answered("save_sharded"):
        _check_coverage(job)
    _write(job, Path(path), overwrite, sidecars)


def _bytes(size: object) -> object:
    """A shard size as bytes where it is one (``"5GB"`` and 5_000_000_000 are one size),
    else as given, for the ranks to compare before any refuses it."""
    try:
        return parse_size(size)
    except MoekitError:
        return size


@dataclass
class _Write:
    """Bytes this rank writes: ``data()``, ``size`` bytes, at ``offset`` of ``file``."""

    file: str
    offset: int
    size: int
    data: Callable[[], torch.Tensor]


@dataclass
class _Job:
    """The whole output (its plan, each file's tensors and header) and this rank's writes."""

    plan: Plan
    files: dict[str, tuple[bytes, list[TensorPlan]]]
    writes: list[_Write]


def _plan(state_dict: Mapping[str, torch.Tensor], mesh: ShardedMesh, layout: str,
          family: str | None, config: dict | None, max_shard_bytes: int) -> _Job:
    """Check the state dict's placements, plan the HF checkpoint it makes and the writes
    of this rank."""
    grouped_layout(layout)
    starts, local = _local_rows(state_dict, mesh)
    analysis = understand(state_dict_meta(state_dict), config, {}, "sharded state dict",
                          from_=layout, family=family)
    validate(analysis)
    plan = build_plan(analysis, HF)
    metadata = {"format": "pt", LAYOUT_METADATA_KEY: "hf", FAMILY_METADATA_KEY: plan.family}
    shards = shard_tensors(plan.tensors, max_shard_bytes)
    files, place = {}, {}
    for name, tensors in zip(shard_file_names(len(shards)), shards):
        header = header_bytes([(t.name, t.dtype, t.shape) for t in tensors], metadata)
        files[name] = header, tensors
        at = len(header)
        for tensor in tensors:
            place[tensor.name] = name, at
            at += tensor.nbytes
    _check_experts_sharded_over_ep(plan, state_dict, starts)
    source = _RankSource(local, starts)
    mine = mesh.experts_to_read(analysis.n_experts)
    grouped = HF.grouped_for(analysis.family)
    experts = build_plan(analysis, HF, experts=mine, offset=0 if grouped else mine.start)
    whole = {t.name: t for t in plan.tensors}
    writes = [_expert_write(t, whole[t.name], place[t.name], mine.start if grouped else 0,
                            source)
              for t in experts.tensors if t.name in experts.expert_tensors]
    for tensor in plan.tensors:
        if tensor.name not in plan.expert_tensors:
            writes += _other_write(tensor, place[tensor.name], state_dict, source, mesh)
    return _Job(plan, files, writes)


def _check_coverage(job: _Job) -> None:
    """Raise on every rank unless, file by file, the ranks' writes add up to the file's
    tensor bytes: a byte no rank writes would read back as zero."""
    mine = dict.fromkeys(job.files, 0)
    for write in job.writes:
        mine[write.file] += write.size
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for name, (_, tensors) in job.files.items():
        planned, written = sum(t.nbytes for t in tensors), sum(c[name] for c in everyone)
        if written != planned:
            raise MoekitError(f"save_sharded: the ranks would write {written} bytes of the "
                              f"{planned} tensor bytes of {name}, where each must be written "
                              "by exactly one rank; nothing was written")


def _local_rows(state_dict: Mapping[str, torch.Tensor], mesh: ShardedMesh
                ) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """(first global row of each expert DTensor's local rows, every tensor's local part),
    once each DTensor is laid out as ``load_sharded`` lays it out: ``Shard(0)`` over ep
    and replicated over dp on the mesh, or ``Shard(0)`` on the dp submesh, with the rows
    ``torch.chunk`` gives this rank. A MoekitError names the first that is not."""
    starts, local = {}, {}
    for key, value in state_dict.items():
        if not isinstance(value, DTensor):
            local[key] = value
            continue
        rows = value.shape[0] if value.shape else 0
        if value.device_mesh == mesh.mesh and value.placements == mesh.expert_placements:
            mine = chunk(rows, mesh.ep_size, mesh.ep_rank)
            starts[key] = mine.start
        elif value.device_mesh == mesh.fsdp_mesh and value.placements == (Shard(0),):
            mine = chunk(rows, mesh.fsdp_size, mesh.fsdp_rank)
        else:
            raise MoekitError(f"{key} is a DTensor {list(value.placements)} on the mesh "
                              f"{value.device_mesh.mesh_dim_names}; save_sharded takes "
                              "expert tensors Shard(0) over ep (replicated over dp), other "
                              "tensors Shard(0) on the dp submesh, as load_sharded gives them")
        local[key] = value.to_local()
        if local[key].shape[0] != mine.stop - mine.start:
            raise MoekitError(f"{key}: this rank holds {local[key].shape[0]} of its "
                              f"{rows} rows; torch.chunk's rule gives it rows "
                              f"{mine.start}-{mine.stop - 1}")
    return starts, local


def _check_experts_sharded_over_ep(plan: Plan, state_dict: Mapping[str, torch.Tensor],
                                   starts: dict[str, int]) -> None:
    """Refuse grouped expert tensors that are DTensors sharded over dp: a rank writes the
    experts its ep rank holds, whole."""
    for tensor in plan.tensors:
        if tensor.name in plan.expert_tensors:
            for read in reads(tensor.recipe):
                if isinstance(state_dict[read.key], DTensor) and read.key not in starts:
                    raise MoekitError(f"{read.key} holds experts but is sharded over dp; "
                                      "save_sharded takes expert tensors Shard(0) over ep "
                                      "(replicated over dp), as load_sharded gives them")


def _expert_write(tensor: TensorPlan, whole: TensorPlan, place: tuple[str, int], first: int,
                  source: "_RankSource") -> _Write:
    """This rank's write of an expert tensor of the output (``whole``, at ``place``): a
    per-expert tensor whole (``first`` 0); the rank's rows of a grouped one (GPT-OSS's and
    Llama 4's HF checkpoints group their experts), from row ``first``, its first expert."""
    file, offset = place
    if first:
        offset += first * whole.nbytes // whole.shape[0]
    return _Write(file, offset, tensor.nbytes, _built(tensor, source))


def _other_write(tensor: TensorPlan, place: tuple[str, int],
                 state_dict: Mapping[str, torch.Tensor], source: "_RankSource",
                 mesh: ShardedMesh) -> list[_Write]:
    """This rank's write of a non-expert tensor: a copy of a DTensor sharded over dp, its
    ep rank's chunk of its dp rank's rows; a tensor of plain tensors, whole from rank 0."""
    keys = {read.key for read in reads(tensor.recipe)}
    over_ep = sorted(k for k in keys if k in source.starts)
    if over_ep:
        raise MoekitError(f"{', '.join(over_ep)} holds no experts but is sharded over ep; "
                          "save_sharded takes other tensors Shard(0) on the dp submesh, or "
                          "whole, as load_sharded gives them")
    sharded = [k for k in keys if isinstance(state_dict[k], DTensor)]
    if not sharded:
        return ([_Write(*place, tensor.nbytes, _built(tensor, source))]
                if dist.get_rank() == 0 else [])
    if not tensor.is_copy:
        raise MoekitError(f"{tensor.name} is built from {', '.join(sorted(sharded))}, "
                          "sharded over dp: save_sharded writes such tensors as they are")
    ours = chunk(tensor.shape[0], mesh.fsdp_size, mesh.fsdp_rank)
    part = chunk(ours.stop - ours.start, mesh.ep_size, mesh.ep_rank)
    if part.start == part.stop:
        return []
    row_bytes = tensor.nbytes // tensor.shape[0]
    rows = source.local[tensor.recipe.key][part]
    file, offset = place
    return [_Write(file, offset + (ours.start + part.start) * row_bytes, rows.nbytes,
                   lambda: rows)]


def _built(tensor: TensorPlan, source: "_RankSource") -> Callable[[], torch.Tensor]:
    """The tensor ``tensor``'s recipe makes from ``source``, when called."""
    return lambda: materialize(tensor.recipe, source, None)


class _RankSource:
    """Serves reads of the global tensors from this rank's parts: an expert DTensor's
    rows by their global index (its local rows begin at ``starts[key]``)."""

    def __init__(self, local: dict[str, torch.Tensor], starts: dict[str, int]) -> None:
        self.local = local
        self.starts = starts

    def read(self, region: Read) -> torch.Tensor:
        tensor = self.local[region.key]
        if not region.region:
            return tensor
        first, *rest = region.region
        start = self.starts.get(region.key, 0)
        first = (first - start if isinstance(first, int)
                 else slice(first.start - start, first.stop - start, first.step))
        return tensor[(first, *rest)]


def _write(job: _Job, path: Path, overwrite: bool, sidecars: SidecarSource | None) -> None:
    """Rank 0 makes the folder and sizes the files; every rank writes its bytes; rank 0
    completes the folder and puts it in place, and tells every rank how it went."""
    with coordinated(path, overwrite, sidecars, "save_sharded") as session:
        created: list = [None]
        if session.output is not None:
            created[0] = session.attempt(lambda: _create(session.folder, job.files))
        dist.broadcast_object_list(created, src=0)
        if created[0] is None:
            error = session.attempt(lambda: _write_mine(session.folder, job.writes))
        else:  # no rank writes; rank 0 reports why
            error = created[0] if session.output is not None else None
        outcomes: list = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, error)
        session.agree({r: e for r, e in enumerate(outcomes) if e},
                      lambda: _complete(session.output, job, sidecars))


def _create(folder: Path, files: dict[str, tuple[bytes, list[TensorPlan]]]) -> None:
    """Each shard file, its header written and its size set (the tensor bytes a hole to
    be written by the ranks)."""
    for name, (header, tensors) in files.items():
        with open(folder / name, "xb") as handle:
            handle.write(header)
            handle.truncate(len(header) + sum(t.nbytes for t in tensors))


def _write_mine(folder: Path, writes: list[_Write]) -> None:
    """Write this rank's bytes in place, then sync each file written to."""
    fds: dict[str, int] = {}
    try:
        for write in writes:
            if write.file not in fds:
                fds[write.file] = os.open(folder / write.file, os.O_WRONLY)
            _pwrite_all(fds[write.file], write.data(), write.offset)
        for fd in fds.values():
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)


def _pwrite_all(fd: int, tensor: torch.Tensor, offset: int) -> None:
    """Write the bytes of ``tensor`` (copied to the CPU if it is elsewhere) at ``offset``."""
    data = element_bytes(tensor).numpy()
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _complete(output: OutputFolder, job: _Job, sidecars: SidecarSource | None) -> None:
    """Write the index of every file's tensors and copy the sidecar files."""
    weight_map = {t.name: name for name, (_, tensors) in job.files.items() for t in tensors}
    write_index(output.folder, job.plan.tensors, weight_map)
    _copy_sidecars(output, sidecars)
