"""mergekit-moe's YAML, read as it is (mergekit 0.1.5, ``mergekit/moe/config.py``).

Fields: ``base_model``; ``experts``, each a ``source_model`` with ``positive_prompts``,
``negative_prompts`` and ``residual_scale``; ``gate_mode`` (default ``hidden``);
``dtype``; ``experts_per_token`` (default 2); ``shared_experts`` (same fields as an
expert); ``architecture``. Settings moekit cannot reproduce byte for byte are refused by
name rather than ignored: ``noise_scale`` (mergekit draws it from the global generator
between reads, in an order its loaders decide).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MoekitError, printable

GATE_MODES: tuple[str, ...] = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "random",
                                "uniform_random")
"""mergekit-moe's gate modes that moekit computes as it does (see ``moekit.merging.gates``)."""
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "mixtral": ("mixtral",), "qwen": ("qwen2_moe", "qwen3_moe"), "qwen3": ("qwen3_moe",)}
"""``architecture`` values -> the target families they may pick: mergekit matches them as
prefixes of its output names (Mixtral, Qwen MoE, Qwen3 MoE), so ``qwen`` names both Qwen
targets."""

_EXPERT_FIELDS = {"source_model", "positive_prompts", "negative_prompts", "residual_scale",
                  "noise_scale"}
_FIELDS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token",
           "shared_experts", "architecture"}


@dataclass(frozen=True)
class ExpertSource:
    """One expert (or shared expert): the dense model whose MLPs it takes, the prompts its
    router row is computed from, and the factor its ``down_proj`` is multiplied by."""

    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    residual_scale: float | None = None


@dataclass(frozen=True)
class MergeConfig:
    """A mergekit-moe configuration (see the module)."""

    base_model: str
    experts: tuple[ExpertSource, ...]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: tuple[ExpertSource, ...] = ()
    architecture: str | None = None

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise MoekitError("invalid merge configuration: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every inconsistency mergekit-moe would also refuse, and the settings moekit
        does not support."""
        found = []
        if self.gate_mode not in GATE_MODES:
            found.append(f"gate_mode {self.gate_mode!r} is not one of {', '.join(GATE_MODES)}")
        if self.architecture is not None and self.architecture.lower() not in ARCHITECTURES:
            found.append(f"architecture {self.architecture!r} is not one of "
                         f"{', '.join(ARCHITECTURES)} (moekit has no DeepSeek merge target)")
        if not _is_integer(self.experts_per_token) or self.experts_per_token < 1:
            found.append(f"experts_per_token must be an integer of at least 1, not "
                         f"{self.experts_per_token!r}")
        elif len(self.experts) < self.experts_per_token:
            found.append(f"experts_per_token {self.experts_per_token} is more than the "
                         f"{len(self.experts)} experts")
        if len(self.shared_experts) > 1:
            found.append(f"{len(self.shared_experts)} shared_experts: the targets hold one")
        if self.gate_mode != "random" and self.gate_mode != "uniform_random":
            found.extend(self._prompt_problems())
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
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise MoekitError(f"cannot read the merge configuration {printable(str(path))}: "
                          f"{err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise MoekitError(f"{printable(str(path))} is not valid YAML: {err}") from None
    try:
        return merge_config_from(data)
    except MoekitError as err:
        raise MoekitError(f"{printable(str(path))}: {err}") from None


def merge_config_from(data: Any) -> MergeConfig:
    """A MergeConfig from the mapping mergekit-moe's YAML holds."""
    if not isinstance(data, Mapping):
        raise MoekitError("a merge configuration is a mapping of base_model, experts, ...")
    unknown = sorted(set(map(str, data)) - _FIELDS)
    if unknown:
        raise MoekitError(f"unknown field {', '.join(unknown)} (known: "
                          f"{', '.join(sorted(_FIELDS))})")
    for name in ("base_model", "experts"):
        if name not in data:
            raise MoekitError(f"the field {name} is missing")
    experts = _experts(data["experts"], "experts")
    if not experts:
        raise MoekitError("experts lists no expert")
    return MergeConfig(
        base_model=_text(data["base_model"], "base_model"),
        experts=experts,
        gate_mode=_text(data.get("gate_mode", "hidden"), "gate_mode"),
        dtype=None if data.get("dtype") is None else _text(data["dtype"], "dtype"),
        experts_per_token=data.get("experts_per_token", 2),
        shared_experts=_experts(data.get("shared_experts") or [], "shared_experts"),
        architecture=(None if data.get("architecture") is None
                      else _text(data["architecture"], "architecture")))


def _experts(items: Any, field: str) -> tuple[ExpertSource, ...]:
    if not isinstance(items, list):
        raise MoekitError(f"{field} must be a list of experts")
    return tuple(_expert(item, f"{field}[{i}]") for i, item in enumerate(items))


def _expert(item: Any, where: str) -> ExpertSource:
    if not isinstance(item, Mapping) or "source_model" not in item:
        raise MoekitError(f"{where} must be a mapping with a source_model")
    unknown = sorted(set(map(str, item)) - _EXPERT_FIELDS)
    if unknown:
        raise MoekitError(f"{where} has unknown field {', '.join(unknown)}")
    if item.get("noise_scale") is not None:
        raise MoekitError(f"{where}.noise_scale: mergekit-moe draws this noise from its global "
                          "random generator in an order moekit cannot reproduce; remove it")
    scale = item.get("residual_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise MoekitError(f"{where}.residual_scale must be a number, not {scale!r}")
    return ExpertSource(
        source_model=_text(item["source_model"], f"{where}.source_model"),
        positive_prompts=_prompts(item.get("positive_prompts"), f"{where}.positive_prompts"),
        negative_prompts=_prompts(item.get("negative_prompts"), f"{where}.negative_prompts"),
        residual_scale=None if scale is None else float(scale))


def _prompts(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise MoekitError(f"{where} must be a list of strings")
    return tuple(value)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise MoekitError(f"{where} must be a non-empty string, not {value!r}")
    return value


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
