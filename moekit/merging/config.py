"""mergekit-moe's YAML, read as it is (mergekit 0.1.5, ``mergekit/moe/config.py``).

The fields are those of ``MergeConfig`` and, for each expert and shared expert,
``ExpertSource`` (``FIELDS``, ``EXPERT_FIELDS``). Settings moekit cannot reproduce byte for
byte are refused by name rather than ignored: ``noise_scale`` (``NOISE_REFUSAL``) and the
DeepSeek MoE output (``DEEPSEEK_REFUSAL``).

moekit's own settings, which mergekit-moe has no field for, sit in a mapping under the key
``moekit`` (``MOEKIT_KEY``), at the top level (``MOEKIT_FIELDS``: ``granularity``) and in
each expert (``MOEKIT_EXPERT_FIELDS``: ``drop_ratio``). mergekit-moe's pydantic models
ignore keys they do not declare, so it reads such a YAML too, merging without them; the
key shows a reader which settings are moekit's, and a field mergekit adds later cannot
collide with them.
"""

from __future__ import annotations

import math
import numbers
import re
import reprlib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from ..checkpoint import MAX_CONFIG_BYTES
from ..errors import MoekitError, printable
from ..layouts.families import MAX_EXPERTS

GATE_MODES: tuple[str, ...] = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "random",
                                "uniform_random")
"""mergekit-moe's gate modes that moekit computes as it does (see ``moekit.merging.gates``)."""
RANDOM_GATE_MODES: tuple[str, ...] = ("random", "uniform_random")
"""The gate modes that draw router rows from a generator seeded with the merge's seed,
without prompts."""


@dataclass(frozen=True)
class MergeTarget:
    """An output architecture of mergekit-moe: its name (which ``architecture`` values
    prefix), the model_types of the models it takes and how many shared experts it
    holds (mergekit 0.1.5, ``mergekit/moe/{mixtral,qwen,qwen3}.py``)."""

    name: str
    bases: tuple[str, ...]
    shared_experts: int


MERGE_TARGETS: dict[str, MergeTarget] = {
    "mixtral": MergeTarget("Mixtral", ("llama", "mistral"), 0),
    "qwen2_moe": MergeTarget("Qwen MoE", ("qwen2", "llama", "mistral"), 1),
    "qwen3_moe": MergeTarget("Qwen3 MoE", ("qwen3",), 0),
}
"""moekit target family -> the mergekit-moe output architecture it writes, in the order
mergekit picks among those that hold the models (Mixtral first; DeepSeek MoE, which mergekit
tries second, is refused: ``DEEPSEEK_REFUSAL``)."""

DEEPSEEK_REFUSAL = (
    "mergekit-moe's DeepSeek MoE output is model_type 'deepseek' (DeepSeek-MoE 16B), which "
    "transformers loads only with that model's remote code from the Hub (transformers 5.24 "
    "has deepseek_v2 and later, no 'deepseek'), so neither moekit nor its tests can check "
    "what it writes; use mixtral, or qwen with a shared expert")
"""Why moekit has no DeepSeek MoE merge target."""

DEEPSEEK_BASES = ("llama", "mistral")
"""The model_types mergekit-moe's DeepSeek MoE output takes (``mergekit/moe/deepseek.py``),
with at most one shared expert, that one without prompts."""

NOISE_REFUSAL = (
    "mergekit-moe adds torch.randn_like noise from torch's global generator, seeded once, so "
    "each tensor's noise depends on every draw before it in mergekit's own loop over the "
    "output's tensors (and on gate_mode random's draw); moekit streams tensors in its own "
    "order, so it cannot give mergekit's bytes: remove noise_scale")
"""Why moekit refuses an expert's ``noise_scale``."""


def architecture_targets(architecture: str) -> list[str]:
    """The target families an ``architecture`` value names: those whose mergekit name it
    prefixes, ignoring case, as mergekit matches it (so ``qwen`` names both Qwen
    targets)."""
    return [family for family, target in MERGE_TARGETS.items()
            if target.name.lower().startswith(architecture.lower())]


@dataclass(frozen=True)
class ExpertSource:
    """One expert (or shared expert): the dense model whose MLPs it takes, the prompts its
    router row is computed from, and the factor its ``down_proj`` is multiplied by. Every
    field is checked as the YAML's is (a list of prompts is kept as a tuple)."""

    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    residual_scale: float | None = None
    drop_ratio: float | None = None
    """moekit's own: the fraction of the expert's intermediate neurons re-initialised, in
    (0, 1], as ``moekit upcycle --method drop`` re-initialises them (Drop-Upcycling)."""

    def __post_init__(self) -> None:
        _text(self.source_model, "source_model")
        for name in ("positive_prompts", "negative_prompts"):
            object.__setattr__(self, name, _prompts(getattr(self, name), name))
        for name in ("residual_scale", "drop_ratio"):
            value = getattr(self, name)
            if value is not None:
                number = _number(value)
                if number is None:
                    raise MoekitError(f"{name} must be a number, not {_shown(value)}")
                object.__setattr__(self, name, number)
        if self.residual_scale is not None and not abs(self.residual_scale) <= FLOAT32_MAX:
            raise MoekitError(f"residual_scale must be a finite number in float32, not "
                              f"{self.residual_scale:g}: every down_proj it scales would be "
                              "NaN or infinite")
        if self.drop_ratio is not None and not 0.0 < self.drop_ratio <= 1.0:
            raise MoekitError(f"drop_ratio must lie in (0, 1], not {self.drop_ratio:g}")


@dataclass(frozen=True)
class MergeConfig:
    """A mergekit-moe configuration (see the module). Every field is checked as the YAML's
    is, one MoekitError naming the field (a list of experts is kept as a tuple)."""

    base_model: str
    experts: tuple[ExpertSource, ...]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: tuple[ExpertSource, ...] = ()
    architecture: str | None = None
    granularity: int = 1
    """moekit's own: G, the routed experts each source's MLP is split into (slices of its
    intermediate neurons, as ``moekit upcycle --method granular`` splits the dense MLP)."""

    def __post_init__(self) -> None:
        _text(self.base_model, "base_model")
        for name in ("experts", "shared_experts"):
            object.__setattr__(self, name, _sources(getattr(self, name), name))
        for name in ("experts_per_token", "granularity"):
            whole = _whole(getattr(self, name))
            if whole is not None:
                object.__setattr__(self, name, whole)
        if not self.experts:
            raise MoekitError("experts lists no expert")
        _text(self.gate_mode, "gate_mode")
        for name in ("dtype", "architecture"):
            if getattr(self, name) is not None:
                _text(getattr(self, name), name)
        problems = self.problems()
        if problems:
            raise MoekitError("invalid merge configuration: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every inconsistency mergekit-moe would also refuse, and the settings moekit
        does not support."""
        found = []
        if self.gate_mode not in GATE_MODES:
            found.append(f"gate_mode {self.gate_mode!r} is not one of {', '.join(GATE_MODES)}")
        if self.architecture is not None and not architecture_targets(self.architecture):
            names = ", ".join(t.name for t in MERGE_TARGETS.values())
            found.append(f"architecture {self.architecture!r}: "
                         + (DEEPSEEK_REFUSAL if "deepseek moe".startswith(
                             self.architecture.lower()) else f"names none of {names}"))
        if not _is_integer(self.experts_per_token) or self.experts_per_token < 1:
            found.append(f"experts_per_token must be an integer of at least 1, not "
                         f"{_shown(self.experts_per_token)}")
        elif len(self.experts) < self.experts_per_token:
            found.append(f"experts_per_token {self.experts_per_token} is more than the "
                         f"{len(self.experts)} experts")
        found.extend(self._moekit_problems())
        most = max(target.shared_experts for target in MERGE_TARGETS.values())
        if len(self.shared_experts) > most:
            found.append(f"{len(self.shared_experts)} shared_experts: the targets hold at most "
                         f"{most}")
        if self.gate_mode not in RANDOM_GATE_MODES:
            found.extend(self._prompt_problems())
        return found

    def _moekit_problems(self) -> list[str]:
        """What is wrong with moekit's own settings, alone or beside the others."""
        g = self.granularity
        if not _is_integer(g) or g < 1:
            return [f"granularity must be an integer of at least 1, not {_shown(g)}"]
        found = []
        if len(self.experts) * g > MAX_EXPERTS:
            found.append(f"{len(self.experts)} experts split into {g} make more than "
                         f"{MAX_EXPERTS} routed experts")
        dropped = [f"experts[{i}]" for i, e in enumerate(self.experts)
                   if e.drop_ratio is not None]
        if g > 1 and dropped:
            found.append(f"drop_ratio ({', '.join(dropped)}) does not combine with granularity "
                         f"{g}: moekit re-initialises neurons of whole copies of an MLP, as "
                         "upcycle --method drop does, not of its slices")
        found.extend(f"shared_experts[{i}].drop_ratio: Drop-Upcycling re-initialises routed "
                     "experts only (upcycle --method drop keeps its shared expert whole)"
                     for i, e in enumerate(self.shared_experts) if e.drop_ratio is not None)
        return found

    def _prompt_problems(self) -> list[str]:
        found = [f"expert {i} ({printable(e.source_model)}) has no positive_prompts, which "
                 f"gate_mode {self.gate_mode} needs"
                 for i, e in enumerate((*self.experts, *self.shared_experts))
                 if not e.positive_prompts]
        prompts = {(e.positive_prompts, e.negative_prompts) for e in self.experts}
        if not found and len(self.experts) > 1 and len(prompts) == 1:
            found.append("every expert has the same prompts, so every router row would be the "
                         "same")
        return found

    @property
    def sources(self) -> dict[str, ExpertSource]:
        """Each expert and shared expert under the tag its tensors are read with."""
        tagged = {f"expert{i}": e for i, e in enumerate(self.experts)}
        tagged.update({f"shared{i}": e for i, e in enumerate(self.shared_experts)})
        return tagged


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read a mergekit-moe YAML file; one MoekitError names the file and what is wrong."""
    try:
        import yaml
    except ImportError:
        raise MoekitError("moekit merge reads YAML with PyYAML: pip install 'moekit[merge]'"
                          ) from None
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise MoekitError(f"the merge configuration {printable(str(path))} is larger than "
                              f"{MAX_CONFIG_BYTES:,} bytes, which moekit reads at most")
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise MoekitError(f"cannot read the merge configuration {printable(str(path))}: "
                          f"{err}") from None
    try:
        composed = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as err:  # ValueError: an integer of 4,301 digits
        raise MoekitError(f"{printable(str(path))} is not valid YAML: {err}") from None
    try:
        _refuse_repeated_keys(composed, yaml)
        return merge_config_from(data)
    except MoekitError as err:
        raise MoekitError(f"{printable(str(path))}: {err}") from None


def _refuse_repeated_keys(root: Any, yaml: Any) -> None:
    """Refuse a mapping of the composed YAML ``root`` that holds a key twice: PyYAML (and
    so mergekit-moe) keeps the last silently, so a setting written twice, a ``moekit:``
    mapping among them, would be dropped. Keys merged in with ``<<`` may be overridden."""
    visited: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            keys: set[tuple[str, str]] = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if (key.tag, key.value) in keys:
                        raise MoekitError(f"line {key.start_mark.line + 1}: the key "
                                          f"{printable(key.value)} appears twice in one mapping "
                                          "(YAML keeps only the last)")
                    keys.add((key.tag, key.value))
                stack.extend((key, value))


MOEKIT_KEY = "moekit"
"""The key of the mapping that holds moekit's own settings (see the module)."""
MOEKIT_FIELDS: tuple[str, ...] = ("granularity",)
"""moekit's own settings of the whole merge, under ``moekit:`` at the top level."""
MOEKIT_EXPERT_FIELDS: tuple[str, ...] = ("drop_ratio",)
"""moekit's own settings of one expert, under ``moekit:`` in the expert."""
FIELDS: tuple[str, ...] = tuple(f.name for f in fields(MergeConfig)
                                if f.name not in MOEKIT_FIELDS)
"""mergekit-moe's fields of the YAML, in the order it documents them."""
EXPERT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ExpertSource)
                                       if f.name not in MOEKIT_EXPERT_FIELDS)
"""mergekit-moe's fields of each expert and shared expert."""
REFUSED_EXPERT_FIELDS = ("noise_scale",)
"""Expert fields of mergekit-moe that moekit refuses by name (see the module)."""


def merge_config_from(data: Any) -> MergeConfig:
    """A MergeConfig from the mapping mergekit-moe's YAML holds."""
    if not isinstance(data, Mapping):
        raise MoekitError("a merge configuration is a mapping of base_model, experts, ...")
    _check_known(data, FIELDS, MOEKIT_FIELDS, "", f" (known: {', '.join(sorted(FIELDS))})")
    missing = [f.name for f in fields(MergeConfig) if f.default is MISSING and f.name not in data]
    if missing:
        raise MoekitError(f"the field {missing[0]} is missing")
    given = _given(MergeConfig, {**data, **_moekit_settings(data, MOEKIT_FIELDS, "")})
    for name in ("experts", "shared_experts"):
        if name in given:
            given[name] = _experts(given[name], name)
    return MergeConfig(**given)


def _experts(items: Any, field: str) -> tuple[ExpertSource, ...]:
    if not isinstance(items, list):
        raise MoekitError(f"{field} must be a list of experts")
    return tuple(_expert(item, f"{field}[{i}]") for i, item in enumerate(items))


def _expert(item: Any, where: str) -> ExpertSource:
    if not isinstance(item, Mapping) or "source_model" not in item:
        raise MoekitError(f"{where} must be a mapping with a source_model")
    _check_known(item, (*EXPERT_FIELDS, *REFUSED_EXPERT_FIELDS), MOEKIT_EXPERT_FIELDS,
                 f"{where} has ", "")
    if item.get("noise_scale") is not None:
        raise MoekitError(f"{where}.noise_scale: {NOISE_REFUSAL}")
    moekit = _moekit_settings(item, MOEKIT_EXPERT_FIELDS, f"{where}.")
    try:
        return ExpertSource(**_given(ExpertSource, {**item, **moekit}))
    except MoekitError as err:
        prefix = f"{MOEKIT_KEY}." if str(err).startswith(MOEKIT_EXPERT_FIELDS) else ""
        raise MoekitError(f"{where}.{prefix}{err}") from None


def _check_known(data: Mapping, known: tuple[str, ...], moekit: tuple[str, ...], where: str,
                 listed: str) -> None:
    """Refuse keys of ``data`` that are neither mergekit-moe's ``known`` fields nor the
    ``moekit`` key, pointing a setting of moekit's own (``moekit``) to that key."""
    unknown = sorted(set(map(str, data)) - {*known, MOEKIT_KEY})
    if not unknown:
        return
    misplaced = [name for name in unknown if name in moekit]
    hint = (f"; {', '.join(misplaced)} is a setting of moekit's own: write it under "
            f"{MOEKIT_KEY}:" if misplaced else "")
    raise MoekitError(f"{where}unknown field {', '.join(unknown)}{listed}{hint}")


def _moekit_settings(data: Mapping, known: tuple[str, ...], where: str) -> dict[str, Any]:
    """The settings under ``data``'s ``moekit`` key (none when it is absent or null)."""
    block = data.get(MOEKIT_KEY)
    if block is None:
        return {}
    if not isinstance(block, Mapping):
        raise MoekitError(f"{where}{MOEKIT_KEY} must be a mapping of {', '.join(known)}")
    unknown = sorted(set(map(str, block)) - set(known))
    if unknown:
        raise MoekitError(f"{where}{MOEKIT_KEY}.{', '.join(unknown)} is not a setting of "
                          f"moekit's own here (known: {', '.join(known)})")
    return dict(block)


def _given(cls: type, data: Mapping) -> dict[str, Any]:
    """The values ``data`` gives the fields of dataclass ``cls``, a null standing for a
    default of None or nothing: the fields mergekit-moe declares Optional."""
    optional = {f.name for f in fields(cls) if f.default is None or f.default == ()}
    return {f.name: data[f.name] for f in fields(cls)
            if f.name in data and not (data[f.name] is None and f.name in optional)}


def _sources(items: Any, where: str) -> tuple[ExpertSource, ...]:
    if not isinstance(items, (list, tuple)) or not all(isinstance(e, ExpertSource)
                                                       for e in items):
        raise MoekitError(f"{where} must be a list of ExpertSource, not {_shown(items)}")
    return tuple(items)


def _prompts(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise MoekitError(f"{where} must be a list of strings, not {_shown(value)}")
    return tuple(value)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise MoekitError(f"{where} must be a non-empty string, not {_shown(value)}")
    return value


FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32: a larger residual_scale makes every down_proj infinite."""
def _shown(value: Any) -> str:
    """``value`` as a message shows it, within bounds: YAML aliases can make a 500-byte
    file a structure whose full repr takes gigabytes."""
    shown = reprlib.Repr()
    shown.maxlevel, shown.maxlist, shown.maxdict = 2, 4, 4
    shown.maxstring = shown.maxother = 60
    return printable(shown.repr(value))


def _number(value: Any) -> float | None:
    """``value`` as a float where pydantic's lax mode reads one (mergekit-moe validates
    its YAML so): a number, or a string of ASCII holding one, spaces around it (PyYAML
    reads ``1e-1`` as a string, wanting a dot); an integer beyond floats as infinite; None
    otherwise, and for a boolean, which pydantic reads as 0 or 1."""
    if isinstance(value, str):
        try:
            return float(value) if value.isascii() else None
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


WHOLE = re.compile(r"\s*[+-]?\d+(\.0+)?\s*", re.ASCII)
"""A string pydantic's lax mode reads as an integer: digits, maybe a point and zeros."""


def _whole(value: Any) -> int | None:
    """``value`` as an int where pydantic's lax mode reads one: an integer, a float that is
    a whole number, a string of one (``1.0``, ``"2"``); None otherwise (and for a
    boolean)."""
    if _is_integer(value):
        return int(value)
    if isinstance(value, str):
        return int(value.strip().split(".")[0]) if WHOLE.fullmatch(value) else None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
