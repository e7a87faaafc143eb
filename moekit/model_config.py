"""What moekit reads from a model's config.json: the routed-expert count, which decoder
layers hold experts, and the FP8 block size, every value checked for its type.

Values are read as transformers reads them (its attribute aliases and defaults), so that
a checkpoint whose config.json and weights disagree is refused before anything is
written, rather than converted into a checkpoint that loads wrongly or not at all.
Nothing here iterates over a count a config declares: layer sets are ranges or the
config's own lists, so an absurd value costs no time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from .errors import MoekitError

DEFAULT_FP8_BLOCK = (128, 128)
"""Rows and columns of weight each FP8 ``weight_scale_inv`` entry covers when
``quantization_config.weight_block_size`` does not say (DeepSeek-V3's format)."""


MAX_LAYERS = 4096
"""The most decoder layers, and the most multi-token-prediction layers, that Megatron-Core's
layout lays out entry by entry (about thirty times the deepest released model's)."""
TOO_MANY_LAYERS = (f"moekit reads models of at most {MAX_LAYERS} layers (and as many "
                   "multi-token-prediction layers)")
MAX_BUILT_LAYERS = 1024
"""The most decoder layers ``moekit plan`` builds a model for from a config.json alone
(several times the deepest released model's): transformers makes every layer's modules,
even on the meta device, so a config declaring a million layers would take minutes."""


@dataclass(frozen=True)
class ConfigValues:
    """Typed reads of one config.json (or a config dict given to the library)."""

    config: Mapping[str, object]
    source: str
    """How messages name the config: ``/data/qwen3/config.json``, ``the config given``."""

    def __contains__(self, key: str) -> bool:
        return key in self.config

    def integer(self, key: str, default: int | None = None, minimum: int = 0) -> int | None:
        """``config[key]`` as a whole number of at least ``minimum`` (``default`` when
        absent). JSON ``8.0``, ``"8"``, ``true`` and ``null`` are refused: transformers
        would use them as given, or fail later with a message naming neither file nor key."""
        if key not in self.config:
            return default
        return self.checked_integer(key, self.config[key], minimum)

    def checked_integer(self, name: str, value: object, minimum: int = 0) -> int:
        if type(value) is not int or value < minimum:
            raise MoekitError(f"{self.source}: {name} is {shown(value)}; expected a whole number "
                              f"of at least {minimum}")
        return value

    def integers(self, key: str) -> tuple[int, ...] | None:
        """``config[key]`` as a list of whole numbers ≥ 0, or None when absent or null."""
        value = self.config.get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            raise MoekitError(f"{self.source}: {key} is {shown(value)}; expected a list of "
                              "layer numbers")
        return tuple(self.checked_integer(f"{key}[{i}]", v) for i, v in enumerate(value))

    def strings(self, key: str) -> tuple[str, ...] | None:
        """``config[key]`` as a list of strings, or None when absent or null."""
        value = self.config.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise MoekitError(f"{self.source}: {key} is {shown(value)}; expected a list of "
                              "strings")
        return tuple(value)

    def string(self, key: str) -> str | None:
        value = self.config.get(key)
        if value is not None and not isinstance(value, str):
            raise MoekitError(f"{self.source}: {key} is {shown(value)}; expected a string")
        return value


def shown(value: object, limit: int = 60) -> str:
    """A config value as JSON writes it (``8.0``, ``"8"``, ``true``), shortened."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def expert_count(values: ConfigValues, keys: tuple[str, ...]) -> tuple[int, str] | None:
    """(count, key) of the routed experts, read from every key of ``keys`` present (the
    names transformers writes or aliases for the family); None when none is present. Keys
    that disagree are refused: which one transformers uses depends on their order."""
    found = {key: values.integer(key) for key in keys if key in values}
    if not found:
        return None
    if len(set(found.values())) > 1:
        listed = ", ".join(f"{key} {count}" for key, count in found.items())
        raise MoekitError(f"{values.source} gives the number of routed experts more than once, "
                          f"and differently: {listed}; make them agree")
    key, count = next(iter(found.items()))
    return count, key


@dataclass(frozen=True)
class MoeLayers:
    """The decoder layers a config makes MoE layers, as ranges and the config's own lists
    (never a list as long as a count it declares)."""

    count: int
    """Decoder layers (``num_hidden_layers``): layers 0 to count - 1."""
    layers: range | frozenset[int]
    """The MoE layers among them, before ``excluded``: a range within ``range(count)``, or
    a config's list (whose entries may lie outside it)."""
    rule: str
    """The config values that decide it, for messages."""
    excluded: frozenset[int] = frozenset()
    """Layers the config keeps dense although ``layers`` holds them (``mlp_only_layers``)."""
    extra: range | frozenset[int] = range(0)
    """Layers after the decoder stack that may hold experts too (DeepSeek-V3's
    multi-token-prediction layers, optional in a checkpoint; Step-3.7's that its config
    marks sparse)."""

    def is_moe(self, layer: int) -> bool:
        """True when the config makes ``layer`` an MoE layer (or allows one there)."""
        return (0 <= layer < self.count and layer in self.layers
                and layer not in self.excluded) or layer in self.extra

    def expected(self) -> Iterator[int]:
        """The MoE layers of the decoder stack, in order, one at a time."""
        ordered = self.layers if isinstance(self.layers, range) else sorted(self.layers)
        return (layer for layer in ordered if 0 <= layer < self.count
                and layer not in self.excluded)

    @property
    def size(self) -> int:
        """How many layers ``expected`` yields, counted without iterating over a range."""
        if isinstance(self.layers, range):
            return (_range_length(self.layers)
                    - sum(1 for layer in self.excluded if layer in self.layers))
        return sum(1 for layer in self.layers if self.is_moe(layer) and layer < self.count)


def _range_length(layers: range) -> int:
    """``len(layers)`` for a range with a positive step, also beyond what ``len`` can
    return (a config may declare 2**64 layers)."""
    return max(0, -(-(layers.stop - layers.start) // layers.step))


LayerRule = Callable[[ConfigValues], "MoeLayers | None"]
"""A family's rule: which layers its config makes MoE layers (None when the config does
not say how many layers there are)."""


def every_layer(values: ConfigValues) -> MoeLayers | None:
    """Every decoder layer is an MoE layer (Mixtral, Phi-MoE, OLMoE, GPT-OSS)."""
    count = values.integer("num_hidden_layers")
    return None if count is None else MoeLayers(count, range(count), f"num_hidden_layers {count}")


def dense_prefix_of(default: int) -> LayerRule:
    """DeepSeek-V3, GLM-4.5: layers from ``first_k_dense_replace`` on (``default`` when the
    config does not say: transformers' 3 for DeepSeek-V3, 1 for GLM-4.5), plus their
    ``num_nextn_predict_layers`` multi-token-prediction layers after the stack."""
    def rule(values: ConfigValues) -> MoeLayers | None:
        count = values.integer("num_hidden_layers")
        if count is None:
            return None
        dense = values.integer("first_k_dense_replace", default)
        mtp = values.integer("num_nextn_predict_layers", 0)
        return MoeLayers(count, range(dense, count),
                         f"num_hidden_layers {count}, first_k_dense_replace {dense}",
                         extra=range(count, count + mtp))
    return rule


after_dense_prefix = dense_prefix_of(3)


def sparse_step(values: ConfigValues) -> MoeLayers | None:
    """Qwen2-MoE, Qwen3-MoE: layer i unless listed in ``mlp_only_layers`` and only where
    ``(i + 1) % decoder_sparse_step == 0``."""
    count = values.integer("num_hidden_layers")
    if count is None:
        return None
    step = values.integer("decoder_sparse_step", 1, minimum=1)
    dense = values.integers("mlp_only_layers") or ()
    return MoeLayers(count, range(step - 1, count, step),
                     f"num_hidden_layers {count}, decoder_sparse_step {step}, "
                     f"mlp_only_layers {list(dense)[:8]}{'...' if len(dense) > 8 else ''}",
                     excluded=frozenset(dense))


def listed_or_interleaved(values: ConfigValues) -> MoeLayers | None:
    """Llama 4: the layers ``moe_layers`` lists, else every
    ``interleave_moe_layer_step``-th layer (transformers' rule)."""
    count = values.integer("num_hidden_layers")
    if count is None:
        return None
    listed = values.integers("moe_layers")
    if listed is not None:
        return MoeLayers(count, frozenset(listed), f"num_hidden_layers {count}, moe_layers "
                         f"{list(listed)[:8]}{'...' if len(listed) > 8 else ''}")
    step = values.integer("interleave_moe_layer_step", 1, minimum=1)
    return MoeLayers(count, range(step - 1, count, step),
                     f"num_hidden_layers {count}, interleave_moe_layer_step {step}")


def expert_period(values: ConfigValues) -> MoeLayers | None:
    """Jamba: every ``expert_layer_period``-th layer from ``expert_layer_offset`` on
    (transformers' defaults 2 and 1)."""
    count = values.integer("num_hidden_layers")
    if count is None:
        return None
    period = values.integer("expert_layer_period", 2, minimum=1)
    offset = values.integer("expert_layer_offset", 1)
    return MoeLayers(count, range(offset, count, period), f"num_hidden_layers {count}, "
                     f"expert_layer_period {period}, expert_layer_offset {offset}")


def mlp_layer_types(values: ConfigValues) -> MoeLayers | None:
    """ERNIE-4.5-VL: the layers ``mlp_layer_types`` marks "sparse" (transformers 5.24's
    default without it: every layer but the first)."""
    count = values.integer("num_hidden_layers")
    if count is None:
        return None
    types = values.strings("mlp_layer_types")
    if types is None:
        return MoeLayers(count, range(1, count), f"num_hidden_layers {count}, every layer "
                         "but the first (no mlp_layer_types)")
    sparse = frozenset(i for i, kind in enumerate(types) if kind == "sparse")
    return MoeLayers(count, sparse, f"num_hidden_layers {count}, mlp_layer_types "
                     f"({len(types)} layers, sparse at {len(sparse)} of them)")


def step3p7_layers(values: ConfigValues) -> MoeLayers | None:
    """Step-3.7 (transformers 5.24's ``Step3p7TextConfig``): the layers ``mlp_layer_types``
    marks "sparse", else those the Hub's legacy ``moe_layers_enum`` lists ("3,4,5" or a
    list), else every layer from the fourth. Hub configs pad the per-layer list with the
    ``num_nextn_predict_layers`` multi-token-prediction layers after the stack (and
    ``moe_layers_enum`` may list them); save_pretrained writes theirs as
    ``mtp_mlp_layer_types``. The MTP layers so marked "sparse" may hold experts."""
    count = values.integer("num_hidden_layers")
    if count is None:
        return None
    mtp = values.integer("num_nextn_predict_layers", values.integer("num_mtp_layers", 0))
    types = values.strings("mlp_layer_types")
    if types is not None:
        stack, after, rule = _split_layer_types(values, types, count, mtp)
    elif values.config.get("moe_layers_enum") is not None:
        listed = _layer_enum(values, "moe_layers_enum")
        stack = frozenset(layer for layer in listed if layer < count)
        after = frozenset(layer for layer in listed if count <= layer < count + mtp)
        shown_layers = sorted(listed)
        rule = (f"moe_layers_enum {shown_layers[:8]}"
                f"{'...' if len(shown_layers) > 8 else ''}")
    else:
        stack, after, rule = range(3, count), frozenset(), "every layer from the fourth"
    return MoeLayers(count, stack, f"num_hidden_layers {count}, num_nextn_predict_layers "
                     f"{mtp}, {rule}", extra=after)


def _split_layer_types(values: ConfigValues, types: tuple[str, ...], count: int, mtp: int
                       ) -> tuple[frozenset[int], frozenset[int], str]:
    """Step-3.7's ``mlp_layer_types`` (``count`` entries, or ``count`` + ``mtp`` padded
    with the MTP layers') and ``mtp_mlp_layer_types``: the sparse layers of the stack, the
    sparse MTP layers, and how the config says so."""
    if len(types) not in (count, count + mtp):
        raise MoekitError(f"{values.source}: mlp_layer_types has {len(types)} entries; "
                          f"expected num_hidden_layers {count}"
                          + (f" (or {count + mtp} with the MTP layers)" if mtp else ""))
    mtp_types = types[count:] or values.strings("mtp_mlp_layer_types") or ()
    unknown = sorted(set(types + mtp_types) - {"sparse", "dense"})
    if unknown:
        raise MoekitError(f"{values.source}: mlp_layer_types holds {shown(unknown)}; expected "
                          '"sparse" or "dense" for each layer')
    stack = frozenset(i for i, kind in enumerate(types[:count]) if kind == "sparse")
    after = frozenset(count + i for i, kind in enumerate(mtp_types[:mtp]) if kind == "sparse")
    return stack, after, f"mlp_layer_types (sparse at {len(stack)} of {count} layers)"


def _layer_enum(values: ConfigValues, key: str) -> frozenset[int]:
    """``config[key]`` as layer numbers: a comma-separated string ("3,4,5") or a list of
    numbers (or of numbers written as strings), as transformers reads Step's
    ``moe_layers_enum``."""
    value = values.config[key]
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise MoekitError(f"{values.source}: {key} is {shown(value)}; expected layer numbers "
                          'as a list or a comma-separated string ("3,4,5")')
    return frozenset(values.checked_integer(f"{key}[{i}]", _as_integer(item))
                     for i, item in enumerate(items) if not isinstance(item, str) or item.strip())


def _as_integer(item: object) -> object:
    """A layer number written as a string ("3") as the number, as transformers' ``int()``
    reads it; anything else as it is, for ``checked_integer`` to judge."""
    if not isinstance(item, str):
        return item
    try:
        return int(item)
    except ValueError:
        return item


_BLOCK_PATTERN = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}


def block_types(values: ConfigValues) -> MoeLayers | None:
    """Nemotron-H: the layers ``layers_block_type`` (or the older
    ``hybrid_override_pattern``, ``E`` for MoE) marks "moe"; their number is the list's
    length (transformers ignores ``num_hidden_layers`` there)."""
    types = values.strings("layers_block_type")
    if types is None:
        pattern = values.string("hybrid_override_pattern")
        if pattern is None:
            return None
        unknown = sorted(set(pattern) - set(_BLOCK_PATTERN))
        if unknown:
            raise MoekitError(f"{values.source}: hybrid_override_pattern holds {shown(unknown)}; "
                              f"expected only {''.join(_BLOCK_PATTERN)}")
        types = tuple(_BLOCK_PATTERN[c] for c in pattern)
        name = "hybrid_override_pattern"
    else:
        name = "layers_block_type"
    moe = frozenset(i for i, kind in enumerate(types) if kind == "moe")
    return MoeLayers(len(types), moe, f"{name} ({len(types)} layers, MoE at "
                     f"{len(moe)} of them)")


def fp8_block(values: ConfigValues) -> tuple[int, int]:
    """(rows, columns) one FP8 block scale covers: ``quantization_config``'s
    ``weight_block_size``, else 128 x 128."""
    quantization = values.config.get("quantization_config")
    if quantization is None:
        return DEFAULT_FP8_BLOCK
    if not isinstance(quantization, dict):
        raise MoekitError(f"{values.source}: quantization_config is {shown(quantization)}; "
                          "expected an object")
    size = quantization.get("weight_block_size")
    if size is None:
        return DEFAULT_FP8_BLOCK
    if (not isinstance(size, list) or len(size) != 2
            or not all(type(n) is int and n >= 1 for n in size)):
        raise MoekitError(f"{values.source}: quantization_config.weight_block_size is "
                          f"{shown(size)}; expected two whole numbers of at least 1, e.g. "
                          "[128, 128]")
    return size[0], size[1]
