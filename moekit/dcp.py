"""torch.distributed.checkpoint folders: a sink that writes a plan as one DCP checkpoint
(``.metadata`` and several ``.distcp`` files), streaming.

DCP plans a save from the state dict's shapes and dtypes alone and asks its planner for
a tensor's data only when it writes that tensor: torch 2.13's ``FileSystemWriter``
resolves the items of a file one at a time (``_SerialCpuLoader``, one writer thread;
with an accelerator present, ``_OverlappingCpuLoader`` resolves at most 10 MB ahead).
So the state dict handed to ``dcp.save`` holds tensors on the meta device (shape and
dtype, no data), and the planner builds each tensor from its recipe when DCP asks for
it: one tensor in memory at a time, whatever the model's size. The writer puts the
tensors, in the plan's order, into ``.distcp`` files of at most the shard size (a
larger tensor gets a file alone), all described by one ``.metadata``. One process
writes, without a process group (``no_dist``).
"""

from __future__ import annotations

import queue
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem
from torch.distributed.checkpoint.storage import WriteResult

from .dtypes import to_torch
from .executors.evaluate import KeepingStatistics, materialize
from .executors.streaming import shard_tensors
from .plan import Plan
from .progress import progress
from .sources import TensorSource

DISTCP_SUFFIX = ".distcp"
"""The suffix of DCP's data files (``torch.distributed.checkpoint.filesystem``)."""


class DcpFolder:
    """A sink writing a plan as one ``torch.distributed.checkpoint`` folder whose data
    files hold at most ``max_shard_bytes`` each."""

    def __init__(self, max_shard_bytes: int) -> None:
        self.max_shard_bytes = max_shard_bytes

    def write(self, plan: Plan, source: TensorSource, folder: Path,
              show_progress: bool | None, finished: Callable[[Path], object]) -> None:
        """Write ``plan``'s tensors, built from ``source`` one at a time, as a DCP
        checkpoint in ``folder``; ``finished`` is called with every file once the
        checkpoint is complete (DCP writes ``.metadata`` last)."""
        shapes = {t.name: torch.empty(t.shape, dtype=to_torch(t.dtype), device="meta")
                  for t in plan.tensors}
        with progress(plan.total_bytes, f"{plan.src_layout} -> {plan.dst_layout}",
                      show_progress) as bar, warnings.catch_warnings():
            # torch 2.13 warns that it assumes one process whenever no process group is
            # initialised, no_dist or not: that is the intent here.
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.save(shapes, storage_writer=_ShardedWriter(folder, plan, self.max_shard_bytes),
                     no_dist=True,
                     planner=_RecipePlanner(plan, source, bar.update))
        for path in sorted(folder.iterdir()):
            finished(path)


class _RecipePlanner(DefaultSavePlanner):
    """DCP's default save planner, whose data for each tensor is built from the plan's
    recipe when DCP writes it."""

    def __init__(self, plan: Plan, source: TensorSource, done: Callable[[int], object]
                 ) -> None:
        super().__init__()
        self._tensors = {t.name: t for t in plan.tensors}
        self._source = KeepingStatistics(source)
        self._done = done

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        tensor = self._tensors[write_item.index.fqn]
        built = materialize(tensor.recipe, self._source)
        self._done(tensor.nbytes)
        return built


class _ShardedWriter(FileSystemWriter):
    """DCP's file-system writer, with the plan's tensors in order in files of at most
    ``max_shard_bytes`` (DCP's own writer puts a rank's tensors in one file per thread)."""

    def __init__(self, folder: Path, plan: Plan, max_shard_bytes: int) -> None:
        super().__init__(folder, sync_files=False, overwrite=False)
        self._shards = shard_tensors(plan.tensors, max_shard_bytes)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        items = {item.index.fqn: item for item in plan.items}
        files: queue.Queue = queue.Queue()
        for number, shard in enumerate(self._shards):
            name = f"{plan.storage_data.prefix}{number}{DISTCP_SUFFIX}"
            files.put((self.fs.concat_path(self.path, name), name,
                       [items[t.name] for t in shard]))
        # torch 2.13's FileSystemWriter.write_data fills this queue (path, file name,
        # items) with its own split and hands it to _write_data, which writes each file.
        return self._write_data(planner, files)
