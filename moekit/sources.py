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

    Files are opened lazily and re-opened after every ``RELEASE_EVERY_BYTES`` read, so
    that the mapped pages of finished work do not pile up in the process's resident memory.
    """

    RELEASE_EVERY_BYTES = 32 * 2**20

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self._handles: dict[str, object] = {}
        self.bytes_read = 0
        self._since_release = 0

    def read(self, region: Read) -> torch.Tensor:
        if self._since_release >= self.RELEASE_EVERY_BYTES:
            self.release()
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
        size = tensor.numel() * tensor.element_size()
        self.bytes_read += size
        self._since_release += size
        return tensor

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.checkpoint.path / file), framework="pt")
        return self._handles[file]

    def release(self) -> None:
        """Close every open file."""
        self._handles.clear()
        self._since_release = 0

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
