"""Expert parallelism: each rank loads and saves only its own experts, as DTensors.

Names are imported on first use: ``moekit plan`` reads headers and plans every rank
without importing torch."""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_EXPORTS = {"expert_range": "ranges", "load_experts": "load", "load_sharded": "sharded",
            "save_experts": "save", "save_sharded": "sharded_save"}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
