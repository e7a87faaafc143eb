"""The safetensors dtype names moekit plans with, and their torch equivalents.

Plans carry dtypes as safetensors strings ("BF16", "F8_E4M3", ...) so that they stay
plain data, printable and comparable without torch.
"""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


def to_torch(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    return TORCH_DTYPES[name]


def to_safetensors(dtype: torch.dtype) -> str:
    """The safetensors dtype name of a torch dtype."""
    return SAFETENSORS_DTYPES[dtype]


def itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype."""
    return TORCH_DTYPES[name].itemsize
