"""The in-memory executor: plan -> dict of tensors; and the checks of what a caller hands
it (devices, state dict values), so that bad input is a MoekitError naming the key rather
than a torch error or a tensor without data."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

import torch

from ..errors import MoekitError
from ..plan import Plan, reads
from ..sources import DictSource, TensorSource
from .evaluate import KeepingStatistics, materialize


def run_plan(plan: Plan, source: TensorSource, device: torch.device | str | None = None,
             wrap_experts: Callable[[torch.Tensor], torch.Tensor] | None = None
             ) -> dict[str, torch.Tensor]:
    """Every tensor of ``plan``, the built ones made on ``device``; ``wrap_experts`` is
    applied to the routed-expert ones (e.g. to make them DTensors). Unchanged tensors are
    returned as the source gives them (the same objects, wherever they lie). Built tensors
    are new data outside autograd: a source that requires grad does not tie them into its
    graph."""
    device = checked_device(device)
    source = KeepingStatistics(source)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for tensor in plan.tensors:
            value = materialize(tensor.recipe, source, None if tensor.is_copy else device)
            if wrap_experts is not None and tensor.name in plan.expert_tensors:
                value = wrap_experts(value)
            out[tensor.name] = value
    return out


def run_on_state_dict(plan: Plan, state_dict: Mapping[str, torch.Tensor],
                      wrap_experts: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      label: str = "state dict") -> dict[str, torch.Tensor]:
    """``run_plan`` over an in-memory state dict: built tensors are made on the device
    their sources lie on (``build_device``), the others returned as they are."""
    _check_whole(plan, state_dict, label)
    return run_plan(plan, DictSource(state_dict), build_device(plan, state_dict, label),
                    wrap_experts)


def _check_whole(plan: Plan, state_dict: Mapping[str, torch.Tensor], label: str) -> None:
    """Refuse a DTensor among the tensors a plan reads regions of: its shape is the global
    one, its data only this rank's share. (Until ``torch.distributed.tensor`` is imported
    no DTensor exists, so a plain conversion does not pay for importing it.)"""
    dtensors = sys.modules.get("torch.distributed.tensor")
    if dtensors is None:
        return
    for tensor in plan.tensors:
        if tensor.is_copy:
            continue
        for read in reads(tensor.recipe):
            if isinstance(state_dict[read.key], dtensors.DTensor):
                raise MoekitError(
                    f"{label} tensor {read.key} is a DTensor (this rank's share of a tensor "
                    "sharded over a device mesh); a conversion reads whole tensors: use "
                    "ExpertAdapter(...).to_hf, which reads a rank's expert shards, or pass "
                    ".full_tensor()")


def checked_device(device: torch.device | str | None) -> torch.device | None:
    """``device`` as a torch.device; a MoekitError when torch does not know it, when this
    machine does not have it (``cuda:7`` on a machine with two GPUs or none), or when it is
    ``meta`` (whose tensors hold no data)."""
    if device is None:
        return None
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise MoekitError(f"device {device!r} is not a device torch knows ({err})") from None
    if found.type == "meta":
        raise MoekitError("device 'meta' holds no data: moekit reads and builds real tensors; "
                          "pass a device such as 'cpu' or 'cuda'")
    if found.type == "cpu":
        return found
    try:
        module = torch.get_device_module(found)
        count = module.device_count() if module.is_available() else 0
    except (RuntimeError, AttributeError):
        count = 0
    if count == 0 or (found.index is not None and found.index >= count):
        raise MoekitError(f"device {str(found)!r} is not on this machine: it has {count} "
                          f"{found.type} device{'' if count == 1 else 's'}")
    return found


def checked_state_dict(state_dict: object, label: str = "state dict",
                       allow_meta: bool = False) -> Mapping[str, torch.Tensor]:
    """``state_dict`` once every key is a string and every value a dense tensor of data (not
    on the ``meta`` device, unless ``allow_meta``, nor a FakeTensor, nor nested); a
    MoekitError names the first that is not."""
    if not isinstance(state_dict, Mapping):
        hint = " (pass model.state_dict())" if isinstance(state_dict, torch.nn.Module) else ""
        raise MoekitError(f"the {label} is a {type(state_dict).__name__}; expected a mapping "
                          f"of tensor names to tensors{hint}")
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise MoekitError(f"the {label} has a key {key!r} of type {type(key).__name__}; "
                              "tensor names are strings")
        if not isinstance(value, torch.Tensor):
            hint = " (torch.from_numpy makes one)" if type(value).__module__ == "numpy" else ""
            raise MoekitError(f"{label} entry {key} is a {type(value).__name__}, not a "
                              f"torch.Tensor{hint}")
        if value.is_meta and not allow_meta:
            raise MoekitError(f"{label} tensor {key} is on the meta device: it holds no data to "
                              "convert (load or materialise the weights first)")
        if _is_fake(value):
            raise MoekitError(f"{label} tensor {key} is a FakeTensor (torch's "
                              "FakeTensorMode): it holds no data to convert (make the state "
                              "dict outside the mode, from the loaded weights)")
        if value.is_nested:
            raise MoekitError(f"{label} tensor {key} is a nested tensor (torch.nested), whose "
                              "entries have shapes of their own; moekit moves the bytes of "
                              "dense tensors (torch.nested.to_padded_tensor, or torch.stack "
                              "of entries of one shape)")
        if value.layout is not torch.strided:
            raise MoekitError(f"{label} tensor {key} is a {value.layout} tensor; moekit moves "
                              "the bytes of dense tensors (call .to_dense() first)")
    return state_dict


def _is_fake(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a FakeTensor, or a tensor subclass (a DTensor) wrapping one:
    shapes and devices without data. A plain tensor or parameter never is (a parameter
    made of a FakeTensor is one), and until ``torch._subclasses.fake_tensor`` is imported
    no FakeTensor exists."""
    if type(tensor) is torch.Tensor or type(tensor) is torch.nn.Parameter:
        return False
    fake = sys.modules.get("torch._subclasses.fake_tensor")
    return fake is not None and bool(fake.is_fake(tensor))


def build_device(plan: Plan, state_dict: Mapping[str, torch.Tensor],
                 label: str = "state dict") -> torch.device | None:
    """The device the tensors a plan builds are read from (and so made on); when they read
    nothing (an expert-parallel rank's empty expert tensors), the state dict's device.
    Sources on several devices are refused, naming a key on each: which one the result
    belongs on is the caller's to say."""
    seen: dict[torch.device, str] = {}
    for tensor in plan.tensors:
        if tensor.is_copy:
            continue
        for read in reads(tensor.recipe):
            seen.setdefault(state_dict[read.key].device, read.key)
    if len(seen) > 1:
        listed = "; ".join(f"{key} on {device}" for device, key in seen.items())
        raise MoekitError(f"the {label}'s expert tensors lie on {len(seen)} devices ({listed}); "
                          "put them on one device first")
    return next(iter(seen), None) or next((t.device for t in state_dict.values()), None)
