"""Property-based fuzz of damaged checkpoints: whatever is done to a small sharded
checkpoint's headers, bytes, index or config.json (fuzz_mutations), ``inspect``, ``plan``
and ``convert`` either succeed, and then ``verify`` and the conversion back agree byte for
byte, or exit 2 with one message; never a traceback, a hang, a changed input, a leftover
folder, an output after a failure, or a silent success on damage that must be refused.

CI runs a fixed, derandomised set of examples; ``MOEKIT_FUZZ_EXAMPLES=2000`` runs more.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import moekit
from moekit import samples
from moekit.cli import main

from .fuzz_mutations import (CONFIG, INDEX, ITEMSIZE, AddCopy, Base, CopyLayer, DropLayerExperts,
                             EditJson, HeaderBytes, Inapplicable, MoveOutside, Mutation, Retype,
                             mutations, read_header)

EXAMPLES = int(os.environ.get("MOEKIT_FUZZ_EXAMPLES", "100"))
SHARD_SIZE = "60KB"
"""Splits the Qwen3-MoE sample (about 100 KB of weights) into two shards and an index."""
GROUPED = ("nemo", "transformers", "vllm")
SECONDS_PER_COMMAND = 60
"""Far above the 0.1 s a command takes on this checkpoint, and above the seconds a busy
machine may stall a process for: more is a hang."""


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Base]:
    """Two-shard samples: Qwen3-MoE in the HF layout (``hf``) and converted to nemo
    (``nemo``); DeepSeek-V3 (a dense first layer, a shared expert, a score-correction
    bias) in the HF layout (``deepseek``)."""
    root = tmp_path_factory.mktemp("fuzz-bases")
    hf = samples.save_model(samples.build_model("qwen3_moe", num_hidden_layers=2, num_experts=4),
                            root / "hf", max_shard_size=SHARD_SIZE)
    moekit.convert(hf, root / "nemo", to="nemo", max_shard_size=SHARD_SIZE)
    deepseek = samples.save_model(samples.build_model("deepseek_v3", num_hidden_layers=2),
                                  root / "deepseek", max_shard_size="80KB")
    found = [Base.of(hf, "hf", GROUPED), Base.of(root / "nemo", "nemo", ("hf",)),
             Base.of(deepseek, "hf", GROUPED)]
    assert all(len(base.shards) == 2 for base in found)
    return {base.name: base for base in found}


def test_pristine_samples_convert_and_come_back_identical(bases, tmp_path):
    for base in bases.values():
        for target in base.targets:
            root = tmp_path / f"{base.name}-{target}"
            root.mkdir()
            assert run_example(base, [], target, root) == []


def test_the_judge_reports_every_broken_promise(bases, tmp_path, monkeypatch):
    """A CLI that breaks each promise once is caught each time (the fuzz can fail)."""
    def broken_main(args: list[str]) -> int:
        src = Path(args[1])
        if args[0] == "inspect":
            with open(src / CONFIG, "a") as f:
                f.write(" ")
            print("\x1b[2J")
            return 0
        if args[0] == "plan":
            raise KeyError("weight_map")
        (src.parent / ".out.moekit-1").mkdir()
        Path(args[2]).mkdir()
        print("moekit: error: one\nmoekit: error: two", file=sys.stderr)
        return 2

    monkeypatch.setattr(sys.modules[__name__], "main", broken_main)
    found = run_example(bases["hf"], [], "nemo", tmp_path)
    assert {(v.command, v.kind) for v in found} == {
        ("inspect", "changed input"), ("inspect", "control character"),
        ("plan", "traceback"), ("convert", "leftover"), ("convert", "messages"),
        ("convert", "output after failure")}


SHARD_1, SHARD_2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
_DOWN_1 = "model.layers.0.mlp.experts.1.down_proj.weight"
SEEDS = [
    # an expert numbered 999,999,999 / written 01 / in a layer written +0, beside the real ones
    *(("hf", [AddCopy(SHARD_1, _DOWN_1, SHARD_1, _DOWN_1.replace(old, new), True)], "nemo")
      for old, new in ((".1.", ".999999999."), (".1.", ".01."), (".0.", ".+0."))),
    # config.json: an expert count the shards contradict, one that is no integer, an absurd
    # layer count; a layer without experts; a layer beyond num_hidden_layers
    ("hf", [EditJson(CONFIG, "num_local_experts", 3)], "nemo"),
    ("hf", [EditJson(CONFIG, "num_local_experts", 4.0)], "nemo"),
    ("hf", [EditJson(CONFIG, "num_hidden_layers", 2**64)], "nemo"),
    ("hf", [DropLayerExperts(1, router=False)], "nemo"),
    ("hf", [CopyLayer(1, to=2)], "nemo"),
    # gate in BF16, up in F32
    ("hf", [Retype(SHARD_1, "model.layers.0.mlp.experts.1.gate_proj.weight", "BF16", (16, 32))],
     "nemo"),
    # 100,000,000 zero-size experts; a zero-size tensor whose other dims overflow int64
    ("nemo", [Retype(SHARD_1, "model.layers.0.mlp.experts.down_projs", "F32",
                     (100_000_000, 0, 32))], "hf"),
    ("nemo", [Retype(SHARD_1, "lm_head.weight", "F32", (0, 7, 2**62))], "hf"),
    # BOOL experts whose bytes are not all 0 or 1
    ("nemo", [Retype(SHARD_1, "model.layers.0.mlp.experts.gate_and_up_projs", "BOOL",
                     (4, 32, 32))], "hf"),
    # a header giving one tensor two shapes
    ("hf", [HeaderBytes(SHARD_1, "duplicate_key_differs")], "nemo"),
    # a shard reached through ../ in the index, config.json through a link out of the folder
    ("hf", [MoveOutside(SHARD_2, "relative")], "nemo"),
    ("hf", [MoveOutside(CONFIG, "symlink")], "nemo"),
    # a shared expert's weight that is a scalar
    ("deepseek", [Retype(SHARD_2, "model.layers.1.mlp.shared_experts.up_proj.weight", "F32", ())],
     "nemo"),
]
"""(base, damage, target) of the classes the fuzz has found: run before the drawn ones."""


@st.composite
def cases(draw, bases: dict[str, Base]) -> tuple[str, list[Mutation], str]:
    """A base's name, the damage done to it, the layout to convert it to."""
    base = bases[draw(st.sampled_from(sorted(bases)))]
    return base.name, draw(mutations(base)), draw(st.sampled_from(base.targets))


def test_damaged_checkpoints_convert_exactly_or_fail_with_one_message(bases, tmp_path):
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=cases(bases))
    def check(case):
        name, damage, target = case
        root = Path(tempfile.mkdtemp(dir=tmp_path))
        try:
            found = run_example(bases[name], damage, target, root)
        finally:
            shutil.rmtree(root)
        assert not found, "\n".join(map(str, found))

    for seed in reversed(SEEDS):
        check = example(seed)(check)
    check()


@dataclass
class Outcome:
    """What one CLI command did."""

    command: str
    code: int | None
    out: str
    err: str
    raised: str | None = None
    """``Type: message (innermost moekit frame)`` when an exception escaped ``main``."""


class Hang(BaseException):
    """A command ran past SECONDS_PER_COMMAND (BaseException: no handler of moekit's
    catches it)."""


def _on_alarm(signum, frame) -> None:
    raise Hang()


def run_cli(args: list[str]) -> Outcome:
    """Run ``moekit args`` in this process, its output captured and its time bounded."""
    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, SECONDS_PER_COMMAND)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(args)
        return Outcome(args[0], code, out.getvalue(), err.getvalue())
    except Hang:
        return Outcome(args[0], None, out.getvalue(), err.getvalue(),
                       f"hang: still running after {SECONDS_PER_COMMAND} s")
    except BaseException as exc:  # anything escaping main is a finding
        return Outcome(args[0], None, out.getvalue(), err.getvalue(), _describe(exc))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _describe(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/moekit/" in f.filename]
    where = f" at moekit/{frames[-1].filename.split('/moekit/')[-1]}:{frames[-1].lineno} " \
            f"in {frames[-1].name}" if frames else ""
    return f"{type(exc).__name__}: {str(exc)[:300]}{where}"


@dataclass(frozen=True)
class Violation:
    """One broken promise: which command, what kind, the details."""

    command: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.command}: {self.kind}: {self.detail}"


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def judge(outcome: Outcome) -> list[Violation]:
    """The promises every command keeps: exit 0 or 2 (1 for verify), never a traceback,
    exit 2 with exactly one message, no raw control characters printed."""
    found = []
    if outcome.raised:
        kind = "hang" if outcome.raised.startswith("hang") else "traceback"
        return [Violation(outcome.command, kind, outcome.raised)]
    if outcome.code not in (0, 1, 2) or (outcome.code == 1 and outcome.command != "verify"):
        found.append(Violation(outcome.command, "exit code", str(outcome.code)))
    if outcome.code == 2 and outcome.err.count("moekit: error:") != 1:
        found.append(Violation(outcome.command, "messages", f"{outcome.err[:300]!r}"))
    if outcome.code == 2 and "Traceback" in outcome.err:
        found.append(Violation(outcome.command, "traceback", outcome.err[-300:]))
    shown = _CONTROL.search(outcome.out + outcome.err)
    if shown:
        found.append(Violation(outcome.command, "control character",
                               f"{shown.group(0)!r} printed unescaped"))
    return found


def digest(root: Path, names: set[str]) -> dict[str, str]:
    """sha256 of every file (target of every link, name of every folder) under the
    top-level entries ``names`` of ``root``."""
    found = {}
    for name in names:
        top = root / name
        paths = [top] + (sorted(top.rglob("*")) if top.is_dir() and not top.is_symlink() else [])
        for path in paths:
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = "link " + os.readlink(path)
            elif path.is_dir():
                found[key] = "folder"
            else:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def read_tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """key -> (dtype, shape, bytes) of a checkpoint: the files its index names (every
    shard when it has none), checked by the safetensors library, their bytes taken at the
    header's offsets (numpy and torch cannot hold every shape a header may declare)."""
    try:
        files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    tensors = {}
    for name in files:
        with safe_open(str(folder / name), framework="numpy") as f:
            keys = set(f.keys())
        header, data = read_header(folder / name)
        for key in keys:
            start, end = header[key]["data_offsets"]
            tensors[key] = (header[key]["dtype"], tuple(header[key]["shape"]), data[start:end])
    return tensors


def _same_elements(src: Path, dst: Path) -> list[Violation]:
    """A conversion moves elements and never changes one: per dtype, the converted
    checkpoint holds the same multiset of element values as the source."""
    try:
        before, after = _elements(read_tensors(src)), _elements(read_tensors(dst))
    except Exception as exc:  # what moekit accepted, safetensors must read
        return [Violation("convert", "output unreadable", _describe(exc))]
    if before.keys() != after.keys() or any(not np.array_equal(before[d], after[d])
                                            for d in before):
        counts = {d: (len(before.get(d, ())), len(after.get(d, ())))
                  for d in before.keys() | after.keys()}
        return [Violation("convert", "elements changed",
                          f"per dtype, (source, output) element counts {counts}, or values differ")]
    return []


def _elements(tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> dict[str, np.ndarray]:
    """dtype -> every element of that dtype, as unsigned integers of its width, sorted."""
    raw: dict[str, list[bytes]] = {}
    for dtype, _, data in tensors.values():
        raw.setdefault(dtype, []).append(data)
    return {d: np.sort(np.frombuffer(b"".join(chunks), dtype=f"<u{ITEMSIZE[d]}"))
            for d, chunks in raw.items()}


def _round_trip(src: Path, back: Path) -> list[Violation]:
    """The converted-back checkpoint holds exactly the source's tensors, read by safetensors."""
    try:
        before, after = read_tensors(src), read_tensors(back)
    except Exception as exc:  # what moekit accepted, safetensors must read
        return [Violation("round trip", "unreadable", _describe(exc))]
    lost = sorted(before.keys() - after.keys())
    gained = sorted(after.keys() - before.keys())
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    if lost or gained or changed:
        return [Violation("round trip", "not identical",
                          f"lost {lost[:3]}, gained {gained[:3]}, changed {changed[:3]}")]
    return []


@dataclass
class Example:
    """One fuzz example's folders: ``src`` (damaged copy), ``dst`` and ``back`` outputs."""

    root: Path
    found: list[Violation] = field(default_factory=list)

    @property
    def src(self) -> Path:
        return self.root / "src"

    def run(self, args: list[str], outputs: set[str]) -> Outcome:
        """Run one command; check it, the untouched inputs, and that nothing but
        ``outputs`` was added beside them."""
        inputs = {p.name for p in self.root.iterdir()} - {"out", "back"}
        before = digest(self.root, inputs)
        outcome = run_cli(args)
        self.found += judge(outcome)
        after = digest(self.root, inputs)
        if after != before:
            self.found.append(Violation(outcome.command, "changed input", _changes(before, after)))
        extra = sorted({p.name for p in self.root.iterdir()} - inputs - outputs)
        if extra:
            self.found.append(Violation(outcome.command, "leftover", ", ".join(extra)))
        return outcome


def _changes(before: dict[str, str], after: dict[str, str]) -> str:
    names = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return ", ".join(names[:5])


def run_example(base: Base, damage: list[Mutation], target: str, root: Path) -> list[Violation]:
    """Copy ``base`` into ``root``/src, apply ``damage``, run the CLI on it; every broken
    promise found."""
    example = Example(root)
    shutil.copytree(base.folder, example.src, symlinks=True)
    for mutation in damage:
        with contextlib.suppress(Inapplicable, OSError):
            mutation.apply(example.src)
    src, dst, back = str(example.src), str(root / "out"), str(root / "back")
    example.run(["inspect", src], set())
    example.run(["plan", src, "--ep", "2"], set())
    converted = example.run(["convert", src, dst, "--to", target], {"out"})
    if converted.code != 0:
        if (root / "out").exists():
            example.found.append(Violation("convert", "output after failure", dst))
        return example.found
    refusal = must_refuse(example.src)
    if refusal:
        example.found.append(Violation("convert", "not refused", f"exit 0, but {refusal}"))
    example.found += _same_elements(example.src, root / "out")
    _expect_zero(example, example.run(["verify", src, dst], {"out"}))
    reverted = example.run(["convert", dst, back, "--to", base.layout], {"out", "back"})
    _expect_zero(example, reverted)
    if reverted.code == 0:
        _expect_zero(example, example.run(["verify", src, back], {"out", "back"}))
        example.found += _round_trip(example.src, root / "back")
    return example.found


def must_refuse(src: Path) -> str | None:
    """Why the damaged checkpoint must be refused although safetensors reads its files, or
    None: a file reached outside the folder, an expert key spelled non-canonically, a
    header giving one key two entries, a config.json that the shards contradict."""
    return (_reaches_outside(src) or _header_problem(src) or config_contradiction(src))


def _reaches_outside(src: Path) -> str | None:
    """A link, or an index entry, leading to an existing file outside the folder."""
    folder = src.resolve()
    for path in src.iterdir():
        if path.is_symlink() and path.exists() and not path.resolve().is_relative_to(folder):
            return f"{path.name} links to {os.readlink(path)}, outside the checkpoint folder"
    with contextlib.suppress(OSError, ValueError, RecursionError, AttributeError):
        for name in json.loads((src / INDEX).read_text())["weight_map"].values():
            target = src / str(name)
            if target.is_file() and not target.resolve().is_relative_to(folder):
                return f"the index names {name}, outside the checkpoint folder"
    return None


_NUMBER = re.compile(r"\.(?:layers|experts)\.([^.]+)\.")


def _header_problem(src: Path) -> str | None:
    """An expert key whose layer or expert number int() reads but that is not written as
    moekit writes numbers (``01``, ``+1``, non-ASCII digits): taken for the canonical
    number it could silently replace another tensor. Or a key that a header gives twice
    with different entries, which readers take differently."""
    for path in sorted(src.glob("*.safetensors")):
        conflicts: list[str] = []
        with contextlib.suppress(OSError, ValueError, RecursionError):
            raw = path.read_bytes()
            json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")],
                       object_pairs_hook=lambda items: _conflicts(items, conflicts))
        if conflicts:
            return f"{path.name} gives {conflicts[0]} two different entries"
        with contextlib.suppress(Inapplicable, OSError):
            for key in read_header(path)[0]:
                if ".experts." in key and any(_non_canonical(n) for n in _NUMBER.findall(key)):
                    return f"{path.name} holds {key!r}, not a canonical expert key"
    return None


def _conflicts(items: list[tuple[str, object]], found: list[str]) -> dict:
    """A JSON object from its pairs; the keys given twice with different values go to
    ``found``."""
    seen: dict[str, object] = {}
    for key, value in items:
        if key in seen and seen[key] != value:
            found.append(key)
        seen[key] = value
    return seen


def _non_canonical(text: str) -> bool:
    try:
        return str(int(text)) != text
    except ValueError:
        return False


_COUNT_KEYS = ("num_experts", "num_local_experts")
"""The keys transformers reads the expert count of qwen3_moe from."""


def config_contradiction(src: Path) -> str | None:
    """What a qwen3_moe config.json says that the shards' expert tensors contradict, or
    that is no valid value: the expert count, the layer count, which layers are MoE."""
    try:
        config = json.loads((src / CONFIG).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(config, dict) or config.get("model_type") != "qwen3_moe":
        return None
    for name in (*_COUNT_KEYS, "num_hidden_layers"):
        value = config.get(name)
        if value is not None and (type(value) is not int or value < 1):
            return f"config.json {name} is {value!r}"
    held = _experts_held(src)
    counts = {config[k] for k in _COUNT_KEYS if config.get(k) is not None}
    wrong = sorted(layer for layer, sizes in held.items() if counts and sizes != counts)
    if wrong:
        return f"config.json has {counts} experts, layers {wrong} hold {held[wrong[0]]}"
    return _moe_layers_contradiction(config, held)


def _moe_layers_contradiction(config: dict, held: dict[int, set[int]]) -> str | None:
    """qwen3_moe's rule: layer i < num_hidden_layers is MoE unless listed in
    mlp_only_layers (null: none), and only when (i + 1) is a multiple of
    decoder_sparse_step."""
    dense = config.get("mlp_only_layers") or []
    step = config.get("decoder_sparse_step", 1)
    if not (isinstance(dense, list) and all(type(i) is int for i in dense)
            and type(step) is int and step > 0):
        return f"config.json mlp_only_layers {dense!r} / decoder_sparse_step {step!r} are invalid"
    layers = config.get("num_hidden_layers")
    if layers is None:
        return None
    if layers > 10_000:
        return f"config.json has {layers} layers; the shards have experts in {sorted(held)}"
    moe = [i for i in range(layers) if i not in dense and (i + 1) % step == 0]
    if moe != sorted(held):
        return f"config.json makes layers {moe} MoE; the shards have experts in {sorted(held)}"
    return None


_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(?:(\d+)\.)?")


def _experts_held(src: Path) -> dict[int, set[int]]:
    """layer -> the expert counts its expert tensors imply (highest expert number + 1 of
    per-expert keys, first dimension of grouped tensors), from every readable shard."""
    held: dict[int, set[int]] = {}
    numbers: dict[int, int] = {}
    for path in sorted(src.glob("*.safetensors")):
        with contextlib.suppress(Inapplicable, OSError):
            for key, entry in read_header(path)[0].items():
                match = _EXPERT_KEY.match(key)
                if not match or not isinstance(entry, dict):
                    continue
                layer = int(match.group(1))
                if match.group(2) is not None:
                    numbers[layer] = max(numbers.get(layer, 0), int(match.group(2)) + 1)
                elif isinstance(entry.get("shape"), list) and entry["shape"]:
                    held.setdefault(layer, set()).add(entry["shape"][0])
    for layer, count in numbers.items():
        held.setdefault(layer, set()).add(count)
    return held


def _expect_zero(example: Example, outcome: Outcome) -> None:
    if outcome.code not in (0, None):
        shown = (outcome.err or outcome.out)[:300]
        example.found.append(Violation(outcome.command, "after a successful convert",
                                       f"exit {outcome.code}: {shown!r}"))
