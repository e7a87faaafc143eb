"""``moekit demo``: the main jobs on built-in tiny samples, end to end, in seconds."""

from __future__ import annotations

import importlib
import os
import tempfile
import time
from pathlib import Path

import torch

from .checkpoint import as_path
from .conversion import convert
from .errors import MoekitError
from .inspection import inspect
from .upcycling import UpcycleSpec, upcycle
from .verification import verify

GROUPED_LAYOUTS = ("nemo", "transformers", "vllm")


def run_demo(out: str | None = None) -> int:
    """Build samples, convert them across every layout and back, verify, upcycle a dense
    sample; print a report."""
    _require_transformers()
    from . import samples

    if out is not None:
        return _demo(as_path(out, "--out"), samples)
    with tempfile.TemporaryDirectory(prefix="moekit-demo-") as tmp:
        return _demo(Path(tmp), samples)


def _require_transformers() -> None:
    """Refuse, in one message, to run without a working transformers (an optional
    dependency, the ``demo`` extra)."""
    try:
        importlib.import_module("transformers")
    except Exception as err:  # a missing package, or one broken in any way on import
        raise MoekitError(f"moekit demo builds its samples with transformers, which cannot be "
                          f"imported ({type(err).__name__}: {err}); install it: "
                          "pip install 'moekit[demo]'") from err


DEMO_MARKER = ".moekit-demo"
"""The file that marks a folder as one ``moekit demo --out`` wrote (a rerun may reuse it)."""


def _prepare(root: Path) -> None:
    """Make ``root`` the demo's folder: it must be new, empty, or one an earlier demo
    wrote, since the demo writes and replaces its sample checkpoints there."""
    if root.is_dir():
        entries = sorted(p.name for p in root.iterdir())
        if entries and DEMO_MARKER not in entries:
            shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
            raise MoekitError(f"--out {root} already holds files ({shown}); the demo writes and "
                              "replaces sample checkpoints there: choose a new or empty folder")
    elif os.path.lexists(root):
        raise MoekitError(f"--out {root} exists and is not a folder; choose a new folder for "
                          "the samples")
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / DEMO_MARKER).write_text("sample checkpoints written by moekit demo\n")
    except OSError as err:
        raise MoekitError(f"cannot make --out {root}: {err.strerror or err}"
                          + (f" ({err.filename})" if err.filename else "")) from err


ROUND_TRIPS = (
    ("qwen3_moe", "per-expert tensors on disk"),
    ("llama4_text", "experts grouped on disk, [E, in, out]"),
)
"""The sample families the demo converts across every layout and back: one whose Hub files
hold a tensor per expert, one whose files already hold them grouped."""


def _demo(root: Path, samples) -> int:
    _prepare(root)
    start = time.perf_counter()
    print(f"moekit demo: samples in {root}\n")
    failures = sum(_demo_round_trips(root, samples, family, note)
                   for family, note in ROUND_TRIPS)
    failures += _demo_upcycle(root, samples)
    print(f"\n{'all checks passed' if not failures else f'{failures} check(s) FAILED'} "
          f"in {time.perf_counter() - start:.1f}s")
    return 0 if not failures else 1


def _demo_round_trips(root: Path, samples, family: str, note: str) -> int:
    """Save a tiny ``family`` model as transformers does, convert it into every grouped
    layout and back to ``hf``, and check the bytes, the logits and ``--to transformers``
    against the model's own ``state_dict()``; return the number of failed checks."""
    model = samples.build_model(family)
    src = samples.save_model(model, root / f"{family}-hf")
    print(f"  {family} ({note}):")
    print(inspect(src).render(), "\n")
    ids = samples.sample_input(model.config.vocab_size)
    reference = samples.logits(src, ids)
    failures = 0
    for layout in GROUPED_LAYOUTS:
        t0 = time.perf_counter()
        grouped = root / f"{family}-{layout}"
        convert(src, grouped, layout, max_shard_size="40KB", overwrite=True)
        back = root / f"{family}-{layout}-hf"
        convert(grouped, back, "hf", max_shard_size="40KB", overwrite=True)
        report = verify(src, back)
        same_logits = torch.equal(samples.logits(back, ids), reference)
        ok = report.equal and same_logits
        failures += not ok
        print(f"  hf -> {layout:<12} -> hf  {_mark(report.equal)} bytes identical  "
              f"{_mark(same_logits)} logits identical  ({time.perf_counter() - t0:.2f}s)")
    fused = _matches_state_dict(root / f"{family}-transformers", model)
    failures += not fused
    print(f"  --to transformers equals transformers' own state_dict(): {_mark(fused)}\n")
    return failures


def _demo_upcycle(root: Path, samples) -> int:
    """Upcycle the dense Llama sample three ways; return the number of failed checks."""
    model = samples.build_model("llama")
    dense = samples.save_model(model, root / "llama-dense")
    ids = samples.sample_input(model.config.vocab_size)
    reference = samples.logits(dense, ids)
    print(f"  upcycling the dense sample {dense.name} (logits vs. the dense model):")
    failures = 0
    for name, spec in (
            ("copy, 4 experts, top-2", UpcycleSpec(experts=4, top_k=2)),
            ("granular G=2, 8 experts, top-4", UpcycleSpec(experts=8, top_k=4, method="granular",
                                                           granularity=2)),
            ("shared expert + 4 experts, top-2", UpcycleSpec(experts=4, top_k=2,
                                                            shared_expert=True,
                                                            target="qwen2_moe"))):
        out = root / f"llama-upcycled-{name.split(',')[0].replace(' ', '-')}"
        result = upcycle(dense, out, spec, max_shard_size="40KB", overwrite=True)
        error = (samples.logits(out, ids) - reference).abs().max().item()
        ok = error < 1e-5
        failures += not ok
        print(f"  {name:<34} -> {result.target.family:<10} {_mark(ok)} max |diff| {error:.1e}")
    return failures


def _matches_state_dict(path: Path, model) -> bool:
    from safetensors.torch import load_file

    loaded: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        loaded.update(load_file(file))
    expected = model.state_dict()
    return loaded.keys() == expected.keys() and all(
        torch.equal(loaded[k], expected[k]) for k in expected)


def _mark(ok: bool) -> str:
    return "ok " if ok else "FAIL"
