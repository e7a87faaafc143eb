"""Running merges: mergekit-moe YAML -> MoE checkpoint folder."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import Checkpoint
from ..conversion import run_job
from ..errors import MoekitError, printable
from ..plan import Read
from ..sources import FileSource
from .config import MergeConfig, load_merge_config
from .planner import BASE_TAG, ROUTER_TAG, MergePlan, Origins, build_merge_plan, check_sources

if TYPE_CHECKING:
    import torch


def plan_merge(config: MergeConfig | str | Path, seed: int = 0
               ) -> tuple[dict[str, Checkpoint], MergePlan]:
    """Read the headers of the base model and of every expert source, check that they
    share the base architecture, and plan the merge with ``seed`` (nothing is read or
    written). Returns the checkpoints by tag (``base``, ``expertN``, ``sharedN``) and the
    plan."""
    merge = config if isinstance(config, MergeConfig) else load_merge_config(config)
    by_name: dict[str, Checkpoint] = {}

    def checkpoint(name: str, role: str) -> Checkpoint:
        if name not in by_name:
            try:
                by_name[name] = Checkpoint.open(name)
            except MoekitError as err:
                raise MoekitError(f"{role}: {err}") from None
            if by_name[name].made:  # merge reads tensors by their stored names
                raise MoekitError(
                    f"{role}: {printable(name)} stores the model's tensors in pieces (a "
                    "Megatron-Core folder, or a DCP folder saved with tensor parallelism), "
                    "which merge does not read: convert it to HF files first (moekit convert "
                    "SRC DST --to hf) and merge those")
        return by_name[name]

    opened = {BASE_TAG: checkpoint(merge.base_model, "base_model")}
    opened.update({tag: checkpoint(s.source_model, f"{tag} (source_model)")
                   for tag, s in merge.sources.items()})
    base = opened[BASE_TAG]
    check_sources(base.tensors, base.model_type,
                  {tag: (str(c.named), c.tensors, c.model_type)
                   for tag, c in opened.items() if tag != BASE_TAG})
    return opened, build_merge_plan(base.tensors, base.config, merge, str(base.named), seed)


def merge(config: MergeConfig | str | Path, dst_path: str | Path, seed: int = 0,
          max_shard_size: int | str = "5GB", dry_run: bool = False, overwrite: bool = False,
          device: str = "cpu", show_progress: bool | None = None,
          format: str = "safetensors") -> MergePlan:
    """Write the MoE checkpoint a mergekit-moe configuration (a MergeConfig or its YAML
    file) describes: HF safetensors shards and index (or, with ``format="dcp"``, one
    torch.distributed.checkpoint folder), config.json of the target family, and the base
    model's other files (tokenizer, generation config). ``device``, the sources, the sink's
    options and the destination are checked first; then the router rows are computed
    (``moekit.merging.gates``; ``seed`` seeds the random modes and each ``drop_ratio``'s
    draws, ``device`` runs the base model for ``hidden``) and the tensors stream one at a
    time from their source checkpoints through ``conversion.run_job``, written
    atomically."""
    from ..executors.memory import checked_device

    checked_device(device)
    checkpoints, plan = plan_merge(config, seed)
    base = checkpoints[BASE_TAG]
    files = [f for c in checkpoints.values() for f in c.source_files()]
    named = [c.named for c in checkpoints.values()]  # the models the YAML names

    def open_sources() -> TaggedSource:
        return TaggedSource({tag: FileSource(c) for tag, c in checkpoints.items()},
                            plan.origins)

    def job(dry_run: bool) -> None:
        run_job(plan.plan, named, files, open_sources, dst_path, max_shard_size, overwrite,
                dry_run, show_progress, extra_files=base.extra_files(), config=plan.config,
                format=format)

    job(dry_run=True)  # the sink's options and the destination, before routers are computed
    if dry_run:
        return plan
    with tempfile.TemporaryDirectory(prefix="moekit-routers-") as scratch:
        checkpoints[ROUTER_TAG] = _write_routers(plan, checkpoints, Path(scratch), device,
                                                 show_progress)
        job(dry_run=False)
    return plan


def _write_routers(plan: MergePlan, checkpoints: dict[str, Checkpoint], folder: Path,
                   device: str, show_progress: bool | None) -> Checkpoint:
    """Compute every router (and shared-expert gate) row into a checkpoint in
    ``folder``, in the dtype of the tensors it is read as. With granularity G each
    source's row is repeated for its G routed experts, so that they get equal logits and
    top-k (k times G) picks whole sources, as ``upcycle``'s virtual-group router does."""
    import torch
    from safetensors.torch import save_file

    from ..dtypes import to_torch
    from .gates import EMBEDDINGS, gate_rows

    base = checkpoints[BASE_TAG]
    merge = plan.merge
    metas = {t.name: t for t in plan.plan.tensors}

    def embeddings() -> torch.Tensor:
        if EMBEDDINGS not in base.tensors:
            raise MoekitError(f"{base.named} has no {EMBEDDINGS}, which gate_mode cheap_embed "
                              "reads")
        with FileSource(base) as source:
            return source.read(Read.whole(EMBEDDINGS, base.tensors[EMBEDDINGS]))

    hidden = metas[next(iter(plan.routers))].shape[1]
    rows = gate_rows(merge.gate_mode, [*merge.experts, *merge.shared_experts], base.path,
                     len(plan.plan.moe_layers), hidden, plan.seed, embeddings, device,
                     show_progress)
    experts = len(merge.experts)
    tensors = {}
    for name, (index, shared) in plan.routers.items():
        part = (rows[index, experts:] if shared
                else rows[index, :experts].repeat_interleave(merge.granularity, dim=0))
        tensors[name] = part.to(to_torch(metas[name].dtype)).contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    return Checkpoint.open(folder)


class TaggedSource:
    """Serves a merge plan's reads from the file source of the checkpoint each reads."""

    def __init__(self, sources: dict[str, FileSource], origins: Origins) -> None:
        self.sources = sources
        self.origins = origins

    def _route(self, region: Read) -> tuple[FileSource, Read]:
        tag, key = self.origins.table[region.key]
        return self.sources[tag], region._replace(key=key)

    def read(self, region: Read) -> "torch.Tensor":
        source, inner = self._route(region)
        return source.read(inner)

    def block_bytes(self, region: Read) -> int:
        source, inner = self._route(region)
        return source.block_bytes(inner)

    def read_block(self, region: Read, buffer: memoryview) -> tuple[tuple[int, ...], tuple]:
        source, inner = self._route(region)
        return source.read_block(inner, buffer)

    def byte_range(self, region: Read) -> tuple[int, int, int] | None:
        source, inner = self._route(region)
        return source.byte_range(inner)

    def check_unchanged(self) -> None:
        for source in self.sources.values():
            source.check_unchanged()

    def __enter__(self) -> "TaggedSource":
        return self

    def __exit__(self, *exc: object) -> None:
        for source in self.sources.values():
            source.close()
