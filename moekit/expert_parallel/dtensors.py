"""The expert-parallel dimension of a DeviceMesh, and DTensors of a rank's expert rows
(``Shard(0)`` over that dimension, by the rule of ``ranges``)."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..errors import MoekitError

EP_DIM_NAME = "ep"


def ep_dim(mesh: DeviceMesh) -> int:
    """The mesh dimension experts are sharded over: the one named "ep", or the only one."""
    if not isinstance(mesh, DeviceMesh):
        raise MoekitError(f"device_mesh is a {type(mesh).__name__}; expected a "
                          "torch.distributed DeviceMesh")
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
