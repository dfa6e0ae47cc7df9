"""The one table of dtype names every verb and module accepts (short names and lm-eval's long ones),
and ``auto``: the faster of bf16 and fp32 for a model's shapes on the running machine.

Whether bf16 pays depends on the machine, not the model code: on an AMD Zen 5 (AVX-512 BF16) bf16
GEMMs ran ~4x faster than fp32, on an Intel Xeon without AMX they ran slower (67 vs 105 GFLOP/s).
``auto`` therefore times the model's own weight GEMMs in both (roofline.resolve_dtype), once per
machine and shape, and caches the answer (krakenlm/machine.py). A 16-bit dtype chosen by name that
runs 4x or more slower than fp32 here (an AMD Zen 2 without AVX-512: ~50x) gets a warning.
"""

from __future__ import annotations

import torch

from krakenlm.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO = "auto"
AUTO_CANDIDATES = ("bf16", "fp32")
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'fp32' / 'float32', 'bf16' / 'bfloat16', 'fp16' / 'float16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ConfigError(f"dtype: {name} is not supported; use one of {sorted(DTYPES)}")
        return name
    key = _ALIASES.get(name, name)
    if key not in DTYPES:
        hint = " ('auto' must be resolved for a model first: resolve_dtype)" if name == AUTO else ""
        raise ConfigError(f"dtype: expected one of {sorted(DTYPES)}, got {name!r}{hint}")
    return DTYPES[key]


def check_dtype(name: str) -> str:
    """Validate a dtype name that may be 'auto' (options are checked before any model exists); returns
    its short name ('bf16' for 'bfloat16'), so every config spells a dtype one way."""
    if not isinstance(name, str):
        raise ConfigError(f"dtype: expected one of {sorted(DTYPES)} or auto, got {name!r}")
    return name if name == AUTO else dtype_name(parse_dtype(name))


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a supported dtype ('bf16' for torch.bfloat16)."""
    return next(name for name, value in DTYPES.items() if value == parse_dtype(dtype))
