"""Loading a whole checkpoint onto a 2-D (fsdp, ep) device mesh, each byte read once.

Every tensor a rank holds is one of three kinds:

- a grouped expert tensor: ``Shard(0)`` over the "ep" dimension, replicated over the FSDP
  one (as ``load_experts`` gives it; a model runs its experts with expert parallelism,
  not FSDP);
- any other tensor: ``Shard(0)`` over the FSDP dimension, a DTensor on that 1-D submesh
  exactly as FSDP2's ``fully_shard`` exposes its parameters in ``model.state_dict()``
  (torch 2.13, ``_fsdp_param.py``: rows chunked by ``torch.chunk``'s rule, the last ranks
  holding fewer rows or none, the local tensor unpadded), so ``set_model_state_dict``
  on a ``fully_shard``-ed model takes it;
- a tensor the caller names in ``replicate`` (and every 0-d tensor, which FSDP2 cannot
  shard): a plain tensor, read whole on every rank.

Rows of a safetensors tensor are contiguous bytes, so a rank reads only the rows it is
given. Ranks that would hold the same rows split the reading: each rank of an EP group
reads its share of the FSDP rows its group needs, each rank of an FSDP group its share of
its EP rank's experts, and the group gathers the pieces. Summed over all ranks, the bytes
read are the checkpoint's (headers aside, and replicated tensors once per rank). Each rank
opens the files itself: every node needs the checkpoint on a shared file system or a copy
of its own, and no rank reads for another. The ranks compare what each would hold before
reading, and refuse to go on when they differ (a node's copy of another checkpoint,
other ``replicate`` patterns): their gathers would not match.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..checkpoint import Checkpoint
from ..dtypes import to_torch
from ..errors import MoekitError
from ..executors.device import read_plan
from ..gc_pauses import without_gc_pauses
from ..plan import Expr, Plan, Read, TensorPlan
from ..planner import build_plan, understand_checkpoint
from .ranges import chunk, expert_range, grouped_layout, rank_plan


@without_gc_pauses
def load_sharded(path: str | Path, device_mesh: DeviceMesh, layout: str = "transformers", *,
                 ep_dim: str = "ep", fsdp_dim: str = "dp", replicate: Collection[str] = (),
                 from_: str | None = None, config: str | Path | None = None
                 ) -> dict[str, torch.Tensor]:
    """This rank's share of the whole checkpoint at ``path`` on a 2-D ``device_mesh``
    whose dimensions are named ``fsdp_dim`` and ``ep_dim`` (see the module docstring for
    what each tensor becomes). Call it on every rank of the mesh.

    ``layout`` names the grouped layout of the expert tensors; ``replicate`` holds a name
    or glob pattern, or several, (``"lm_head.weight"``, ``"*.norm.weight"``) of
    destination tensors kept whole on every rank, e.g. those of modules left out of
    ``fully_shard`` (a pattern matching an expert tensor is refused). Every rank checks
    its part before reading, and tells the others whether it read it; if one cannot,
    every rank raises, the others a MoekitError naming it (none waits for another). The
    mesh spans every rank of the process group. Tensors lie on the CPU, or on the current
    CUDA device for a CUDA mesh. ``config`` names the model's config.json where the
    checkpoint has none (``Checkpoint.open``). Ranks that name the mesh's dimensions
    differently are refused, on every rank.
    """
    agree_on_arguments("load_sharded", dict(ep_dim=ep_dim, fsdp_dim=fsdp_dim))
    mesh = ShardedMesh(device_mesh, ep_dim, fsdp_dim, "load_sharded")
    try:
        checkpoint = Checkpoint.open(path, config)
        analysis = understand_checkpoint(checkpoint, from_)
        rank_plan(analysis, mesh.ep_size, mesh.ep_rank, layout, checkpoint.file_of)
        plan = build_plan(analysis, grouped_layout(layout), experts=mesh.experts_to_read(
            analysis.n_experts))
        patterns = _patterns(replicate, plan)
    except Exception as err:  # told to every rank: the others would wait in the next collective
        agree(err, "load_sharded")
        raise
    agree(None, "load_sharded")
    shares = {t.name: _Share.of(t, plan, mesh, patterns) for t in plan.tensors}
    agree_on_holdings({t.name: shares[t.name].held_as(t, analysis.n_experts)
                       for t in plan.tensors},
                      "load_sharded: the ranks would hold different state dicts (every rank "
                      "must read the same checkpoint, in the same layout, with the same "
                      "replicate patterns)")
    pieces = replace(plan, tensors=[TensorPlan(name, share.recipe)
                                    for name, share in shares.items()])
    try:
        read = read_plan(pieces, checkpoint, None if mesh.device.type == "cpu" else mesh.device)
    except Exception as err:  # told to every rank: the others would wait to gather from this one
        agree(err, "load_sharded")
        raise
    agree(None, "load_sharded")
    return {name: share.place(read.pop(name), mesh, analysis.n_experts)
            for name, share in shares.items()}


def _patterns(replicate: Collection[str], plan: Plan) -> tuple[str, ...]:
    """``replicate``'s patterns; one that matches an expert tensor is refused: experts are
    sharded over ep whatever it says, which a caller who named them does not expect."""
    patterns = (replicate,) if isinstance(replicate, str) else tuple(replicate)
    for pattern in patterns:
        experts = sorted(name for name in plan.expert_tensors if fnmatchcase(name, pattern))
        if experts:
            raise MoekitError(f"load_sharded: the replicate pattern {pattern!r} matches "
                              f"{experts[0]}, an expert tensor: expert tensors are Shard(0) "
                              "over the ep dimension (whole on every rank of a mesh whose "
                              "ep dimension has size 1); name only other tensors")
    return patterns


class ShardedMesh:
    """The two named dimensions of a (dp, ep) device mesh, and this rank's coordinates on
    them; ``caller`` names the function that was given the mesh, in errors."""

    def __init__(self, mesh: DeviceMesh, ep_dim: str, fsdp_dim: str, caller: str) -> None:
        if not isinstance(mesh, DeviceMesh):
            raise MoekitError(f"device_mesh is a {type(mesh).__name__}; expected a "
                              "torch.distributed DeviceMesh")
        names = mesh.mesh_dim_names or ()
        if ep_dim == fsdp_dim or sorted(names) != sorted((ep_dim, fsdp_dim)):
            raise MoekitError(f"{caller} needs a 2-D device mesh with the dimensions "
                              f"{fsdp_dim!r} (FSDP) and {ep_dim!r} (experts); this one has "
                              f"{names or mesh.ndim} (a dimension may have size 1)")
        if mesh.size() != dist.get_world_size():
            raise MoekitError(f"{caller} needs a mesh of every rank of the process group "
                              f"({dist.get_world_size()}); this one has {mesh.size()}")
        self.mesh = mesh
        self.ep_index = names.index(ep_dim)
        self.fsdp_mesh = mesh[fsdp_dim]
        self.ep_size, self.ep_rank = mesh.size(self.ep_index), mesh.get_local_rank(ep_dim)
        self.fsdp_size = mesh.size(names.index(fsdp_dim))
        self.fsdp_rank = mesh.get_local_rank(fsdp_dim)
        self.ep_group, self.fsdp_group = mesh.get_group(ep_dim), mesh.get_group(fsdp_dim)
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if mesh.device_type == "cuda" else torch.device("cpu"))

    def experts_to_read(self, n_experts: int) -> range:
        """The experts of this rank's EP range that it reads: its FSDP rank's chunk."""
        mine = expert_range(n_experts, self.ep_size, self.ep_rank)
        return mine[chunk(len(mine), self.fsdp_size, self.fsdp_rank)]

    @property
    def expert_placements(self) -> tuple:
        """Where experts lie on the mesh: ``Shard(0)`` over EP, replicated over FSDP."""
        return tuple(Shard(0) if i == self.ep_index else Replicate() for i in range(2))

    def expert_dtensor(self, local: torch.Tensor, n_experts: int) -> DTensor:
        """A rank's experts as ``Shard(0)`` over EP, replicated over FSDP."""
        return _from_local(local, self.mesh, list(self.expert_placements), n_experts)

    def fsdp_dtensor(self, local: torch.Tensor, rows: int) -> DTensor:
        """A rank's rows as FSDP2 exposes a parameter: ``Shard(0)`` over the FSDP submesh."""
        return _from_local(local, self.fsdp_mesh, [Shard(0)], rows)


def _from_local(local: torch.Tensor, mesh: DeviceMesh, placements: list, rows: int) -> DTensor:
    """A DTensor of global shape ``(rows, *local.shape[1:])``, given explicitly so that
    uneven splits are described correctly."""
    shape = torch.Size((rows, *local.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape,
                              stride=stride)


@dataclass(frozen=True)
class _Share:
    """What this rank reads of one destination tensor (``recipe``), and how the piece
    becomes what the rank holds: ``kind`` "expert" (gathered over FSDP, ``Shard(0)`` over
    EP), "whole" (kept as read) or "rows" (its FSDP rows: ``piece`` of them read, taken
    from the built tensor when ``built`` says the recipe makes all of it, then gathered
    over EP)."""

    recipe: Expr
    kind: str
    rows: int = 0
    held: slice | None = None
    piece: slice | None = None
    built: bool = False

    @classmethod
    def of(cls, tensor: TensorPlan, plan: Plan, mesh: ShardedMesh,
           replicate: tuple[str, ...]) -> "_Share":
        if tensor.name in plan.expert_tensors:
            return cls(tensor.recipe, "expert")
        if not tensor.shape or any(fnmatchcase(tensor.name, p) for p in replicate):
            return cls(tensor.recipe, "whole")
        rows = tensor.shape[0]
        held = chunk(rows, mesh.fsdp_size, mesh.fsdp_rank)
        part = chunk(held.stop - held.start, mesh.ep_size, mesh.ep_rank)
        piece = slice(held.start + part.start, held.start + part.stop)
        if not tensor.is_copy:
            return cls(tensor.recipe, "rows", rows, held, piece, built=True)
        recipe = Read(tensor.recipe.key, (piece,),
                      (piece.stop - piece.start, *tensor.shape[1:]), tensor.recipe.dtype)
        return cls(recipe, "rows", rows, held, piece)

    def held_as(self, tensor: TensorPlan, n_experts: int) -> str:
        """How the rank holds ``tensor``: dtype, global shape and placement."""
        rows, where = {"expert": (n_experts, "Shard(0) over ep"),
                       "rows": (self.rows, "Shard(0) over dp")}.get(self.kind, (None, "whole"))
        shape = list(tensor.shape) if rows is None else [rows, *tensor.shape[1:]]
        return f"{str(to_torch(tensor.dtype)).removeprefix('torch.')} {shape} {where}"

    def place(self, value: torch.Tensor, mesh: ShardedMesh, n_experts: int) -> torch.Tensor:
        """The tensor the rank holds, from ``value``, what it read."""
        if self.kind == "whole":
            return value
        if self.kind == "expert":
            mine = expert_range(n_experts, mesh.ep_size, mesh.ep_rank)
            return mesh.expert_dtensor(_gather(value.contiguous(), len(mine), mesh.fsdp_size,
                                               mesh.fsdp_group), n_experts)
        if self.built:
            value = value[self.piece].clone()
        held = self.held.stop - self.held.start
        return mesh.fsdp_dtensor(_gather(value.contiguous(), held, mesh.ep_size,
                                         mesh.ep_group), self.rows)


def _gather(piece: torch.Tensor, rows: int, size: int, group: dist.ProcessGroup
            ) -> torch.Tensor:
    """The ``rows`` rows a group of ``size`` ranks holds in ``torch.chunk`` pieces, this
    rank's being ``piece``: every rank's piece, padded to the largest, gathered and joined.
    The bytes are gathered, not the values: gloo has no float8 types, and a byte is what
    every backend moves."""
    if size == 1 or rows == 0:
        return piece
    counts = [chunk(rows, size, r) for r in range(size)]
    longest = max(s.stop - s.start for s in counts)
    row_bytes = math.prod(piece.shape[1:]) * piece.element_size()
    padded = piece.new_zeros((longest, row_bytes), dtype=torch.uint8)
    padded[:piece.shape[0]] = piece.contiguous().view(torch.uint8).reshape(piece.shape[0],
                                                                         row_bytes)
    pieces = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(pieces, padded, group=group)
    joined = torch.cat([p[:s.stop - s.start] for p, s in zip(pieces, counts)])
    return joined.view(piece.dtype).reshape(rows, *piece.shape[1:])


def agree_on_holdings(held: dict[str, str], problem: str, verb: str = "holds") -> None:
    """Raise on every rank ``problem`` and the first difference when the ranks' ``held``
    (tensor name -> how the rank holds it) differ, since each rank's collectives and
    writes follow its own. The ranks compare digests, and their descriptions only when
    those differ."""
    digest = hashlib.sha256(repr(sorted(held.items())).encode()).digest()
    digests: list = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) == 1:
        return
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, held)
    other = next(r for r, theirs in enumerate(digests) if theirs != digests[0])
    raise MoekitError(f"{problem}: {_difference(everyone[other], everyone[0], other, verb)}")


def agree_on_arguments(caller: str, arguments: dict[str, object]) -> None:
    """Raise on every rank, naming the first difference, when the ranks called ``caller``
    with different ``arguments``: each rank plans, reads and writes by its own, so ranks
    given two paths, formats or mesh dimensions would wait on each other or write apart.
    Called before a rank checks its arguments, so that one refusing them refuses them on
    every rank; nothing to agree on where no process group is set up (the caller's own
    checks refuse that)."""
    if not dist.is_initialized():
        return
    agree_on_holdings({name: repr(value) for name, value in arguments.items()},
                      f"{caller}: the ranks were called with different arguments", "passed")


def absolute(path: object) -> object:
    """``path`` as an absolute path where it is one (a str and a Path may name one
    folder), else as given, for ``agree_on_arguments``."""
    return os.path.abspath(path) if isinstance(path, (str, os.PathLike)) else path


def agree_on_state(state_dict: Mapping[str, object], problem: str) -> None:
    """Raise on every rank ``problem`` and the first difference when the ranks' state
    dicts differ in a key or in a tensor's dtype, global shape or placement: each rank
    plans the whole output from its own, and would write its bytes where the others did
    not plan them."""
    held = ({key: _held_as(value) for key, value in state_dict.items()}
            if isinstance(state_dict, Mapping) else {"": _held_as(state_dict)})
    agree_on_holdings(held, problem)


def _held_as(value: object) -> str:
    """How a rank holds a value: dtype, global shape and placement of a tensor."""
    if not isinstance(value, torch.Tensor):
        return f"a {type(value).__name__}"
    where = (f"{list(value.placements)} on {value.device_mesh.mesh_dim_names}"
             if isinstance(value, DTensor) else "whole")
    return f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)} {where}"


def _difference(theirs: dict[str, str], ours: dict[str, str], rank: int,
                verb: str = "holds") -> str:
    """The first difference between rank ``rank``'s holdings (what it ``verb``) and rank
    0's."""
    lacks, adds = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    if lacks:
        return f"rank {rank} lacks {lacks[0]}, which rank 0 holds"
    if adds:
        return f"rank {rank} holds {adds[0]}, which rank 0 lacks"
    key = next(k for k in sorted(ours) if ours[k] != theirs[k])
    return f"rank {rank} {verb} {key} as {theirs[key]}, rank 0 as {ours[key]}"


def agree(error: BaseException | None, caller: str) -> None:
    """Tell every rank whether each did a step (planned or read its part); raise on every
    rank when one did not (``failed_ranks``), so that no rank waits in a collective for
    one that gave up."""
    failed = failed_ranks(error)
    if failed and error is None:
        raise MoekitError(f"{caller} failed on another rank: " + "; ".join(
            f"rank {r}: {message}" for r, message in failed.items()))


def failed_ranks(error: BaseException | None) -> dict[int, str]:
    """Every rank's ``error`` in a step each rank takes, gathered on every rank: rank ->
    the error's message (else its type's name), for the ranks that failed."""
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, None if error is None else str(error) or
                           type(error).__name__)
    return {r: message for r, message in enumerate(outcomes) if message}
