"""Which experts a rank owns, and how its local rows become DTensors.

The rule is the one of ``torch.chunk`` and of DTensor's ``Shard(0)``: every rank but the
last ones gets ``ceil(E / n)`` consecutive experts, the rest go to the next rank, and the
last ranks may get fewer (E=10 on 4 ranks: 3, 3, 3, 1; E=5 on 4 ranks: 2, 2, 1, 0). Using
DTensor's own rule is what makes ``full_tensor()``, redistribution and DCP agree with the
rows every rank holds; NeMo AutoModel's balanced rule (3, 3, 2, 2) does not, which is why
its uneven DTensors fail. Loading, saving and DTensor metadata all use this one rule.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..errors import MoekitError

EP_DIM_NAME = "ep"


def expert_range(n_experts: int, ep_size: int, ep_rank: int) -> range:
    """The contiguous experts rank ``ep_rank`` of ``ep_size`` owns (``torch.chunk`` rule)."""
    if not 0 < ep_size <= n_experts:
        raise MoekitError(f"cannot split {n_experts} experts over {ep_size} ranks "
                          "(need 1 <= ep_size <= n_experts)")
    if not 0 <= ep_rank < ep_size:
        raise MoekitError(f"rank {ep_rank} is not in an EP group of {ep_size}")
    per_rank = math.ceil(n_experts / ep_size)
    return range(min(ep_rank * per_rank, n_experts), min((ep_rank + 1) * per_rank, n_experts))


def ep_dim(mesh: DeviceMesh) -> int:
    """The mesh dimension experts are sharded over: the one named "ep", or the only one."""
    names = mesh.mesh_dim_names or ()
    if EP_DIM_NAME in names:
        return names.index(EP_DIM_NAME)
    if mesh.ndim == 1:
        return 0
    raise MoekitError(f"the device mesh has dimensions {names or mesh.ndim}; name the "
                      f"expert-parallel one {EP_DIM_NAME!r}")


def ep_coordinates(mesh: DeviceMesh) -> tuple[int, int]:
    """(EP group size, this process's rank in it)."""
    dim = ep_dim(mesh)
    return mesh.size(dim), mesh.get_local_rank(dim)


def shard_experts(local: torch.Tensor, mesh: DeviceMesh, n_experts: int) -> DTensor:
    """Wrap this rank's rows of a grouped expert tensor as a DTensor sharded ``Shard(0)``
    over the EP dimension and replicated over the others, with the global shape given
    explicitly (so that uneven splits are described correctly)."""
    dim = ep_dim(mesh)
    placements = [Shard(0) if i == dim else Replicate() for i in range(mesh.ndim)]
    shape = torch.Size((n_experts, *local.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)


def is_expert_shard(tensor: object, mesh: DeviceMesh) -> bool:
    """True for a DTensor sharded ``Shard(0)`` over the mesh's EP dimension."""
    if not isinstance(tensor, DTensor):
        return False
    return tensor.placements[ep_dim(mesh)] == Shard(0)
