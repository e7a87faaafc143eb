"""Worker functions of the whole-model sharded load tests (spawned, gloo on CPU)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

from moekit import MoekitError, convert_state_dict, load_sharded, samples
from moekit.sources import FileSource

from .conftest import load_all
from .ep_workers import finish

NAMES = ("dp", "ep")


def _init(rank: int, world: int, store: str, shape: tuple[int, int]):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    return init_device_mesh("cpu", shape, mesh_dim_names=NAMES)


@contextlib.contextmanager
def counting_reads() -> Iterator[list[int]]:
    """Count the bytes the file reader is asked for, in the one-element list it yields."""
    counted = [0]
    original = FileSource.read

    def read(self, region):
        counted[0] += self.block_bytes(region)
        return original(self, region)

    FileSource.read = read
    try:
        yield counted
    finally:
        FileSource.read = original


def held_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors a rank holds: the local part of each DTensor, each plain tensor."""
    return sum((v.to_local() if isinstance(v, DTensor) else v).nbytes for v in state.values())


def _fully_shard(model: torch.nn.Module, dp_mesh, replicate: tuple[str, ...]
                 ) -> torch.nn.Module:
    """FSDP2 over ``dp_mesh`` on every decoder layer and the root, leaving out the experts
    (they run with expert parallelism, which transformers' MoE module does not take as
    DTensors) and the parameters ``replicate``'s patterns match."""
    experts = [set(layer.mlp.experts.parameters()) if hasattr(layer.mlp, "experts") else set()
               for layer in model.model.layers]
    for layer, ignored in zip(model.model.layers, experts):
        fully_shard(layer, mesh=dp_mesh, ignored_params=ignored)
    kept = {p for name, p in model.named_parameters() if _matches(name, replicate)}
    fully_shard(model, mesh=dp_mesh, ignored_params=kept.union(*experts))
    return model


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def load_into_fsdp(rank: int, world: int, store: str, src: str, log_dir: str,
                   shape: tuple[int, int], model: tuple[str, dict],
                   replicate: tuple[str, ...]) -> None:
    """Load with load_sharded while counting the bytes read; check every non-expert DTensor
    against the one FSDP2 makes of the checkpoint's own model (``samples.build_model`` of
    ``model``'s family and config overrides); load the state strictly into a differently
    initialised fully_shard-ed model and compare its logits with the unsharded model's.
    Writes ``log_dir/rank.json``: bytes read and held, and logits equality."""
    family, overrides = model
    mesh = _init(rank, world, store, shape)
    with counting_reads() as counted:
        state = load_sharded(src, mesh, layout="transformers", replicate=replicate)

    ids = samples.sample_input(96)
    reference = samples.build_model(family, **overrides)
    with torch.no_grad():
        expected = reference(ids).logits
    oracle = _fully_shard(reference, mesh["dp"], replicate).state_dict()
    assert state.keys() == oracle.keys()
    for key, theirs in oracle.items():
        ours = state[key]
        if ".experts." in key:
            assert (ours.device_mesh, ours.placements) == (mesh, (Replicate(), Shard(0))), key
            assert torch.equal(ours.full_tensor(), theirs), key
            continue
        if _matches(key, replicate):
            assert type(ours) is torch.Tensor and torch.equal(ours, theirs), key
            continue
        assert isinstance(theirs, DTensor) and isinstance(ours, DTensor), key
        assert (ours.device_mesh, ours.placements) == (theirs.device_mesh, theirs.placements)
        assert (ours.shape, ours.stride()) == (theirs.shape, theirs.stride()), key
        assert ours.to_local().shape == theirs.to_local().shape, key
        assert torch.equal(ours.to_local(), theirs.to_local()), key

    loaded = _fully_shard(samples.build_model(family, seed=1, **overrides), mesh["dp"],
                          replicate)
    whole = {k: v.full_tensor() if ".experts." in k else v for k, v in state.items()}
    set_model_state_dict(loaded, whole, options=StateDictOptions(strict=True))
    with torch.no_grad():
        got = loaded(ids).logits
    Path(log_dir, f"{rank}.json").write_text(json.dumps(
        {"bytes": counted[0], "held": held_bytes(state),
         "logits_equal": torch.equal(got, expected)}))
    finish()


def load_expecting_error(rank: int, world: int, store: str, src: str, log_dir: str,
                         shape: tuple[int, int]) -> None:
    """load_sharded, then load_sharded naming an expert dimension the mesh lacks; write "ok"
    or the error messages to ``log_dir/rank.txt`` and ``log_dir/rank.mesh.txt``."""
    mesh = _init(rank, world, store, shape)
    for suffix, options in (("", {}), (".mesh", {"ep_dim": "tp"})):
        try:
            load_sharded(src, mesh, **options)
            outcome = "ok"
        except MoekitError as err:
            outcome = str(err)
        Path(log_dir, f"{rank}{suffix}.txt").write_text(outcome)
    finish()


def load_counting(rank: int, world: int, store: str, src: str, log_dir: str,
                  shapes: list[tuple[int, int]]) -> None:
    """load_sharded on a mesh of each (dp, ep) shape in turn, counting the bytes read;
    check each tensor against the checkpoint in the transformers layout
    (``convert_state_dict``): a DTensor's local rows are those ``torch.chunk`` gives its
    rank, over ep for an expert tensor, over dp for another (no collective: gloo has no
    float8). Writes
    ``log_dir/rank.json``: per shape, the bytes read and held."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    config = json.loads(Path(src, "config.json").read_text())
    reference = convert_state_dict(load_all(Path(src)), "hf", "transformers", config=config)
    figures = []
    for shape in shapes:
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=NAMES)
        with counting_reads() as counted:
            state = load_sharded(src, mesh, layout="transformers")
        assert state.keys() == reference.keys()
        for key, value in state.items():
            whole = reference[key]
            if not isinstance(value, DTensor):
                _assert_same(value, whole, key)
                continue
            dim = "ep" if value.device_mesh == mesh else "dp"
            assert value.placements[-1] == Shard(0) and value.shape == whole.shape, key
            parts, index = whole.chunk(mesh.size(NAMES.index(dim))), mesh.get_local_rank(dim)
            _assert_same(value.to_local(), parts[index] if index < len(parts) else whole[:0],
                         key)
        figures.append({"read": counted[0], "held": held_bytes(state)})
    Path(log_dir, f"{rank}.json").write_text(json.dumps(figures))
    finish()


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor, key: str) -> None:
    """Same dtype, shape and bytes (float8 has no elementwise equality on the CPU)."""
    assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape), key
    assert torch.equal(ours.reshape(-1).view(torch.uint8),
                       theirs.reshape(-1).view(torch.uint8)), key


def load_save_reload(rank: int, world: int, store: str, src: str, out: str,
                     shapes: list[tuple[int, int]]) -> None:
    """For each (dp, ep) shape: load_sharded (lm_head replicated: a plain tensor on every
    rank), save_sharded as safetensors and as DCP (counting the bytes each rank writes),
    then read both back with load_sharded and the DCP folder with DCP's own ``load`` too,
    each giving this rank's tensors of the first load, as do the DCP folders saved at the
    earlier shapes, read with load_sharded on this one. Writes ``out/rank.json``: per
    shape, the bytes this rank wrote."""
    import torch.distributed.checkpoint as dcp

    import moekit.expert_parallel.sharded_save as sharded_save
    from moekit import save_sharded

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    written = [0]
    pwrite = sharded_save._pwrite_all

    def counting(fd, tensor, offset):
        written[0] += tensor.nbytes
        pwrite(fd, tensor, offset)

    sharded_save._pwrite_all = counting
    figures = []
    for at, (dp, ep) in enumerate(shapes):
        mesh = init_device_mesh("cpu", (dp, ep), mesh_dim_names=NAMES)
        state = load_sharded(src, mesh, replicate="lm_head.weight")
        folder = Path(out, f"{dp}x{ep}")
        written[0] = 0
        save_sharded(state, folder / "safetensors", mesh, config_from=src,
                     max_shard_size="40KB")
        figures.append(written[0])
        save_sharded(state, folder / "dcp", mesh, format="dcp", config_from=src)
        for saved in ("safetensors", "dcp"):
            _assert_same_state(load_sharded(folder / saved, mesh, replicate="lm_head.weight"),
                               state)
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        dcp.load(target, checkpoint_id=folder / "dcp")
        _assert_same_state(target, state)
        for earlier in shapes[:at]:
            saved = Path(out, f"{earlier[0]}x{earlier[1]}", "dcp")
            _assert_same_state(load_sharded(saved, mesh, replicate="lm_head.weight"), state)
    Path(out, f"{rank}.json").write_text(json.dumps(figures))
    finish()


def _assert_same_state(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Same keys; each tensor of the same kind, placement and global shape, this rank's
    part byte for byte the same."""
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        other = theirs[key]
        assert type(value) is type(other), key
        if isinstance(value, DTensor):
            assert (value.device_mesh, value.placements, value.shape) == \
                (other.device_mesh, other.placements, other.shape), key
            value, other = value.to_local(), other.to_local()
        _assert_same(value, other, key)


def save_expecting_errors(rank: int, world: int, store: str, src: str, out: str) -> None:
    """save_sharded on a (1, world) mesh where rank 1's planning raises an error other than
    a MoekitError (``out/rank.bug.txt``), then where rank 1's write fails, then where rank 1's
    state dict holds fewer rows of an expert tensor than its placement gives it, then
    where rank 1 plans one write fewer, then where every rank's holds an expert tensor
    on the dp submesh; the outcomes go to ``out/rank.write.txt``,
    ``out/rank.placement.txt``, ``out/rank.gap.txt`` and ``out/rank.dp.txt``."""
    import datetime

    import moekit.expert_parallel.sharded_save as sharded_save

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=NAMES)
    state = load_sharded(src, mesh)
    plan = sharded_save._plan
    if rank == 1:
        def a_planner_bug(*args):
            raise RuntimeError("a planner bug")

        sharded_save._plan = a_planner_bug
    try:
        _save_outcome(state, Path(out, "bug"), mesh, Path(out, f"{rank}.bug.txt"))
    except RuntimeError as err:
        Path(out, f"{rank}.bug.txt").write_text(f"RuntimeError: {err}")
    sharded_save._plan = plan
    pwrite = sharded_save._pwrite_all
    if rank == 1:
        def broken(*args):
            raise OSError("disk full")

        sharded_save._pwrite_all = broken
    _save_outcome(state, Path(out, "written"), mesh, Path(out, f"{rank}.write.txt"))
    sharded_save._pwrite_all = pwrite
    key = "model.layers.0.mlp.experts.down_proj"
    sharded = state[key]
    if rank == 1:
        state[key] = DTensor.from_local(sharded.to_local()[1:], mesh, sharded.placements,
                                        run_check=False, shape=sharded.shape,
                                        stride=sharded.stride())
    _save_outcome(state, Path(out, "placed"), mesh, Path(out, f"{rank}.placement.txt"))
    state[key] = sharded
    if rank == 1:
        def losing_a_write(*args):
            job = plan(*args)
            job.writes.pop()
            return job

        sharded_save._plan = losing_a_write
    _save_outcome(state, Path(out, "gap"), mesh, Path(out, f"{rank}.gap.txt"))
    sharded_save._plan = plan
    key = "model.layers.1.mlp.experts.gate_up_proj"
    state[key] = DTensor.from_local(state[key].full_tensor(), mesh["dp"], [Shard(0)],
                                    run_check=False)
    _save_outcome(state, Path(out, "over-dp"), mesh, Path(out, f"{rank}.dp.txt"))
    finish()


def _save_outcome(state: dict, folder: Path, mesh, log: Path) -> None:
    from moekit import save_sharded

    try:
        save_sharded(state, folder, mesh)
        log.write_text("ok")
    except MoekitError as err:
        log.write_text(str(err))


def disagreeing_ranks(rank: int, world: int, store: str, src: str, out: str,
                      other_src: str) -> None:
    """On a (1, world) mesh, each case where rank 1 differs from the others: save_sharded
    of a state dict that lacks lm_head.weight on rank 1, then of one holding it whole on
    rank 1 and sharded elsewhere, then with another max_shard_size on rank 1 (and, alike on
    every rank, save_experts of what load_sharded gave); load_sharded
    told to replicate lm_head.weight on rank 1 only, then reading ``other_src`` on rank 1
    (another node's copy of another model), then with the mesh's dimensions named the
    other way round on rank 1. A
    collective left waiting times out (a minute) rather than hanging the test. Writes
    ``out/rank.json``: case -> "ok" or the error message."""
    import datetime

    from moekit import save_experts, save_sharded

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=NAMES)
    state = load_sharded(src, mesh)
    whole = state["lm_head.weight"].full_tensor()
    cases = {"missing": {k: v for k, v in state.items() if rank != 1 or k != "lm_head.weight"},
             "placement": {**state, **({"lm_head.weight": whole} if rank == 1 else {})}}
    outcomes = {}
    for case, held in cases.items():
        outcomes[case] = _outcome(lambda: save_sharded(held, Path(out, case), mesh))
    outcomes["save-experts"] = _outcome(lambda: save_experts(state, Path(out, "experts"), mesh))
    outcomes["shard-size"] = _outcome(lambda: save_sharded(
        state, Path(out, "shard-size"), mesh, max_shard_size="20KB" if rank == 1 else "5GB"))
    replicated = "lm_head.weight" if rank == 1 else ()
    outcomes["load-replicate"] = _outcome(lambda: load_sharded(src, mesh, replicate=replicated))
    outcomes["load-copy"] = _outcome(lambda: load_sharded(other_src if rank == 1 else src, mesh))
    dims = dict(ep_dim="dp", fsdp_dim="ep") if rank == 1 else {}
    outcomes["load-dims"] = _outcome(lambda: load_sharded(src, mesh, **dims))
    Path(out, f"{rank}.json").write_text(json.dumps(outcomes))
    finish()


def _outcome(step) -> str:
    """"ok", or the message of the MoekitError ``step`` raised."""
    try:
        step()
    except MoekitError as err:
        return str(err)
    return "ok"


def failing_loads(rank: int, world: int, store: str, src: str, out: str) -> None:
    """On a (1, world) mesh: load_sharded where every shard file changes (a later
    modification time) once rank 0 has read its part and before rank 1 reads its own, so
    that rank 1 alone fails reading; then one whose planning raises an error other than
    a MoekitError on rank 1 alone; then a load of the same folder; then one asked to
    replicate tensors by a pattern that matches expert tensors. A collective left waiting
    times out (a minute) rather than hanging the test. Writes ``out/rank.json``: case ->
    "ok" or the error message."""
    import datetime
    import os

    import moekit.expert_parallel.sharded as sharded

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=NAMES)
    read_plan = sharded.read_plan

    def read_after_a_change(*args, **kwargs):
        if rank != 1:
            read = read_plan(*args, **kwargs)
            dist.barrier()
            return read
        dist.barrier()
        for file in Path(src).glob("*.safetensors"):
            stat = file.stat()
            os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        return read_plan(*args, **kwargs)

    sharded.read_plan = read_after_a_change
    outcomes = {"changed": _outcome(lambda: load_sharded(src, mesh))}
    sharded.read_plan = read_plan
    build_plan = sharded.build_plan

    def a_bug_on_rank_1(*args, **kwargs):
        if rank == 1:
            raise RuntimeError("a planner bug")
        return build_plan(*args, **kwargs)

    sharded.build_plan = a_bug_on_rank_1
    try:
        outcomes["bug"] = _outcome(lambda: load_sharded(src, mesh))
    except RuntimeError as err:
        outcomes["bug"] = f"RuntimeError: {err}"
    sharded.build_plan = build_plan
    outcomes["again"] = _outcome(lambda: load_sharded(src, mesh))
    outcomes["replicate"] = _outcome(lambda: load_sharded(
        src, mesh, replicate=("lm_head.weight", "*.mlp.*")))
    Path(out, f"{rank}.json").write_text(json.dumps(outcomes))
    finish()
