"""The safetensors dtype names moekit plans with, their sizes, and their torch equivalents.

Plans carry dtypes as safetensors strings ("BF16", "F8_E4M3", ...) so that they stay
plain data, printable and comparable without torch; reading headers and planning import
no torch at all (``moekit inspect`` and ``--dry-run`` start in a fraction of the time).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ITEMSIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8,
    "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}
"""Bytes per element of every safetensors dtype moekit handles."""


@cache
def _torch_dtypes() -> dict[str, "torch.dtype"]:
    import torch

    return {
        "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
        "U16": torch.uint16, "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64,
        "U64": torch.uint64, "F16": torch.float16, "BF16": torch.bfloat16,
        "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }


@cache
def _safetensors_names() -> dict["torch.dtype", str]:
    return {v: k for k, v in _torch_dtypes().items()}


def to_torch(name: str) -> "torch.dtype":
    """The torch dtype of a safetensors dtype name."""
    return _torch_dtypes()[name]


def to_safetensors(dtype: "torch.dtype") -> str:
    """The safetensors dtype name of a torch dtype."""
    return _safetensors_names()[dtype]


def itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype."""
    return ITEMSIZES[name]
