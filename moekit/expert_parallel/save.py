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

Either way, on any rank's failure, a signal to any rank or a rank killed, the temporary
folder is removed and nothing is put in place (``coordinated``); the folder is checked,
made durable and moved into place as ``convert``'s is.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..checkpoint import FAMILY_METADATA_KEY, LAYOUT_METADATA_KEY, Checkpoint, Sidecar
from ..errors import MoekitError
from ..executors.streaming import write_index, write_shard
from ..output import (OutputFolder, Stopped, deferred_signals, interruptible, output_error,
                      process_alive, remove_if_abandoned)
from ..plan import TensorPlan
from ..sources import DictSource
from .local import local_hf_plan
from .dtensors import ep_coordinates, ep_dim
from .ranges import expert_range
from .sharded import absolute, agree_on_arguments, agree_on_state, failed_ranks

FORMATS = ("safetensors", "dcp")
"""What ``save_experts`` writes: an HF per-expert safetensors checkpoint, or the ranks'
state dict as one DCP folder."""


@dataclass(frozen=True)
class SidecarSource:
    """The checkpoint ``config_from`` names (a path, or a Hub repo id read from the local
    Hub cache), opened as ``convert`` opens a source: what the user named and its files,
    which a save may not write into, and its sidecar files (config.json, tokenizer, ...)
    as they were when it was opened, which the save copies beside its weights (one changed
    since is refused at the copy, as ``convert`` refuses it). Opened before anything is
    written, so that a ``config_from`` that is not a checkpoint is refused up front."""

    named: Path
    files: tuple[Path, ...]
    sidecars: tuple[Sidecar, ...]

    @classmethod
    def read(cls, config_from: str | Path) -> tuple[dict | None, "SidecarSource"]:
        """The config of the checkpoint ``config_from`` (None where it has none), and its
        files and sidecar files."""
        checkpoint = Checkpoint.open(config_from)
        return checkpoint.config, cls(checkpoint.named, tuple(checkpoint.source_files()),
                                      tuple(checkpoint.extra_files()))


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
    checkpoint (a folder, or a Hub repo id in the local Hub cache) whose non-weight files
    (config.json, tokenizer, ...) are copied beside the weights; its config also names the
    model family. Ranks called with different arguments, or whose state dicts differ in a
    key or in a tensor's dtype, global shape or placement, are refused first, on every
    rank.
    """
    with answered("save_experts"):
        agree_on_arguments("save_experts", dict(
            path=absolute(path), layout=layout, family=family, config_from=absolute(config_from),
            overwrite=overwrite, format=format))
    if format not in FORMATS:
        raise MoekitError(f"unknown save_experts format {format!r}: it writes "
                          f"{', '.join(FORMATS)}")
    size, rank = ep_coordinates(device_mesh)
    with answered("save_experts"):
        agree_on_state(state_dict, "save_experts: the ranks hold different state dicts (every "
                       "rank must hold the keys load_experts gives, each with the same dtype, "
                       "global shape and placement)")
    try:
        config, sidecars = SidecarSource.read(config_from) if config_from else (None, None)
        local, n_experts, plan = local_hf_plan(state_dict, device_mesh, layout, family, config)
    except Exception as err:  # any error: the other ranks must not wait for this one
        _agree_on_planning(err)
        raise
    _agree_on_planning(None)
    if format == "dcp":
        _dcp_write(state_dict, Path(path), overwrite, sidecars)
        return
    writes = [t for t in plan.tensors if rank == 0 or t.name in plan.expert_tensors]
    writer = all(device_mesh.get_local_rank(d) == 0 for d in range(device_mesh.ndim)
                 if d != ep_dim(device_mesh))
    files = sum(1 for r in range(size) if r == 0 or expert_range(n_experts, size, r))
    metadata = {"format": "pt", LAYOUT_METADATA_KEY: "hf", FAMILY_METADATA_KEY: plan.family}
    _coordinated_write(Path(path), overwrite, writer and bool(writes), rank, files,
                       writes, DictSource(local), metadata, sidecars)


def _dcp_write(state_dict: Mapping[str, torch.Tensor], path: Path, overwrite: bool,
               sidecars: SidecarSource | None, caller: str = "save_experts") -> None:
    """Every rank saves its state dict with DCP into the folder rank 0 made; rank 0 then
    copies the sidecar files, puts the folder in place and tells every rank how it went
    (``caller`` names the function saving, in errors)."""
    from ..dcp import save_distributed  # imports torch.distributed.checkpoint

    with coordinated(path, overwrite, sidecars, caller) as session:
        failures = save_distributed(dict(state_dict), session.folder, path, session.caught)
        session.agree(failures, lambda: _copy_sidecars(session.output, sidecars))


def _agree_on_planning(error: Exception | None) -> None:
    """Tell every rank whether each planned its part; raise on every rank when one did not
    (``failed_ranks``), so that no rank waits in a later collective for one that has
    already given up."""
    with answered("save_experts"):
        failed = failed_ranks(error)
    if failed and error is None:
        raise MoekitError("save_experts failed, nothing was written: " + by_rank(failed))


@contextmanager
def answered(caller: str) -> Iterator[None]:
    """A collective of a save before its folder is made: when it fails because a rank is
    gone (the RuntimeError gloo or NCCL raise), every rank still there raises a
    MoekitError saying so (there is nothing to remove yet)."""
    try:
        yield
    except RuntimeError as err:
        raise MoekitError(f"{caller} failed, nothing was written: a rank stopped answering "
                          f"before writing began (torch.distributed: {_first_line(err)})"
                          ) from err


def _first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (gloo's run on with advice), else its type."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _coordinated_write(path: Path, overwrite: bool, writes_file: bool, rank: int, files: int,
                       tensors: list[TensorPlan], source: DictSource,
                       metadata: dict[str, str], sidecars: SidecarSource | None) -> None:
    """Rank 0 makes the temporary folder; writers fill it; rank 0 puts it in place (with
    the guarantees of ``moekit.output``) and tells every rank how it went."""
    name = f"model-{rank + 1:05d}-of-{files:05d}.safetensors"
    with coordinated(path, overwrite, sidecars, "save_experts") as session:
        error = None
        if writes_file:
            error = session.attempt(
                lambda: write_shard(session.folder / name, tensors, source, metadata))
        outcomes: list = [None] * dist.get_world_size()
        mapping = {t.name: name for t in tensors} if writes_file else {}
        dist.all_gather_object(outcomes, (error, mapping, tensors if writes_file else []))
        session.agree({r: e for r, (e, _, _) in enumerate(outcomes) if e},
                      lambda: _complete(session.output, outcomes, sidecars))


@contextmanager
def coordinated(path: Path, overwrite: bool, sidecars: SidecarSource | None,
                caller: str) -> Iterator["Session"]:
    """A save of every rank into one output: rank 0 checks the destination and makes the
    temporary folder (``_agree_on_folder``), the block writes and ends with
    ``Session.agree``, after which rank 0 has put the folder in place or removed it;
    on any rank's failure every rank raises a MoekitError.

    SIGINT, SIGTERM and SIGHUP are held for the whole block, so that no rank leaves the
    others waiting in a collective; during the write steps (``Session.attempt`` and
    DCP's writes) one stops the step at once, and the rank reports "interrupted" as its
    failure. The signal is delivered once every rank knows the outcome (to the handler
    it would have met: the default SIGTERM ends the process then). A rank that leaves
    without a word (killed, crashed) fails the others' next collective: each raises a
    MoekitError naming it where it ran on this machine, and the temporary folder is
    removed by rank 0, or, when rank 0 is the one gone, by a rank of its machine."""
    session = None
    try:
        with deferred_signals() as caught:
            try:
                output, folder, processes = _agree_on_folder(path, overwrite, sidecars)
                session = Session(path, output, folder, processes, caught, caller)
                yield session
            except BaseException as err:
                if session is not None and session.output is not None:
                    session.output.discard()
                if isinstance(err, RuntimeError):  # a collective whose peer is gone
                    raise MoekitError(_lost(session, err, caller)) from err
                raise
    except KeyboardInterrupt as err:  # a signal held until the ranks agreed
        if session is not None and session.in_place:
            err.moekit_in_place = path
        raise
    if session.verdict is not None:
        raise MoekitError(session.verdict)


class Session:
    """One rank's part of a ``coordinated`` save: the temporary folder every rank writes
    into, rank 0's OutputFolder (None elsewhere), each rank's (host, pid), the signals
    held so far, and once the ranks agreed, the outcome (``verdict``: the failure's
    message, else None, the output in place)."""

    def __init__(self, path: Path, output: OutputFolder | None, folder: Path,
                 processes: list[tuple[str, int]], caught: list[int], caller: str) -> None:
        self.path, self.output, self.folder = path, output, folder
        self.processes, self.caught, self.caller = processes, caught, caller
        self.verdict: str | None = None
        self.in_place = False

    def attempt(self, step: Callable[[], object]) -> str | None:
        """Run the write step ``step``, which a signal stops; its failure's message (a
        destination's file-system error as moekit words it), else None."""
        try:
            with interruptible(self.caught):
                step()
        except Stopped as stop:
            return str(stop)
        except Exception as err:  # reported to every rank by the caller
            return _describe(err, self.path)
        return None

    def agree(self, failures: dict[int, str], complete: Callable[[], object]) -> None:
        """Rank 0 completes the folder and moves it into place, or removes it after any
        rank's failure (``failures``: rank -> message), a failure of either step, or a
        signal it holds; every rank learns the outcome (``verdict``)."""
        verdict: list = [None]
        if self.output is not None:
            if self.caught and not failures:
                failures = {0: f"interrupted by {signal.Signals(self.caught[0]).name}"}
            verdict[0] = _put_in_place(self.output, failures, complete, self.caller)
        dist.broadcast_object_list(verdict, src=0)
        self.verdict = verdict[0]
        self.in_place = verdict[0] is None


def _agree_on_folder(path: Path, overwrite: bool, sidecars: SidecarSource | None
                     ) -> tuple[OutputFolder | None, Path, list[tuple[str, int]]]:
    """Rank 0 checks the destination (against the checkpoint whose files it copies) and
    makes the temporary folder; all ranks learn it, and each rank's host and pid. Rank
    0 also gets the OutputFolder."""
    message = None
    output = None
    if dist.get_rank() == 0:
        try:
            output = (OutputFolder(path, [sidecars.named], overwrite, sidecars.files)
                      if sidecars else OutputFolder(path, [], overwrite))
            message = str(output.folder)
        except MoekitError as err:
            message = err
        except OSError as err:
            message = MoekitError(_describe(err, path))
    gathered: list = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(gathered, (message, socket.gethostname(), os.getpid()))
    except BaseException:
        if output is not None:
            output.discard()
        raise
    folder = gathered[0][0]
    if isinstance(folder, MoekitError):
        raise folder
    return output, Path(folder), [(host, pid) for _, host, pid in gathered]


def _lost(session: Session | None, err: RuntimeError, caller: str) -> str:
    """What a collective that failed (``err``, in gloo's or NCCL's words) means for the
    user: which rank of this machine has ended, and whether the output was in place
    first. Where rank 0 is the one gone, the temporary folder it left is removed here."""
    gone = _gone(session.processes) if session is not None else []
    who = (", ".join(f"rank {r} (pid {pid})" for r, pid in gone) + " ended during the save"
           if gone else "a rank stopped answering (on another machine, or cut off)")
    reason = _first_line(err)
    if session is not None and session.output is not None and session.output.in_place:
        return (f"{caller}: {session.path} was written in full and put in place, then {who} "
                f"(torch.distributed: {reason})")
    left = ""
    if session is not None and any(r == 0 for r, _ in gone):
        if not session.folder.exists():  # rank 0 moved it into place, or removed it, first
            return (f"{caller}: {who} (torch.distributed: {reason}), after rank 0 had put "
                    f"{session.path} in place or removed its temporary folder: check "
                    f"{session.path}")
        kept = remove_if_abandoned(session.folder)
        if kept is not None:
            left = (f"; rank 0's temporary folder {session.folder} is kept, since {kept}: "
                    "remove it once no rank writes there")
    return f"{caller} failed, nothing was written: {who} (torch.distributed: {reason}){left}"


def _gone(processes: list[tuple[str, int]], wait: float = 5.0) -> list[tuple[int, int]]:
    """(rank, pid) of each rank of this machine whose process has ended, waiting up to
    ``wait`` seconds for one to end: the connection of a rank that ends closes a moment
    before its process does."""
    here, me = socket.gethostname(), os.getpid()
    deadline = time.monotonic() + wait
    while True:
        gone = [(r, pid) for r, (host, pid) in enumerate(processes)
                if host == here and pid != me and not process_alive(pid)]
        if gone or time.monotonic() > deadline:
            return gone
        time.sleep(0.05)


def _put_in_place(output: OutputFolder, failures: dict[int, str],
                  complete: Callable[[], object], caller: str = "save_experts") -> str | None:
    """On rank 0: ``complete`` the folder and move it into place, or remove it after any
    rank's failure (``failures``) or a failure of either step; the failure's message,
    else None."""
    try:
        if not failures:
            complete()
            output.commit()
            return None
    except Exception as err:  # reported to every rank
        if output.in_place:  # complete and in place: the failure came after the final move
            return f"{caller}: rank 0: {_describe(err, output.dst, left=True)}"
        failures = {0: _describe(err, output.dst)}
    output.discard()
    return f"{caller} failed, nothing was written: " + by_rank(failures)


def by_rank(failures: Mapping[int, str]) -> str:
    """``failures`` (rank -> message) in words, ranks with the same message together
    ("ranks 0, 1: ...; rank 3: ..."): a full disk fails every rank alike."""
    ranks: dict[str, list[int]] = {}
    for rank, message in sorted(failures.items()):
        ranks.setdefault(message, []).append(rank)
    return "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {message}"
                     for message, r in ranks.items())


def _complete(output: OutputFolder, outcomes: list, sidecars: SidecarSource | None) -> None:
    """Write the index of every rank's tensors and copy the sidecar files."""
    weight_map: dict[str, str] = {}
    tensors: dict[str, TensorPlan] = {}
    for _, mapping, planned in outcomes:
        weight_map.update(mapping)
        tensors.update({t.name: t for t in planned})
    write_index(output.folder, list(tensors.values()), weight_map)
    _copy_sidecars(output, sidecars)


def _copy_sidecars(output: OutputFolder, sidecars: SidecarSource | None) -> None:
    """Copy the non-weight files (config.json, tokenizer, ...) of the checkpoint
    ``sidecars`` names (``SidecarSource.sidecars``)."""
    if sidecars is not None:
        output.copy_in(list(sidecars.sidecars))


def _describe(err: BaseException, path: Path, left: bool = False) -> str:
    """A failure's message: a file-system error of the destination says what to do (and,
    with ``left``, that the output was put in place before it)."""
    mapped = output_error(err, path, left) if isinstance(err, OSError) else None
    return str(mapped or err)
