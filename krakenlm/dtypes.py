"""The one table of dtype names every verb and module accepts (short names and lm-eval's long ones)."""

from __future__ import annotations

import torch

from krakenlm.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'fp32' / 'float32', 'bf16' / 'bfloat16', 'fp16' / 'float16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ConfigError(f"dtype: {name} is not supported; use one of {sorted(DTYPES)}")
        return name
    key = _ALIASES.get(name, name)
    if key not in DTYPES:
        raise ConfigError(f"dtype: expected one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a supported dtype ('bf16' for torch.bfloat16)."""
    return next(name for name, value in DTYPES.items() if value == parse_dtype(dtype))
