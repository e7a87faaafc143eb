"""What each EP rank will read and hold, computed from headers or from config.json alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..checkpoint import Checkpoint, read_config
from ..errors import MoekitError
from ..gc_pauses import without_gc_pauses
from ..hub import local_path
from ..layouts import family_of_model_type
from ..model_config import MAX_BUILT_LAYERS, ConfigValues
from ..planner import (Analysis, build_plan, config_settings, understand, understand_checkpoint,
                       validate)
from .ranges import expert_range, grouped_layout


@dataclass
class RankLoad:
    """One EP rank's share of a checkpoint."""

    rank: int
    experts: list[int]
    """First and last expert owned (empty when the rank owns none)."""
    expert_bytes: int
    other_bytes: int
    peak_bytes: int
    """Everything the rank holds after loading, plus the largest tensor it builds."""

    @property
    def read_bytes(self) -> int:
        return self.expert_bytes + self.other_bytes


@without_gc_pauses
def ep_report(path: str | Path, ep_size: int, layout: str = "nemo",
              placement: str = "chunk") -> list[RankLoad]:
    """Per-rank experts, bytes read and peak memory for loading ``path`` on ``ep_size``
    ranks with the experts placed as ``placement`` says (``chunk`` or ``vllm``, see
    ``expert_range``). ``path`` is a checkpoint, or a config.json (or a folder holding only
    one): then shapes come from the model transformers builds on the meta device, no weights.

    The whole checkpoint is validated and planned once; a rank's grouped tensors hold its
    share of every expert row, so its figures follow from its expert count."""
    if type(ep_size) is not int or ep_size < 1:
        raise MoekitError(f"the expert-parallel group size is {ep_size!r}; expected a whole "
                          "number of ranks, at least 1")
    dst = grouped_layout(layout)
    analysis = _analysis(local_path(path))
    validate(analysis)
    plan = build_plan(analysis, dst)
    n_experts = analysis.n_experts
    per_expert = [t.nbytes // n_experts for t in plan.tensors if t.name in plan.expert_tensors]
    others = [t.nbytes for t in plan.tensors if t.name not in plan.expert_tensors]
    out = []
    for rank in range(ep_size):
        mine = expert_range(n_experts, ep_size, rank, placement)
        expert = len(mine) * sum(per_expert)
        largest = max(max(others, default=0), len(mine) * max(per_expert, default=0))
        owned = [mine.start, mine.stop - 1] if mine else []
        out.append(RankLoad(rank, owned, expert, sum(others), expert + sum(others) + largest))
    return out


def render(loads: list[RankLoad]) -> str:
    """A table, one row per rank."""
    rows = [f"{'rank':>5} {'experts':>10} {'expert GiB':>11} {'other GiB':>10} "
            f"{'read GiB':>9} {'peak GiB':>9}"]
    for r in loads:
        owned = f"{r.experts[0]}-{r.experts[1]}" if r.experts else "none"
        rows.append(f"{r.rank:>5} {owned:>10} {r.expert_bytes / 2**30:11.2f} "
                    f"{r.other_bytes / 2**30:10.2f} {r.read_bytes / 2**30:9.2f} "
                    f"{r.peak_bytes / 2**30:9.2f}")
    return "\n".join(rows)


def to_json(loads: list[RankLoad]) -> list[dict]:
    return [{**asdict(r), "read_bytes": r.read_bytes} for r in loads]


def _analysis(path: Path) -> Analysis:
    """Headers of a checkpoint, or the meta-device model of a bare config.json."""
    config_only = path.suffix == ".json" or (path.is_dir() and not any(path.glob("*.safetensors")))
    if not config_only:
        return understand_checkpoint(Checkpoint.open(path))
    folder, name = (path.parent, path.name) if path.suffix == ".json" else (path, "config.json")
    config = read_config(folder, name)
    if config is None:
        raise MoekitError(f"{path} is neither a checkpoint nor a config.json")
    source = str(folder / name)
    if not isinstance(config, dict):
        raise MoekitError(f"{source} holds a JSON {type(config).__name__}, not an object")
    _check_buildable(config, source)
    return understand(_meta_headers(config, source), config, {}, source,
                      from_="transformers", config_file=source)


def _check_buildable(config: dict, source: str) -> None:
    """Check what a config says of its experts and layers before transformers builds the
    model it describes: the counts typed and bounded, and at most ``MAX_BUILT_LAYERS``
    decoder layers (building takes time per layer, even on the meta device)."""
    family = family_of_model_type(config.get("model_type"))
    settings = config_settings(config, family, source) if family is not None else None
    rule = settings.moe_layers if settings is not None else None
    layers = rule.count if rule is not None else ConfigValues(config, source).integer(
        "num_hidden_layers")
    if layers is not None and layers > MAX_BUILT_LAYERS:
        raise MoekitError(f"{source} declares {layers} decoder layers; moekit plans from a "
                          f"config.json alone for at most {MAX_BUILT_LAYERS} (it builds each "
                          "layer to learn its shapes): plan from the checkpoint's files instead")


def _meta_headers(config: dict, source: str) -> dict:
    """Shapes and dtypes of the state dict transformers builds for ``config``, on the meta
    device (no memory). Only this path imports torch and transformers."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..conversion import state_dict_meta
    except ImportError as err:
        raise MoekitError("planning from a config.json alone needs transformers") from err
    settings = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        model_config = AutoConfig.for_model(**settings)
        dtype = getattr(model_config, "dtype", None) or torch.bfloat16
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    except Exception as err:  # transformers' own errors on a config it cannot build
        raise MoekitError(f"transformers cannot build the model {source} describes: "
                          f"{type(err).__name__}: {err}") from None
    return state_dict_meta(model.state_dict(), allow_meta=True)
