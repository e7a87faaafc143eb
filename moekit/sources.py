"""Where recipes read from: checkpoint files (through safetensors) or an in-memory dict."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import Checkpoint
from .errors import MoekitError
from .plan import Read


class TensorSource(Protocol):
    """Something a recipe's reads can be served from."""

    def read(self, region: Read) -> torch.Tensor:
        """The tensor region ``region`` names (it may share memory with the source)."""


class FileSource:
    """Reads tensor regions from a checkpoint's files; only the requested bytes are read.

    Files are opened lazily and kept open until ``release()``; the streaming executor
    releases after each destination tensor so that the mapped pages of finished work do
    not accumulate in the process's resident memory.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self._handles: dict[str, object] = {}
        self.bytes_read = 0

    def read(self, region: Read) -> torch.Tensor:
        file = self.checkpoint.file_of(region.key)
        try:
            handle = self._handle(file)
            if region.is_whole:
                tensor = handle.get_tensor(region.key)
            else:
                tensor = handle.get_slice(region.key)[region.region]
        except SafetensorError as err:
            raise MoekitError(f"cannot read {region.key} from {Path(self.checkpoint.path, file)}: "
                              f"{err}") from err
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.checkpoint.path / file), framework="pt")
        return self._handles[file]

    def release(self) -> None:
        """Close every open file."""
        self._handles.clear()

    def __enter__(self) -> "FileSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class DictSource:
    """Reads tensor regions from an in-memory state dict (views, no copies)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.state_dict = state_dict

    def read(self, region: Read) -> torch.Tensor:
        tensor = self.state_dict[region.key]
        return tensor[region.region] if region.region else tensor
