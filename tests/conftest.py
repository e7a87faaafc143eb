"""Shared fixtures: tiny transformers checkpoints of every supported family, saved in
several shards, built once per test session."""

from __future__ import annotations

import hashlib
import multiprocessing
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moekit import samples

multiprocessing.set_forkserver_preload(
    ["torch", "torch.distributed.tensor", "torch.distributed.checkpoint",
     "torch.distributed.fsdp", "safetensors.torch", "transformers", "megatron.core.models.gpt"])
"""What the ranks of the multi-process tests import, imported once by the server they are
forked from (``ep_workers.spawn``) instead of by each: a rank then starts in a fraction of
a second, where importing these takes a CPU core five seconds."""

AT_ONCE = 5.0
"""CPU seconds within which an absurd input (10^8 experts, 10^6 layers, a mesh of 10^9
ranks) must be refused. Iterating over what such an input declares takes minutes of CPU,
while the refusal itself takes well under a second."""


@contextmanager
def answered_at_once() -> Iterator[None]:
    """Fail unless the block uses under AT_ONCE seconds of this process's CPU time. CPU
    time, not wall time: a busy machine stalls a process for seconds at times, which
    adds nothing to its CPU time, while a refusal that iterates burns it."""
    start = time.process_time()
    yield
    used = time.process_time() - start
    assert used < AT_ONCE, f"took {used:.2f} s of CPU time"


@pytest.fixture(scope="session", autouse=True)
def signals_at_their_defaults() -> None:
    """SIGHUP and SIGTERM at their default actions and SIGINT raising KeyboardInterrupt, as
    at a terminal, in the test process and so in every process it starts. A runner that
    starts the suite with them ignored (``nohup``, some CI agents, a shell without job
    control starting it in the background) would pass that on, and moekit rightly leaves
    an ignored signal ignored: the tests that send them would see nothing happen."""
    for signum, handler in ((signal.SIGHUP, signal.SIG_DFL), (signal.SIGTERM, signal.SIG_DFL),
                            (signal.SIGINT, signal.default_int_handler)):
        if signal.getsignal(signum) is signal.SIG_IGN:
            signal.signal(signum, handler)


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """family -> folder of a ``save_pretrained`` checkpoint in several shards."""
    root = tmp_path_factory.mktemp("families")
    return {family: samples.save_model(samples.build_model(family), root / family)
            for family in samples.MOE_FAMILIES}


@pytest.fixture(scope="session")
def family_models() -> dict[str, torch.nn.Module]:
    """family -> the transformers model its checkpoint was saved from (same seed)."""
    return {family: samples.build_model(family) for family in samples.MOE_FAMILIES}


@pytest.fixture
def dcp_built(monkeypatch) -> dict[str, int]:
    """Bytes of the tensors ``moekit.dcp`` builds while DCP writes them, filled in as a
    write runs: in all (``total``), the largest (``largest``) and the most alive at once
    (``live_peak``; DCP keeps a data file's tensors until the file is closed)."""
    import weakref

    from moekit import dcp as moekit_dcp

    built: list[tuple[weakref.ref, int]] = []
    figures = {"total": 0, "largest": 0, "live_peak": 0}
    materialize = moekit_dcp.materialize

    def tracked(recipe, source):
        tensor = materialize(recipe, source)
        live = sum(size for ref, size in built if ref() is not None)
        figures["live_peak"] = max(figures["live_peak"], live + tensor.nbytes)
        figures["total"] += tensor.nbytes
        figures["largest"] = max(figures["largest"], tensor.nbytes)
        built.append((weakref.ref(tensor), tensor.nbytes))
        return tensor

    monkeypatch.setattr(moekit_dcp, "materialize", tracked)
    return figures


@pytest.fixture
def qwen3(family_checkpoints, tmp_path) -> Path:
    """A private copy of the Qwen3-MoE sample that a test may damage."""
    import shutil

    return Path(shutil.copytree(family_checkpoints["qwen3_moe"], tmp_path / "qwen3"))


def load_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read with the safetensors library."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes."""
    return (a.dtype == b.dtype and a.shape == b.shape and
            torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (to show an input was left untouched)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (computed on the host)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().view(torch.uint8).numpy()
                          .tobytes()).hexdigest()


def pack_mxfp4(tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    """Replace, in place, GPT-OSS's grouped expert weights (``experts.gate_up_proj`` [E, in,
    out], ``experts.down_proj``) by random MXFP4 tensors as its Hub files hold them:
    ``*_blocks`` [E, out, in/32, 16] and ``*_scales`` [E, out, in/32] uint8 (exponents
    near 127, so the values stay finite and small)."""
    for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inputs, outputs = tensors.pop(key).shape
        tensors[key + "_blocks"] = torch.randint(0, 256, (experts, outputs, inputs // 32, 16),
                                                 generator=generator, dtype=torch.uint8)
        tensors[key + "_scales"] = torch.randint(122, 132, (experts, outputs, inputs // 32),
                                                 generator=generator, dtype=torch.uint8)
