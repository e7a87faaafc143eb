"""Worker functions of the multi-process expert-parallel tests (spawned, gloo on CPU)."""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import multiprocessing.managers
import multiprocessing.util
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from moekit import (ExpertAdapter, MoekitError, convert_state_dict, expert_range, load_experts,
                    load_sharded, save_experts)
from moekit.expert_parallel.dtensors import shard_experts
from moekit.sources import FileSource

from .conftest import digest, load_all


def spawn(fn, world: int, folder: Path, *args, join: bool = True) -> list[int | None]:
    """Run ``fn(rank, world, store, *args)`` on ``world`` gloo ranks, rendezvousing through
    a store file of its own in ``folder``; with ``join=False`` a rank that fails does not
    stop the others, and each rank's exit code is returned. The ranks are forked from
    multiprocessing's fork server, which has imported torch and the rest once (conftest's
    ``set_forkserver_preload``): a fresh process for each, without the imports' cost."""
    store = folder / f"store-{next(_stores)}"
    context = mp.start_processes(fn, args=(world, str(store), *args), nprocs=world, join=join,
                                 start_method="forkserver")
    codes = []
    if context is not None:
        for process in context.processes:
            process.join()
            codes.append(process.exitcode)
    store.unlink(missing_ok=True)
    return codes


_stores = itertools.count()


def _init(rank: int, world: int, store: str) -> None:
    """Join the gloo group; a collective left waiting times out in a minute rather than
    hanging the test."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def finish() -> None:
    """Wait for every rank, tear the group down, and leave without finalizing Python.

    A rank that leaves while another still talks to it can abort the process in gloo's
    teardown, hence the barrier. After the barrier returns, gloo's worker thread may still
    be releasing the last reference to a tensor of an earlier collective; if that happens
    while the interpreter finalizes, Python ends the thread inside C++ and the process
    aborts with "terminate called without an active exception" (torch 2.13; pytorch PR
    179291 describes it). ``os._exit`` skips finalization, so the worker ends with 0."""
    dist.barrier()
    dist.destroy_process_group()
    leave()


def leave() -> None:
    """End this rank at once, with exit code 0, without waiting for the others (some are
    gone): see ``finish``. ``os._exit`` skips what Python's exit runs for
    ``multiprocessing`` (its ``atexit`` function), so that runs first: without it, the
    server of a manager, which megatron-core's asynchronous checkpoint writer starts at its
    first save, would run on, orphaned, and its socket would stay in /tmp."""
    sys.stdout.flush()
    sys.stderr.flush()
    multiprocessing.util._exit_function()
    os._exit(0)


def start_a_manager(rank: int, world: int, store: str, pids: str) -> None:
    """Start a ``multiprocessing`` manager (as megatron-core's asynchronous checkpoint
    writer does), note its server's pid and socket in ``pids``.RANK, and leave as every
    worker does."""
    _init(rank, world, store)
    # A server that takes over a second to stop (a busy machine) is otherwise killed, and
    # a killed server leaves its folder behind, whatever the rank did.
    patient = {"shutdown_timeout": 60} if sys.version_info >= (3, 11) else {}
    manager = multiprocessing.managers.SyncManager(ctx=multiprocessing.get_context("spawn"),
                                                   **patient)
    manager.start()
    queue = manager.Queue()
    Path(f"{pids}.{rank}").write_text(
        json.dumps({"pid": manager._process.pid, "address": manager.address}))
    queue.put(rank)
    finish()


def load_check_save(rank: int, world: int, store: str, src: str, out: str,
                    mesh_shape: tuple[int, ...], names: tuple[str, ...], layout: str) -> None:
    """Load this rank's experts, check rows and full_tensor(), save back to ``out``."""
    _init(rank, world, store)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    ep = names.index("ep") if "ep" in names else 0
    state = load_experts(src, mesh, layout=layout)
    reference = convert_state_dict(load_all(Path(src)), "hf", layout)
    assert state.keys() == reference.keys()
    n_experts = next(v.shape[0] for v in state.values() if isinstance(v, DTensor))
    mine = expert_range(n_experts, mesh.size(ep), mesh.get_local_rank(ep))
    grouped = [k for k, v in state.items() if isinstance(v, DTensor)]
    assert len(grouped) == 2 * 3
    for key, value in state.items():
        if isinstance(value, DTensor):
            assert value.shape == reference[key].shape
            assert torch.equal(value.to_local(), reference[key][mine.start:mine.stop])
            assert torch.equal(value.full_tensor(), reference[key])
        else:
            assert torch.equal(value, reference[key])
    _check_adapter(state, Path(src), mesh, layout, mine, n_experts)
    save_experts(state, out, mesh, layout=layout, config_from=src)
    finish()


def load_by_config(rank: int, world: int, store: str, src: str, config: str,
                   reference: str) -> None:
    """Load this rank's share of ``src`` (which has no config.json) by ``config``, with
    load_experts on a 1-D mesh and load_sharded on a (dp, ep) one, each whole tensor equal
    to the one ``reference`` (the same model, with its config) gives."""
    _init(rank, world, store)
    ep = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    dp_ep = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "ep"))
    for loaded, layout in ((load_experts(src, ep, layout="nemo", config=config), "nemo"),
                           (load_sharded(src, dp_ep, config=config), "transformers")):
        expected = convert_state_dict(load_all(Path(reference)), "hf", layout)
        assert loaded.keys() == expected.keys()
        for key, value in loaded.items():
            whole = value.full_tensor() if isinstance(value, DTensor) else value
            assert torch.equal(whole, expected[key]), key
    finish()


def _check_adapter(state: dict, src: Path, mesh, layout: str, mine: range,
                   n_experts: int) -> None:
    """The in-memory adapter with a mesh gives what load_experts gives, and back."""
    hf = load_all(src)
    adapter = ExpertAdapter(layout, family="qwen3_moe", n_experts=n_experts)
    from_memory = adapter.from_hf(hf, device_mesh=mesh)
    assert from_memory.keys() == state.keys()
    for key, value in state.items():
        other = from_memory[key]
        assert type(other) is type(value)
        if isinstance(value, DTensor):
            assert other.placements == value.placements and other.shape == value.shape
            assert torch.equal(other.to_local(), value.to_local())
    back = adapter.to_hf(from_memory)
    expert_keys = [k for k in back if ".experts." in k]
    assert sorted({int(k.split(".experts.")[1].split(".")[0]) for k in expert_keys}) == list(mine)
    assert all(torch.equal(back[k], hf[k]) for k in back)


def disk_full(*args, **kwargs):
    """Stands in for a write that fails, as on a full disk."""
    raise OSError("disk full")


def save_failing_on_rank_1(rank: int, world: int, store: str, src: str, out: str) -> None:
    """save_experts where rank 1's write fails: every rank must raise, nothing is left."""
    import moekit.expert_parallel.save as save_module

    _init(rank, world, store)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    state = load_experts(src, mesh)
    if rank == 1:
        save_module.write_shard = disk_full
    try:
        save_experts(state, out, mesh, config_from=src)
        raise AssertionError("save_experts should have failed")
    except MoekitError as err:
        assert "rank 1: disk full" in str(err)
    finish()


def save_with_a_state_dict_broken_on_rank_1(rank: int, world: int, store: str, src: str,
                                            out: str, log_dir: str) -> None:
    """save_experts where rank 1's state dict lacks a grouped tensor: its planning fails
    before any write, and every rank must raise (none waits for it); each writes its
    message to ``log_dir/rank.txt``."""
    _init(rank, world, store)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    state = load_experts(src, mesh)
    if rank == 1:
        del state["model.layers.0.mlp.experts.down_projs"]
    try:
        save_experts(state, out, mesh, config_from=src)
        outcome = "ok"
    except MoekitError as err:
        outcome = str(err)
    Path(log_dir, f"{rank}.txt").write_text(outcome)
    finish()


def save_differently_on_rank_1(rank: int, world: int, store: str, src: str, out: str,
                               log_dir: str, case: str) -> None:
    """save_experts where rank 1 differs from the others by ``case``: "experts" (its state
    dict lacks the last expert of every grouped tensor), "format" (dcp, not safetensors),
    "unknown-format" (DCP) or "path" (``out`` + "-1"); each writes its message to
    ``log_dir/rank.txt``."""
    _init(rank, world, store)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    state = load_experts(src, mesh)
    other = rank == 1
    if other and case == "experts":
        n_experts = state["model.layers.0.mlp.experts.down_projs"].shape[0]
        state = {key: shard_experts(value.to_local()[:-1], mesh, n_experts - 1)
                 if ".experts." in key else value for key, value in state.items()}
    try:
        formats = {"format": "dcp", "unknown-format": "DCP"}
        save_experts(state, f"{out}-1" if other and case == "path" else out, mesh,
                     format=formats.get(case, "safetensors") if other else "safetensors")
        outcome = "ok"
    except MoekitError as err:
        outcome = str(err)
    Path(log_dir, f"{rank}.txt").write_text(outcome)
    finish()


def save_with_a_planner_bug_on_rank_1(rank: int, world: int, store: str, src: str,
                                      log_dir: str) -> None:
    """save_experts where rank 1's planning raises an error other than a MoekitError: it
    reaches rank 1's caller, and every other rank raises naming it instead of waiting for
    rank 1 in the next collective (the group times out after 60 s otherwise); each rank
    writes its outcome to ``log_dir/rank.txt``."""
    import moekit.expert_parallel.save as save_module

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    state = load_experts(src, mesh)
    if rank == 1:
        def a_planner_bug(*args):
            raise RuntimeError("a planner bug")

        save_module.local_hf_plan = a_planner_bug
    try:
        save_experts(state, Path(log_dir, "saved"), mesh, config_from=src)
        outcome = "ok"
    except MoekitError as err:
        outcome = str(err)
    except RuntimeError as err:
        outcome = f"RuntimeError: {err}"
    Path(log_dir, f"{rank}.txt").write_text(outcome)
    finish()


def convert_dtensors_expecting_error(rank: int, world: int, store: str, src: str,
                                     log_dir: str) -> None:
    """convert_state_dict of load_experts' DTensors (a rank's shares), and from_hf with the
    mesh but no expert count of a state dict lacking the last expert: the error messages
    to ``log_dir/rank.txt`` and ``log_dir/rank.from_hf.txt``."""
    _init(rank, world, store)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    state = load_experts(src, mesh)
    try:
        convert_state_dict(state, "nemo", "hf")
        outcome = "ok"
    except MoekitError as err:
        outcome = str(err)
    Path(log_dir, f"{rank}.txt").write_text(outcome)
    mine = {k: v for k, v in load_all(Path(src)).items() if ".experts.9." not in k}
    try:
        ExpertAdapter("nemo").from_hf(mine, device_mesh=mesh)
        outcome = "ok"
    except MoekitError as err:
        outcome = str(err)
    Path(log_dir, f"{rank}.from_hf.txt").write_text(outcome)
    finish()


@contextlib.contextmanager
def experts_asked() -> Iterator[list[int]]:
    """Record, in the list it yields, each expert the file reader is asked for: from a
    per-expert key's index, or from a grouped tensor's first row."""
    asked: list[int] = []
    original = FileSource.read

    def read(self, region):
        match = re.search(r"\.experts\.(\d+)\.", region.key)
        if match:
            asked.append(int(match[1]))
        elif ".experts." in region.key:
            asked.append(region.region[0])
        return original(self, region)

    FileSource.read = read
    try:
        yield asked
    finally:
        FileSource.read = original


def load_recording_reads(rank: int, world: int, store: str, src: str, log_dir: str) -> None:
    """Load while recording which experts the reader is asked for."""
    _init(rank, world, store)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    with experts_asked() as asked:
        load_experts(src, mesh, layout="vllm")
    Path(log_dir, f"{rank}.json").write_text(json.dumps(sorted(set(asked))))
    finish()


def load_expecting_error(rank: int, world: int, store: str, src: str, log_dir: str) -> None:
    """Load; write "ok" or the error message to ``log_dir/rank.txt``."""
    _init(rank, world, store)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    try:
        load_experts(src, mesh)
        outcome = "ok"
    except MoekitError as err:
        outcome = str(err)
    Path(log_dir, f"{rank}.txt").write_text(outcome)
    finish()


def cuda_load(rank: int, world: int, store: str, src: str, result: str) -> None:
    """Load this rank's experts onto its GPU (NCCL) and save their checksums."""
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("ep",))
    state = load_experts(src, mesh, layout="nemo", device="cuda")
    sums = {k: digest(v.to_local() if isinstance(v, DTensor) else v) for k, v in state.items()}
    devices = {(v.to_local() if isinstance(v, DTensor) else v).device.type for v in state.values()}
    torch.save({"sums": sums, "devices": devices}, f"{result}.{rank}")
    finish()



def save_dcp_and_load(rank: int, world: int, store: str, src: str, out: str, layout: str,
                      log_dir: str) -> None:
    """Load this rank's experts, save them with ``save_experts(format="dcp")``, then load
    from the saved folder (``_load_dcp_like_safetensors``)."""
    _init(rank, world, store)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    state = load_experts(src, mesh, layout=layout)
    save_experts(state, out, mesh, layout=layout, config_from=src, format="dcp")
    asked = _load_dcp_like_safetensors(mesh, out, src, layout)
    Path(log_dir, f"{rank}.json").write_text(json.dumps([asked]))
    finish()


def save_tensor_parallel(rank: int, world: int, store: str, src: str, out: str,
                         writer: str = "dcp", fsdp: bool = False) -> None:
    """Save the HF checkpoint ``src`` with DCP's own ``save`` as tensor-parallel ranks hold
    it: every tensor of two or more dimensions a DTensor split along its columns
    (``Shard(1)``) over all ranks, the others replicated; or on four ranks a (dp, tp) mesh
    of 2 x 2 splitting the matrices' rows over dp too, and the other tensors' rows over dp
    (as FSDP does); with ``fsdp``, every tensor's rows over all ranks (FSDP2's
    ``Shard(0)``). ``writer`` "dcp" writes a DCP folder, "hf" safetensors files, one a rank
    (DCP's ``HuggingFaceStorageWriter`` with ``save_distributed``). Rank 0 copies
    ``config.json`` beside the folder's data."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    _init(rank, world, store)
    shape = (2, world // 2) if world == 4 and not fsdp else (world,)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp")[-len(shape):])
    split = {2: [Shard(0), Shard(1)] if len(shape) == 2 else [Shard(0 if fsdp else 1)],
             1: [Shard(0), Replicate()] if len(shape) == 2 else
             [Shard(0) if fsdp else Replicate()]}
    state = {key: distribute_tensor(value, mesh, split[min(value.dim(), 2)])
             if value.dim() and value.numel() > 1 else distribute_tensor(
                 value, mesh, [Replicate()] * len(shape))
             for key, value in load_all(Path(src)).items()}
    checkpoint = torch.distributed.checkpoint
    if writer == "hf":
        checkpoint.save(state, storage_writer=checkpoint.HuggingFaceStorageWriter(
            out, save_distributed=True))
    else:
        checkpoint.save(state, checkpoint_id=out)
    if rank == 0:
        Path(out, "config.json").write_bytes(Path(src, "config.json").read_bytes())
    finish()


def save_with_automodel(rank: int, world: int, store: str, src: str, out: str) -> None:
    """Load the HF checkpoint ``src`` into transformers' model, shard it with FSDP2 over
    all ranks (each decoder layer, then the whole model, as NeMo AutoModel's recipes do) and
    save it with NeMo AutoModel 0.7's own ``Checkpointer.save_model`` as it saves while
    training (``save_consolidated=False``): ``out/model`` holds one safetensors file a
    rank, and the config beside them in ``.hf_metadata``."""
    from nemo_automodel.components.checkpoint.checkpointing import Checkpointer
    from nemo_automodel.components.checkpoint.config import CheckpointingConfig
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    _init(rank, world, store)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    config = CheckpointingConfig(
        enabled=True, checkpoint_dir=str(Path(out).parent), model_save_format="safetensors",
        model_cache_dir=None, model_repo_id=src, save_consolidated=False, is_peft=False,
        model_state_dict_keys=list(model.state_dict()))
    Checkpointer(config, dp_rank=rank, tp_rank=0, pp_rank=0).save_model(model, out)
    finish()


def save_split_by_columns(rank: int, world: int, store: str, out: str) -> None:
    """DCP's own save of tensors split along their columns over all ranks (``Shard(1)``):
    one with no elements, one with fewer columns than ranks (some ranks hold none), one
    split unevenly; rank 0 also saves them whole to ``out/../whole.pt``."""
    from torch.distributed.tensor import Shard, distribute_tensor

    _init(rank, world, store)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    seeded = torch.Generator().manual_seed(0)
    whole = {"empty": torch.empty(0, 4), "narrow": torch.randn(3, world - 1, generator=seeded),
             "uneven": torch.randn(5, 2 * world + 1, generator=seeded)}
    state = {key: distribute_tensor(value, mesh, [Shard(1)]) for key, value in whole.items()}
    torch.distributed.checkpoint.save(state, checkpoint_id=out)
    if rank == 0:
        torch.save(whole, Path(out).parent / "whole.pt")
    finish()


def save_lazy_views(rank: int, world: int, store: str, src: str, out: str, format: str,
                    log_dir: str) -> None:
    """``save_experts`` of a state dict whose tensors, experts' shards and others, are
    views whose bytes are not their values (``LAZY_VIEWS``); rank 0 saves the values
    (whole tensors) to ``log_dir/expected.pt``."""
    _init(rank, world, store)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    state = load_experts(src, mesh)
    for key, view in LAZY_VIEWS.items():
        value = state[key]
        if isinstance(value, DTensor):
            state[key] = DTensor.from_local(view(value.to_local()), mesh, value.placements,
                                            shape=value.shape, stride=value.stride())
        else:
            state[key] = view(value)
    expected = {key: (value.full_tensor() if isinstance(value, DTensor) else value)
                .resolve_conj().resolve_neg().contiguous() for key, value in state.items()}
    if rank == 0:
        torch.save(expected, Path(log_dir, "expected.pt"))
    save_experts(state, out, mesh, config_from=src, format=format)
    finish()


def _neg(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values, held negated in storage with torch's neg bit set."""
    return (-tensor)._neg_view()


def _conj_imag(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values as the imaginary part of a conjugate (neg bit set)."""
    return torch.complex(torch.zeros_like(tensor), -tensor).conj().imag


def _expanded(tensor: torch.Tensor) -> torch.Tensor:
    """Its first row, repeated by a stride of 0."""
    return tensor[:1].expand(tensor.shape)


def _transposed(tensor: torch.Tensor) -> torch.Tensor:
    """Its values, stored column-major."""
    return tensor.mT.contiguous().mT


LAZY_VIEWS = {
    "model.norm.weight": _neg,
    "model.layers.0.input_layernorm.weight": _conj_imag,
    "model.layers.0.post_attention_layernorm.weight": _expanded,
    "model.embed_tokens.weight": _transposed,
    "model.layers.0.mlp.experts.gate_and_up_projs": _neg,
    "model.layers.0.mlp.experts.down_projs": _conj_imag,
    "model.layers.1.mlp.experts.gate_and_up_projs": _expanded,
    "model.layers.1.mlp.experts.down_projs": _transposed,
}
"""Tensors of a Qwen3-MoE in the nemo layout, each made a view whose bytes differ from its
values (experts' grouped tensors on every rank's shard)."""


def save_dcp_failing_on_rank_1(rank: int, world: int, store: str, src: str, out: str,
                               log_dir: str) -> None:
    """``save_experts(format="dcp")`` where DCP's write fails on rank 1; each rank writes
    its outcome to ``log_dir/rank.txt``."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    _init(rank, world, store)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    state = load_experts(src, mesh)
    if rank == 1:
        FileSystemWriter.write_data = disk_full
    try:
        save_experts(state, out, mesh, config_from=src, format="dcp")
        outcome = "ok"
    except MoekitError as err:
        outcome = str(err)
    Path(log_dir, f"{rank}.txt").write_text(outcome)
    finish()


def load_dcp_like_safetensors(rank: int, world: int, store: str, dcp_sources: list[str],
                              st_src: str, layout: str, log_dir: str) -> None:
    """``_load_dcp_like_safetensors`` of each DCP folder; the experts read from each go to
    ``log_dir/rank.json``."""
    _init(rank, world, store)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    asked = [_load_dcp_like_safetensors(mesh, src, st_src, layout) for src in dcp_sources]
    Path(log_dir, f"{rank}.json").write_text(json.dumps(asked))
    finish()


def _load_dcp_like_safetensors(mesh, dcp_src: str, st_src: str, layout: str) -> list[int]:
    """Check that ``load_experts`` of a DCP folder gives what it gives from the safetensors
    checkpoint (same DTensors, same bytes); return the experts read from the folder."""
    expected = load_experts(st_src, mesh, layout=layout)
    with experts_asked() as asked:
        state = load_experts(dcp_src, mesh, layout=layout)
    assert state.keys() == expected.keys()
    for key, value in state.items():
        other = expected[key]
        assert type(value) is type(other), key
        if isinstance(value, DTensor):
            assert (value.placements, value.shape) == (other.placements, other.shape), key
            value, other = value.to_local(), other.to_local()
        assert value.dtype == other.dtype and torch.equal(value, other), key
    return sorted(set(asked))


def save_stopped(rank: int, world: int, store: str, src: str, out: str, log_dir: str,
                 save: str, format: str, victim: int, signum: int, handled: bool) -> None:
    """``save_experts`` (``save`` "experts", on an ep mesh) or ``save_sharded`` ("sharded",
    on a (1, world) mesh) to ``out``, with ``overwrite``, where rank ``victim`` sends
    itself ``signum`` once its first file is written; ``handled``: its handler raises
    KeyboardInterrupt, as the CLI's does (else the signal's default action). Each rank
    writes "ok", "interrupted" or the error's message to ``log_dir/rank.txt``."""
    _init(rank, world, store)
    if rank == victim:
        _signal_after_the_first_file(signum, save, format)
        if handled:
            signal.signal(signum, _raise_keyboard_interrupt)
    Path(log_dir, f"{rank}.txt").write_text(_save_outcome(world, src, out, save, format))
    if signum == signal.SIGKILL or not handled:
        leave()  # the victim is gone
    finish()


def save_killed(rank: int, world: int, store: str, src: str, out: str, log_dir: str,
                save: str, victim: int, step: str) -> None:
    """``save_experts`` or ``save_sharded`` as ``save_stopped`` runs it, where rank
    ``victim`` is killed (SIGKILL) while it plans its part (``step`` "planning") or once it
    has put the output in place (``step`` "commit", rank 0); the others write their
    outcome to ``log_dir/rank.txt``."""
    import moekit.expert_parallel.save as save_module
    import moekit.expert_parallel.sharded_save as sharded_save
    from moekit.output import OutputFolder

    _init(rank, world, store)
    if rank == victim:
        if step == "commit":
            module, name = OutputFolder, "commit"
        else:
            module, name = ((save_module, "local_hf_plan") if save == "experts"
                            else (sharded_save, "_plan"))
        original = getattr(module, name)

        def then_killed(*args, **kwargs):
            if step == "commit":
                original(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        setattr(module, name, then_killed)
    Path(log_dir, f"{rank}.txt").write_text(_save_outcome(world, src, out, save, "safetensors"))
    leave()  # the victim is gone


def save_to(rank: int, world: int, store: str, src: str, out: str, log_dir: str, save: str,
            format: str) -> None:
    """``save_experts`` or ``save_sharded`` as ``save_stopped`` runs it, no rank signalled;
    each rank writes its outcome to ``log_dir/rank.txt``."""
    _init(rank, world, store)
    Path(log_dir, f"{rank}.txt").write_text(_save_outcome(world, src, out, save, format))
    finish()


def _save_outcome(world: int, src: str, out: str, save: str, format: str) -> str:
    """Load ``src`` and save it to ``out`` with ``overwrite`` (``save`` "experts":
    ``save_experts`` on an ep mesh; "sharded": ``save_sharded`` on a (1, world) mesh);
    "ok", "interrupted" or the MoekitError's message."""
    from moekit import load_sharded, save_sharded

    if save == "experts":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
        state, run = load_experts(src, mesh), save_experts
    else:
        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "ep"))
        state, run = load_sharded(src, mesh), save_sharded
    try:
        run(state, out, mesh, config_from=src, format=format, overwrite=True)
    except MoekitError as err:
        return str(err)
    except KeyboardInterrupt:
        return "interrupted"
    return "ok"


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _signal_after_the_first_file(signum: int, save: str, format: str) -> None:
    """Send this process ``signum`` once the save has written its first file (a shard of
    ``save_experts``, the first bytes of ``save_sharded``, a DCP data file)."""
    import moekit.dcp as dcp_module
    import moekit.expert_parallel.save as save_module
    import moekit.expert_parallel.sharded_save as sharded_save

    if format == "dcp":
        module, name = dcp_module._DestinationFiles, "create_stream"
    elif save == "experts":
        module, name = save_module, "write_shard"
    else:
        module, name = sharded_save, "_pwrite_all"
    original = getattr(module, name)

    @contextlib.contextmanager
    def stream_then_signal(*args, **kwargs):
        with original(*args, **kwargs) as stream:
            yield stream
        os.kill(os.getpid(), signum)

    def write_then_signal(*args, **kwargs):
        original(*args, **kwargs)
        os.kill(os.getpid(), signum)

    setattr(module, name, stream_then_signal if format == "dcp" else write_then_signal)
