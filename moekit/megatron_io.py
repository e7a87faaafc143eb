"""Megatron-Core ``torch_dist`` checkpoint folders: the sink writing a plan in the
``megatron`` layout (``moekit.layouts.megatron``) as one, and the reader that opens one as
a checkpoint whose tensors, under HF names, are recipes over its stored chunks.

A folder is what Megatron-LM's training loop loads: ``latest_checkpointed_iteration.txt``
naming the iteration, and ``iter_0000000/`` holding the DCP files (``.metadata`` and
``.distcp``), ``common.pt`` and ``metadata.json`` as megatron-core 0.16.1's
``dist_checkpointing.save`` writes them; moekit writes config.json and the other sidecars
beside the tracker file.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import (CONFIG_NAME, DCP_METADATA_NAME, FileIdentity, GivenConfig, Sidecar,
                         TensorInfo, config_in, member_file, read_config)
from .errors import MoekitError, printable
from .layouts.families import GENERIC_FAMILIES, family_of_model_type
from .layouts.megatron import (LAYERS, MEGATRON, MTP_COPIES, SPECS, Dimensions, Entry,
                               check_mtp_depths, check_mtp_layer, chunk_name, entry_of,
                               is_per_layer, mtp_depth)
from .plan import Concat, Expr, Plan, Read, region_of
from .sources import TensorSource

if TYPE_CHECKING:
    from .dcp import StoredTensor

TRACKER = "latest_checkpointed_iteration.txt"
ITERATION = 0
COMMON = "common.pt"
METADATA = "metadata.json"
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}
"""What megatron-core 0.16.1 writes to ``metadata.json`` for a ``torch_dist`` save."""
COMMON_STATE = {"checkpoint_version": 3.0, "iteration": ITERATION}
"""The common state (``common.pt``) beside the model, what Megatron-LM's training loop
reads to start fine-tuning from the folder (``load_checkpoint`` in
megatron/training/checkpointing.py, release core_v0.16.1): ``checkpoint_version``
(``state_dict.get('checkpoint_version', 0)``; 3.0 is what its ``save_checkpoint`` writes,
and below 2.0 it reorders legacy ``query_key_value`` weights) and ``iteration`` (read unless
``--finetune``, which starts at 0 whatever it holds). ``args`` is left out: Megatron-LM
reads it only without ``--finetune`` (``'args' in state_dict and not args.finetune``, and
``check_checkpoint_args`` would compare every model setting against it), and otherwise
takes tensor- and pipeline-parallel sizes of 1 for a checkpoint without it. Neither
optimizer nor RNG state is written, so Megatron-LM loads the folder with ``--finetune``
(or ``--no-load-optim --no-load-rng``); megatron-core's own sharded state-dict keys hold
the model."""
LOCAL_EXTRA_STATE = [None]
"""The ``_extra_state`` object of a local-spec linear layer: megatron-core saves the list
of its ranks' ``get_extra_state()`` values, None for a local layer."""
OPTIMIZER_PREFIX = "optimizer."
"""Keys of a training checkpoint's optimizer state, which moekit does not read."""
MAX_METADATA_JSON_BYTES = 2**16
"""Largest ``metadata.json`` read: megatron-core writes a few backend names there."""
MAX_TRACKER_BYTES = 64
"""Largest tracker file read: Megatron-LM writes an iteration number or ``release``."""
RELEASE = "release"
"""What the tracker file holds for a checkpoint saved outside training (Megatron-LM loads
its ``release/`` folder)."""


def iteration_dir(iteration: int) -> str:
    """Megatron-LM's name of an iteration's folder."""
    return f"iter_{iteration:07d}"


class MegatronFolder:
    """A sink writing a ``megatron`` plan as a Megatron-Core ``torch_dist`` folder whose
    data files hold at most ``max_shard_bytes`` each."""

    def __init__(self, max_shard_bytes: int) -> None:
        from .dcp import DcpFolder  # imports torch.distributed.checkpoint

        self.dcp = DcpFolder(max_shard_bytes)

    def check(self, plan: Plan) -> None:
        if plan.dst_layout != MEGATRON.name:
            raise MoekitError(f"--format megatron writes the megatron layout, not "
                              f"{plan.dst_layout}")

    def write(self, plan: Plan, source: TensorSource, folder: Path,
              show_progress: bool | None, finished: Callable[[Path], object]) -> None:
        iteration = folder / iteration_dir(ITERATION)
        iteration.mkdir()
        self.dcp.write(plan, source, iteration, show_progress, finished, extra_states(plan))
        from .dcp import save_object  # a full disk raised as the OSError it is

        save_object(COMMON_STATE, iteration / COMMON)
        (iteration / METADATA).write_text(json.dumps(BACKEND))
        (folder / TRACKER).write_text(str(ITERATION))
        for path in (iteration / COMMON, iteration / METADATA, iteration, folder / TRACKER):
            finished(path)


def extra_states(plan: Plan) -> dict[str, object]:
    """The ``_extra_state`` object of every linear layer (and layer, and expert) whose
    weight the plan writes, as a local-spec model saves it."""
    found = {}
    for tensor in plan.tensors:
        if tensor.chunk is not None:
            entry = entry_of(tensor.chunk.key)
            name = entry.extra_state(tensor.chunk) if entry is not None else None
            if name is not None:
                found[name] = list(LOCAL_EXTRA_STATE)
    return found


def is_megatron(path: Path) -> bool:
    """Whether ``path`` is a Megatron-Core checkpoint: a folder holding the tracker file,
    or an iteration folder holding ``metadata.json`` beside a DCP ``.metadata``."""
    return path.is_dir() and (os.path.lexists(path / TRACKER) or (
        os.path.lexists(path / METADATA) and os.path.lexists(path / DCP_METADATA_NAME)))


@dataclass(frozen=True)
class Headers:
    """What a Megatron-Core folder holds: its iteration folder, the folder of its sidecar
    files, its config.json, its stored chunks (each a run of a ``.distcp`` file, named
    ``chunk_name``), the model's tensors under HF names made from them, and what each
    ``.distcp`` file was before its archives were read (a file changed from then on
    differs from it when its bytes are read)."""

    iteration: Path
    top: Path
    config_file: Sidecar | None
    config: dict | None
    chunks: dict[str, TensorInfo]
    made: dict[str, Expr]
    identities: dict[str, FileIdentity]
    training_state: dict[str, int]
    """Entries of a training checkpoint's state, not read, by the first part of their key:
    the optimizer's tensors (``OPTIMIZER_PREFIX``) and objects other than ``_extra_state``
    (Megatron-LM's ``rng_state``)."""


def read_headers(path: Path, given: GivenConfig | None = None) -> Headers:
    """The headers of the checkpoint at ``path`` (the folder or one iteration's), read by
    ``given``'s config, else the config.json of the iteration folder or the folder above;
    every file read is first known to be a plain file inside the folder."""
    from .dcp import DISTCP_SUFFIX, read_stored  # imports torch, which .metadata refers to

    iteration = _iteration(path)
    top = iteration.parent if (iteration.parent / TRACKER).exists() else iteration
    _check_backend(iteration)
    identities = {data.name: FileIdentity.of(member_file(iteration, data.name).stat())
                  for data in sorted(iteration.glob(f"*{DISTCP_SUFFIX}"))}
    config_folder = iteration if (iteration / CONFIG_NAME).exists() else iteration.parent
    config, config_file = config_in(config_folder, given)
    stored, objects = read_stored(iteration, chunk_name)
    chunks = {info.key: info for tensor in stored.values() for _, info in tensor.chunks}
    return Headers(iteration, top, config_file, config, chunks,
                   hf_tensors(stored, config, str(iteration),
                              None if given is None else str(given.file.path)), identities,
                   _training_state(stored, objects))


def _training_state(stored: dict[str, "StoredTensor"], objects: list[str]) -> dict[str, int]:
    """How many optimizer tensors and objects that are not a layer's ``_extra_state`` the
    folder holds, by the first part of their key (an object's key is its name, then
    ``/shard_OFFSETS_SHAPE``)."""
    names = [*(k for k in stored if k.startswith(OPTIMIZER_PREFIX)),
             *dict.fromkeys(k.partition("/")[0] for k in objects)]  # an object once, not a shard
    return dict(Counter(name.partition(".")[0] for name in names
                        if not name.endswith("._extra_state")))


def _iteration(path: Path) -> Path:
    """The iteration folder the tracker file names, or ``path`` itself; the tracker is
    a plain file and the iteration folder a folder, both inside ``path``."""
    if not os.path.lexists(path / TRACKER):
        return path
    tracker = member_file(path, TRACKER)
    text = _read_bounded(tracker, MAX_TRACKER_BYTES).decode(errors="replace").strip()
    if text != RELEASE and not (text.isascii() and text.isdigit()):
        raise MoekitError(f"{printable(str(tracker))} holds {printable(text)!r}, neither an "
                          f"iteration number nor {RELEASE!r}")
    folder = path / (RELEASE if text == RELEASE else iteration_dir(int(text)))
    if not folder.is_dir():
        raise MoekitError(f"{printable(str(tracker))} names {printable(text)}, but "
                          f"{printable(str(folder))} is not a folder")
    if folder.resolve().parent != path.resolve():
        raise MoekitError(f"{printable(str(folder))} leads to "
                          f"{printable(str(folder.resolve()))}, outside the checkpoint folder; "
                          "moekit reads only files inside the checkpoint")
    return folder


def _read_bounded(file: Path, limit: int) -> bytes:
    """The bytes of ``file``, refused naming it when it holds more than ``limit``."""
    shown = printable(str(file))
    try:
        with open(file, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as err:
        raise MoekitError(f"cannot read {shown}: {err.strerror or err}") from err
    if len(data) > limit:
        raise MoekitError(f"{shown} holds more than {limit:,} bytes, more than Megatron-Core "
                          "writes there")
    return data


def _check_backend(iteration: Path) -> None:
    """Refuse an iteration folder whose ``metadata.json`` (read as every JSON file of a
    checkpoint is) names another backend than ``torch_dist`` (megatron-core's older
    ``zarr``), or is missing."""
    shown = printable(str(iteration / METADATA))
    if os.path.lexists(iteration / METADATA) and \
            member_file(iteration, METADATA).stat().st_size > MAX_METADATA_JSON_BYTES:
        raise MoekitError(f"{shown} holds more than {MAX_METADATA_JSON_BYTES:,} bytes, more "
                          "than Megatron-Core writes there")
    backend = read_config(iteration, METADATA)
    if backend is None:
        raise MoekitError(f"{shown} does not exist; a Megatron-Core checkpoint's iteration "
                          "folder holds one")
    found = backend.get("sharded_backend")
    if found != BACKEND["sharded_backend"]:
        raise MoekitError(f"{shown} names sharded backend {printable(repr(found))}; moekit "
                          "reads Megatron-Core's torch_dist checkpoints")


def hf_tensors(stored: Mapping[str, "StoredTensor"], config: Mapping | None, source: str,
               config_source: str | None = None) -> dict[str, Expr]:
    """Every HF tensor of a Megatron-Core checkpoint's model (of either layer spec), each
    the recipe reading it from the stored chunks; a stored tensor that no entry names is
    refused. ``stored`` holds the tensors only: the ``_extra_state`` objects (``[None]``
    from a local-spec layer, Transformer Engine's FP8 metadata from a TE one) hold no
    weight and are not read. A multi-token-prediction layer's own embedding and output
    head (``MTP_COPIES``) are the main model's, read from the same chunks. Refusals of
    the config name ``config_source`` where given (a config the user named), else
    ``source``, the checkpoint."""
    dims = Dimensions.of(config, _experts(stored), config_source or source)
    family = family_of_model_type(config.get("model_type")) or GENERIC_FAMILIES[0]
    depths = _mtp_depths(stored, dims, source)
    per_layer = any(map(is_per_layer, stored))
    moe_layers = _moe_layers(stored, dims)
    entries = _of_spec(stored, {spec: [*dims.entries(per_layer, spec, moe_layers),
                                       *(entry for depth in depths
                                         for entry in dims.mtp_entries(depth, spec))]
                                for spec in SPECS}, source)
    named = {entry.key for entry in entries}
    unknown = [key for key in stored if key not in named and not key.startswith(OPTIMIZER_PREFIX)]
    if unknown:
        raise MoekitError(f"{source} holds {printable(unknown[0])}"
                          + (f" and {len(unknown) - 1} more tensors" if len(unknown) > 1 else "")
                          + ", which moekit has no HF name for (it reads the GPT models of "
                            "Megatron-Core's layout: see `moekit convert --help`)")
    made: dict[str, Expr] = {}
    for entry in entries:
        if entry.key not in stored:
            if not entry.optional:
                raise MoekitError(f"{source} has no {entry.key}, which every Megatron-Core "
                                  "GPT model holds")
            continue
        tensor = stored[entry.key]
        _check_stacked(tensor, entry, dims, source)
        blocks = _blocks(tensor, entry.axes, source)
        for index in dims.indices(entry):
            at = entry.stored_index(index)
            for key, (rows, parts) in zip(entry.hf_keys(family, index),
                                          _row_ranges(entry, tensor, dims, source)):
                pieces = [_region(tensor, at, start, start + rows, source) if blocks is None
                          else region_of(blocks, (*at, slice(start, start + rows)), tensor.key)
                          for start in parts]
                made[key] = pieces[0] if len(pieces) == 1 else Concat(tuple(pieces), dim=0)
    for depth in depths:
        check_mtp_layer(made, dims, depth, source)
        for copy, mains in MTP_COPIES:
            main = next(key for key in mains if key in made)
            made[f"model.layers.{dims.mtp_layer(depth)}.{copy}"] = made[main]
    return made


def _mtp_depths(stored: Mapping[str, "StoredTensor"], dims: Dimensions, source: str
                ) -> list[int]:
    """The multi-token-prediction layers the stored tensors hold; refused naming a tensor
    of one that config.json does not declare (``num_nextn_predict_layers``), whose HF
    layer would follow the layers the config gives, or of one without the layers before
    it (``check_mtp_depths``)."""
    held: dict[int, str] = {}
    for key in sorted(stored):
        depth = mtp_depth(key)
        if depth is not None:
            held.setdefault(depth, key)
    undeclared = sorted(depth for depth in held if depth >= dims.mtp)
    if undeclared:
        raise MoekitError(f"{source} holds {printable(held[undeclared[0]])}, of multi-token-"
                          f"prediction layer {undeclared[0]}, but config.json's "
                          f"num_nextn_predict_layers declares {dims.mtp} such layers")
    check_mtp_depths(held, dims, source)
    return sorted(held)


def _moe_layers(stored: Mapping[str, "StoredTensor"], dims: Dimensions) -> set[int]:
    """The decoder layers holding routed experts: those of each layer's own expert keys,
    every layer where the experts are stacked over the layers."""
    found: set[int] = set()
    for key in stored:
        entry = entry_of(key) if key.startswith(LAYERS) else None
        if entry is not None and entry.stacked == 2:
            found.update(range(dims.layers) if entry.layer is None else (entry.layer,))
    return found


def _of_spec(stored: Mapping[str, "StoredTensor"], entries: Mapping[str, list[Entry]],
             source: str) -> list[Entry]:
    """The entries (by layer spec, ``SPECS``) of the spec whose keys the stored tensors
    have: the Transformer Engine one where some tensor has a key only it gives, the local
    one otherwise; refused naming a key of each where both are found."""
    keys = {spec: {entry.key for entry in found} for spec, found in entries.items()}
    only = {spec: sorted(key for key in stored if key in keys[spec]
                         and not any(key in keys[other] for other in SPECS if other != spec))
            for spec in SPECS}
    if only["te"] and only["local"]:
        raise MoekitError(f"{source} holds {printable(only['te'][0])}, as megatron-core's "
                          f"Transformer Engine layer spec names it, and "
                          f"{printable(only['local'][0])}, as its local layer spec does; "
                          "moekit refuses a checkpoint mixing the two namings")
    return entries["te" if only["te"] else "local"]


def _experts(stored: Mapping[str, "StoredTensor"]) -> int:
    """The routed experts of a layer: the last stacked axis of the experts' stored tensors
    (``_check_stacked`` then refuses a layer of another count); 0 for a dense model."""
    counts = [tensor.shape[entry.axes - 1] for key, tensor in stored.items()
              if (entry := entry_of(key)) is not None and entry.stacked == 2
              and len(tensor.shape) >= entry.axes]
    return max(counts, default=0)


def _check_stacked(tensor: "StoredTensor", entry: Entry, dims: Dimensions, source: str) -> None:
    """Refuse a stored tensor without rows after its stacked axes, or stacked over other
    layers and experts than config.json gives."""
    if len(tensor.shape) <= entry.axes:
        raise MoekitError(f"{source}: {entry.key} is {list(tensor.shape)}, where Megatron-Core "
                          f"stacks {entry.axes} axes before the tensor's own")
    expected = dims.stacked_shape(entry)
    if tensor.shape[:entry.axes] != expected:
        raise MoekitError(f"{source}: {entry.key} is {list(tensor.shape)}, stacked over "
                          f"{list(tensor.shape[:entry.axes])} where config.json gives "
                          f"{list(expected)} (layers, experts)")


def _row_ranges(entry: Entry, tensor: "StoredTensor", dims: Dimensions, source: str
                ) -> list[tuple[int, list[int]]]:
    """For each part of ``entry``: its rows per run and where each run starts along the
    first axis after the stacked ones (one run; for q, k and v one per query group)."""
    total = tensor.shape[entry.axes]
    if not entry.qkv:
        rows = total // len(entry.parts)
        if rows * len(entry.parts) != total:
            raise MoekitError(f"{source}: {entry.key} has {total} rows, which do not split "
                              f"into its {len(entry.parts)} parts")
        return [(rows, [j * rows]) for j in range(len(entry.parts))]
    per_group = dims.qkv_rows()
    group = sum(per_group)
    if total != dims.groups * group:
        raise MoekitError(f"{source}: {entry.key} has {total} rows where config.json's heads "
                          f"give {dims.groups} query groups of {group}")
    before = [sum(per_group[:j]) for j in range(3)]
    return [(rows, [g * group + before[j] for g in range(dims.groups)])
            for j, rows in enumerate(per_group)]


def _blocks(tensor: "StoredTensor", axis: int, source: str) -> Expr | None:
    """The recipe assembling ``tensor`` from its chunks (``chunks.assembled``) where they split
    a dimension after ``axis``, the rows of each stacked copy: a tensor-parallel save splits
    row-parallel layers (the attention output, the MLP's down projection) along their
    columns. None where every chunk holds whole rows, which ``_region`` reads range by
    range."""
    from .chunks import assembled

    rest = tensor.shape[axis + 1:]
    if all(tuple(offsets[axis + 1:]) == (0,) * len(rest) and info.shape[axis + 1:] == rest
           for offsets, info in tensor.chunks):
        return None
    return assembled([(tuple(offsets), tuple(info.shape), Read.whole(info.key, info))
                      for offsets, info in tensor.chunks if math.prod(info.shape)],
                     (0,) * len(tensor.shape), tensor.shape, f"{source}: {tensor.key}")


def _region(tensor: "StoredTensor", index: tuple[int, ...], start: int, stop: int,
            source: str) -> Expr:
    """Rows ``start:stop`` (along the axis after the stacked ones) of copy ``index`` of a
    stored tensor, read from the chunks that hold them."""
    axis = len(index)
    rest = tensor.shape[axis + 1:]
    parts, covered = [], start
    for offsets, info in sorted(tensor.chunks, key=lambda chunk: chunk[0]):
        if not all(o <= i < o + s for i, o, s in zip(index, offsets, info.shape)):
            continue
        first, count = offsets[axis], info.shape[axis]
        low, high = max(start, first), min(stop, first + count)
        if low >= high:
            continue
        if low < covered:
            raise MoekitError(f"{source}: {tensor.key} is saved in chunks that overlap at rows "
                              f"{low}:{min(high, covered)} of {list(index)}; moekit refuses to "
                              "choose between them")
        if low > covered:
            break
        local = tuple(i - o for i, o in zip(index, offsets))
        parts.append(Read(info.key, (*local, slice(low - first, high - first)),
                          (high - low, *rest), tensor.dtype))
        covered = high
    if covered != stop:
        raise MoekitError(f"{source}: the chunks of {tensor.key} do not hold rows "
                          f"{start}:{stop} of {list(index)}")
    return parts[0] if len(parts) == 1 else Concat(tuple(parts), dim=0)

