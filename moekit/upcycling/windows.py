"""Sliding-window attention across an upcycled model's layers: the window each layer of the
dense model attends through, read from its config.json, and the target family's config
entries that make each layer of the MoE model attend through the same one.

Families are data (``RULES``). Facts from transformers 5.24's config classes
(``__post_init__``) and attention modules:

- Llama has no sliding window.
- Mistral and Mixtral apply ``sliding_window`` to every layer where it is not null; where
  config.json lacks it, Mistral's default is 4096 and Mixtral's null.
- Qwen2, Qwen3, Qwen2-MoE and Qwen3-MoE use ``sliding_window`` only with
  ``use_sliding_window`` (default false), and then:
  - Qwen2, Qwen3 and Qwen2-MoE only in the layers ``layer_types`` names
    ``sliding_attention``. By default those are, for Qwen2 and Qwen3, the layers from
    ``max_window_layers`` (default 28) on; Qwen2-MoE derives other defaults, so moekit
    always writes its ``layer_types``.
  - Qwen3-MoE in every layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import MoekitError, compress_ranges, printable

Windows = list[int | None]
"""Each layer's attention window, in tokens; None where the layer attends to every token."""

SLIDING, FULL = "sliding_attention", "full_attention"
WINDOW_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")
"""The config.json entries that place sliding windows: the dense model's are not carried
over, the target's are written from its windows (``target_settings``)."""


@dataclass(frozen=True)
class WindowRule:
    """How a family's config.json lays sliding windows over its layers."""

    switch: str | None
    """The entry that turns ``sliding_window`` on, where it is not on wherever set."""
    default: int | None
    """``sliding_window`` where config.json lacks it."""
    by_layer: bool
    """The window applies only in the layers ``layer_types`` names sliding (else in all)."""
    first_sliding_default: int | None = None
    """Where config.json has no ``layer_types``: the default of ``max_window_layers``,
    from which layer on the window applies (None: a family moekit only writes)."""


RULES: dict[str, WindowRule | None] = {
    "llama": None,
    "mistral": WindowRule(None, 4096, by_layer=False),
    "mixtral": WindowRule(None, None, by_layer=False),
    "qwen2": WindowRule("use_sliding_window", 4096, by_layer=True, first_sliding_default=28),
    "qwen3": WindowRule("use_sliding_window", 4096, by_layer=True, first_sliding_default=28),
    "qwen2_moe": WindowRule("use_sliding_window", 4096, by_layer=True),
    "qwen3_moe": WindowRule("use_sliding_window", 4096, by_layer=False),
}
"""Each dense and target family's rule; None for a family without sliding windows."""


def dense_windows(model_type: str, config: Mapping[str, Any], layers: int) -> Windows:
    """The window of each of the ``layers`` layers of the dense ``model_type`` model that
    ``config`` (its config.json) describes, as transformers builds that model."""
    rule = RULES[model_type]
    if rule is None:
        return [None] * layers
    window = _window(config, rule)
    if not rule.by_layer:
        return [window] * layers
    return [window if kind == SLIDING else None for kind in _layer_types(config, rule, window,
                                                                          layers)]


def target_settings(family: str, windows: Windows) -> dict[str, Any]:
    """The config.json entries with which the target ``family``'s model attends through
    ``windows``; MoekitError where the family cannot say them (one window size for every
    sliding layer; in every layer alike, unless it names its layers' kinds)."""
    rule = RULES[family]
    sizes = sorted({window for window in windows if window is not None})
    if len(sizes) > 1:
        raise MoekitError(f"the dense model's layers attend through windows of "
                          f"{', '.join(map(str, sizes))} tokens; {family} has one window size")
    window = sizes[0] if sizes else None
    if rule is None or not rule.by_layer and len(set(windows)) > 1:
        sliding = [layer for layer, size in enumerate(windows) if size is not None]
        raise MoekitError(
            f"the dense model attends through a sliding window in layers "
            f"{compress_ranges(sliding)} only; {family} would "
            f"{'attend to every token' if rule is None else 'slide it in every layer'}")
    settings: dict[str, Any] = {"sliding_window": window}
    if rule.switch is not None:
        settings[rule.switch] = window is not None
    if rule.by_layer:
        settings["layer_types"] = [FULL if size is None else SLIDING for size in windows]
    return settings


def _window(config: Mapping[str, Any], rule: WindowRule) -> int | None:
    """The window ``sliding_window`` sets, where ``rule.switch`` turns it on."""
    if rule.switch is not None:
        on = config.get(rule.switch, False)
        if not isinstance(on, bool):
            raise MoekitError(f"the dense config.json's {rule.switch} is "
                              f"{printable(repr(on))}; expected true or false")
        if not on:
            return None
    window = config.get("sliding_window", rule.default)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise MoekitError(f"the dense config.json's sliding_window is "
                          f"{printable(repr(window))}; expected a positive whole number or null")
    return window


def _layer_types(config: Mapping[str, Any], rule: WindowRule, window: int | None,
                 layers: int) -> list[str]:
    """Each layer's kind: ``layer_types``, else sliding from ``max_window_layers`` on."""
    kinds = config.get("layer_types")
    if kinds is None:
        first = config.get("max_window_layers", rule.first_sliding_default)
        if isinstance(first, bool) or not isinstance(first, int):
            raise MoekitError(f"the dense config.json's max_window_layers is "
                              f"{printable(repr(first))}; expected a whole number")
        return [SLIDING if window is not None and layer >= first else FULL
                for layer in range(layers)]
    if (not isinstance(kinds, list) or len(kinds) != layers
            or not all(kind in (SLIDING, FULL) for kind in kinds)):
        raise MoekitError(f"the dense config.json's layer_types is {printable(repr(kinds))[:200]}"
                          f"; expected {layers} entries, each {SLIDING!r} or {FULL!r}")
    return kinds

