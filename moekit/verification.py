"""Do two checkpoints hold the same weights, whatever their layouts?

Both sides are planned into the HF per-expert layout and compared tensor by tensor,
byte for byte, one tensor pair in memory at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import MoekitError, printable, shortened
from .executors.evaluate import materialize
from .layouts import HF
from .planner import analyse_checkpoint, build_plan
from .progress import progress
from .sources import FileSource


@dataclass
class Report:
    """The outcome of ``verify``: equal, or every difference named."""

    a: str
    b: str
    layouts: tuple[str, str]
    compared: int = 0
    differences: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not self.differences

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "layouts": list(self.layouts), "equal": self.equal,
                "compared": self.compared, "differences": self.differences}

    SHOWN = 100
    """Differences ``render`` lists; ``to_json`` (``moekit verify --json``) has them all."""

    def render(self) -> str:
        """The outcome for a person: a head line, then one line per difference, up to
        ``SHOWN`` of them (names ``printable``, every line of bounded length)."""
        head = printable(f"{self.a} ({self.layouts[0]}) vs {self.b} ({self.layouts[1]}): "
                         f"{self.compared} tensors compared, ")
        if self.equal:
            return shortened(head + "bit-identical", MoekitError.LINE_LIMIT)
        lines = [f"  {printable(d)}" for d in self.differences[:self.SHOWN]]
        more = len(self.differences) - self.SHOWN
        if more > 0:
            lines.append(f"  ... and {more} more (--json lists every difference)")
        return "\n".join(shortened(line, MoekitError.LINE_LIMIT) for line in
                         [head + f"{len(self.differences)} differ:", *lines])


def verify(a: str | Path, b: str | Path, show_progress: bool | None = None,
           config: str | Path | None = None) -> Report:
    """Compare the weights of checkpoints ``a`` and ``b`` in their HF per-expert form;
    ``config`` names the model's config.json that both are read by (``Checkpoint.open``):
    a training checkpoint without one against its conversion, say."""
    ckpt_a, analysis_a = analyse_checkpoint(a, config=config)
    ckpt_b, analysis_b = analyse_checkpoint(b, config=config)
    plan_a = {t.name: t for t in build_plan(analysis_a, HF).tensors}
    plan_b = {t.name: t for t in build_plan(analysis_b, HF).tensors}
    report = Report(str(a), str(b), (analysis_a.layout.name, analysis_b.layout.name))
    report.differences += [f"{k}: only in {a}" for k in plan_a if k not in plan_b]
    report.differences += [f"{k}: only in {b}" for k in plan_b if k not in plan_a]
    common = [k for k in plan_a if k in plan_b]
    total = sum(plan_a[k].nbytes for k in common)
    with FileSource(ckpt_a) as src_a, FileSource(ckpt_b) as src_b, \
            progress(total, "verify", show_progress) as bar:
        for key in common:
            ta, tb = plan_a[key], plan_b[key]
            report.compared += 1
            bar.update(ta.nbytes)
            if (ta.shape, ta.dtype) != (tb.shape, tb.dtype):
                report.differences.append(f"{key}: {list(ta.shape)} {ta.dtype} vs "
                                          f"{list(tb.shape)} {tb.dtype}")
                continue
            x, y = materialize(ta.recipe, src_a), materialize(tb.recipe, src_b)
            if not _same_bytes(x, y):
                report.differences.append(f"{key}: values differ ({_count_diff(x, y)} of "
                                          f"{x.numel()} elements)")
    return report


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same_bytes(x: torch.Tensor, y: torch.Tensor) -> bool:
    return torch.equal(_bytes(x), _bytes(y))


def _count_diff(x: torch.Tensor, y: torch.Tensor) -> int:
    size = x.element_size()
    return int((_bytes(x).view(-1, size) != _bytes(y).view(-1, size)).any(dim=1).sum())
