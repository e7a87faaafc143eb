"""Saving from expert-parallel ranks: to a Hugging Face per-expert checkpoint, or as the
ranks' own state dict in one torch.distributed.checkpoint folder.

``format="safetensors"``: each rank that holds a distinct set of experts (EP coordinate
r, coordinate 0 on every other mesh dimension) writes its experts to
``model-{r+1}-of-{n}.safetensors`` under their global HF keys; EP rank 0 also writes
every non-expert tensor, the index and the non-weight files. torch.distributed is used
only to agree on the temporary folder and on success.

``format="dcp"``: every rank hands its state dict (grouped experts as ``Shard(0)``
DTensors) to ``torch.distributed.checkpoint.save``, which writes each rank's expert rows
from that rank and each replicated tensor once, and commits the ``.metadata``; nothing
is gathered. A step that fails on any rank fails DCP's save on every rank.

Either way, on any rank's failure the temporary folder is removed and nothing is put in
place; the folder is checked, made durable and moved into place as ``convert``'s is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..checkpoint import FAMILY_METADATA_KEY, LAYOUT_METADATA_KEY, Checkpoint, read_config
from ..errors import MoekitError
from ..executors.streaming import write_index, write_shard
from ..output import OutputFolder, output_error
from ..plan import TensorPlan
from ..sources import DictSource
from .local import local_hf_plan
from .dtensors import ep_coordinates, ep_dim
from .ranges import expert_range

FORMATS = ("safetensors", "dcp")
"""What ``save_experts`` writes: an HF per-expert safetensors checkpoint, or the ranks'
state dict as one DCP folder."""


def save_experts(state_dict: Mapping[str, torch.Tensor], path: str | Path,
                 device_mesh: DeviceMesh, layout: str = "nemo", family: str | None = None,
                 config_from: str | Path | None = None, overwrite: bool = False,
                 format: str = "safetensors") -> None:
    """Write the state dict that ``load_experts`` returned (same keys, grouped experts as
    DTensors) to ``path``. Call it on every rank.

    ``format="safetensors"`` writes an HF per-expert checkpoint; ``format="dcp"`` writes
    the state dict as it is, in ``layout``, as one ``torch.distributed.checkpoint`` folder
    that each rank writes its own expert rows into (``moekit convert PATH OUT --to hf``
    reads it back; ``load_experts`` and DCP's own ``load`` read it). ``config_from`` is a
    checkpoint folder whose non-weight files (config.json, tokenizer, ...) are copied
    beside the weights; its config also names the model family.
    """
    if format not in FORMATS:
        raise MoekitError(f"unknown save_experts format {format!r}: it writes "
                          f"{', '.join(FORMATS)}")
    size, rank = ep_coordinates(device_mesh)
    try:
        config = read_config(Path(config_from)) if config_from else None
        local, n_experts, plan = local_hf_plan(state_dict, device_mesh, layout, family, config)
    except MoekitError as err:
        _agree_on_planning(err)
        raise
    _agree_on_planning(None)
    if format == "dcp":
        _dcp_write(state_dict, Path(path), overwrite, config_from)
        return
    writes = [t for t in plan.tensors if rank == 0 or t.name in plan.expert_tensors]
    writer = all(device_mesh.get_local_rank(d) == 0 for d in range(device_mesh.ndim)
                 if d != ep_dim(device_mesh))
    files = sum(1 for r in range(size) if r == 0 or expert_range(n_experts, size, r))
    metadata = {"format": "pt", LAYOUT_METADATA_KEY: "hf", FAMILY_METADATA_KEY: plan.family}
    _coordinated_write(Path(path), overwrite, writer and bool(writes), rank, files,
                       writes, DictSource(local), metadata, config_from)


def _dcp_write(state_dict: Mapping[str, torch.Tensor], path: Path, overwrite: bool,
               config_from: str | Path | None, caller: str = "save_experts") -> None:
    """Every rank saves its state dict with DCP into the folder rank 0 made; rank 0 then
    copies the sidecar files, puts the folder in place and tells every rank how it went
    (``caller`` names the function saving, in errors)."""
    from ..dcp import save_distributed  # imports torch.distributed.checkpoint

    output, folder = _agree_on_folder(path, overwrite, config_from)
    with discarded_if_interrupted(output):
        error = save_distributed(dict(state_dict), folder)
        verdict = agreed_outcome(output, [error] if error else [],
                                 lambda: _copy_sidecars(output, config_from), caller)
    if verdict:
        raise MoekitError(verdict)


def _agree_on_planning(error: MoekitError | None) -> None:
    """Tell every rank whether each planned its part; raise on every rank when one did not
    (with that rank's message), so that no rank waits in a later collective for one that
    has already given up."""
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, None if error is None else str(error))
    failed = [f"rank {r}: {message}" for r, message in enumerate(outcomes) if message]
    if failed and error is None:
        raise MoekitError("save_experts failed, nothing was written: " + "; ".join(failed))


def _coordinated_write(path: Path, overwrite: bool, writes_file: bool, rank: int, files: int,
                       tensors: list[TensorPlan], source: DictSource,
                       metadata: dict[str, str], config_from: str | Path | None) -> None:
    """Rank 0 makes the temporary folder; writers fill it; rank 0 puts it in place (with
    the guarantees of ``moekit.output``) and tells every rank how it went. An interrupt or
    a lost rank leaves nothing in place either."""
    output, folder = _agree_on_folder(path, overwrite, config_from)
    name = f"model-{rank + 1:05d}-of-{files:05d}.safetensors"
    error = None
    with discarded_if_interrupted(output):
        try:
            if writes_file:
                write_shard(folder / name, tensors, source, metadata)
        except Exception as err:  # reported to every rank below
            error = f"rank {dist.get_rank()}: {_describe(err, path)}"
        outcomes: list = [None] * dist.get_world_size()
        mapping = {t.name: name for t in tensors} if writes_file else {}
        dist.all_gather_object(outcomes, (error, mapping, tensors if writes_file else []))
        verdict = agreed_outcome(output, [e for e, _, _ in outcomes if e],
                                 lambda: _complete(output, outcomes, config_from))
    if verdict:
        raise MoekitError(verdict)


def _agree_on_folder(path: Path, overwrite: bool, config_from: str | Path | None
                     ) -> tuple[OutputFolder | None, Path]:
    """Rank 0 checks the destination (against ``config_from``, whose files it copies) and
    makes the temporary folder; all ranks learn it. Rank 0 also gets the OutputFolder."""
    message: list = [None]
    output = None
    if dist.get_rank() == 0:
        try:
            output = OutputFolder(path, Path(config_from) if config_from else None, overwrite)
            message[0] = str(output.folder)
        except MoekitError as err:
            message[0] = err
        except OSError as err:
            message[0] = MoekitError(_describe(err, path))
    dist.broadcast_object_list(message, src=0)
    if isinstance(message[0], MoekitError):
        raise message[0]
    return output, Path(message[0])


@contextmanager
def discarded_if_interrupted(output: OutputFolder | None) -> Iterator[None]:
    """Rank 0's temporary folder removed when this rank fails or is interrupted before the
    ranks agree on the outcome (after ``agreed_outcome``, the folder is in place or gone)."""
    try:
        yield
    except BaseException:
        if output is not None:
            output.discard()
        raise


def agreed_outcome(output: OutputFolder | None, errors: list[str],
                   complete: Callable[[], object], caller: str = "save_experts") -> str | None:
    """Rank 0 (which holds ``output``) completes the folder and moves it into place, or
    removes it after any rank's failure (``_put_in_place``); every rank gets the failure's
    message, else None."""
    verdict: list = [None]
    if output is not None:
        verdict[0] = _put_in_place(output, errors, complete, caller)
    dist.broadcast_object_list(verdict, src=0)
    return verdict[0]


def _put_in_place(output: OutputFolder, errors: list[str], complete: Callable[[], object],
                  caller: str = "save_experts") -> str | None:
    """On rank 0: ``complete`` the folder and move it into place, or remove it after any
    rank's failure (``errors``) or a failure of either step; the failure's message, else
    None."""
    try:
        if not errors:
            complete()
            output.commit()
            return None
    except (MoekitError, OSError) as err:
        if output.in_place:  # complete and in place: the failure came after the final move
            return f"{caller}: rank 0: {_describe(err, output.dst, left=True)}"
        errors = [f"rank 0: {_describe(err, output.dst)}"]
    output.discard()
    return f"{caller} failed, nothing was written: " + "; ".join(errors)


def _complete(output: OutputFolder, outcomes: list, config_from: str | Path | None) -> None:
    """Write the index of every rank's tensors and copy the sidecar files."""
    weight_map: dict[str, str] = {}
    tensors: dict[str, TensorPlan] = {}
    for _, mapping, planned in outcomes:
        weight_map.update(mapping)
        tensors.update({t.name: t for t in planned})
    write_index(output.folder, list(tensors.values()), weight_map)
    _copy_sidecars(output, config_from)


def _copy_sidecars(output: OutputFolder, config_from: str | Path | None) -> None:
    """Copy the non-weight files of ``config_from`` (config.json, tokenizer, ...)."""
    if config_from:
        output.copy_in(Checkpoint.open(config_from).extra_files())


def _describe(err: Exception, path: Path, left: bool = False) -> str:
    """A failure's message: a file-system error of the destination says what to do (and,
    with ``left``, that the output was put in place before it)."""
    mapped = output_error(err, path, left) if isinstance(err, OSError) else None
    return str(mapped or err)
