"""Memory a request needs against memory the device has: one check, called wherever a model, a batch,
a set of evaluation windows or a KV cache is allocated, so an absurd size (n_layer=1e12, a batch of 1e8)
is refused at once with both numbers instead of swapping or building modules for minutes.

API: ``require_memory(needed_bytes, what, device)`` raises ResourceError when the need exceeds
``HEADROOM`` of ``available_memory(device)``; ``model_bytes`` / ``forward_bytes`` / ``training_bytes``
estimate the common needs from a ModelConfig (lower bounds: they exist to refuse the impossible, not to
predict peaks).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from krakenlm.config import ModelConfig
from krakenlm.errors import ResourceError

HEADROOM = 0.9  # refuse a request for more than this share of what is available
GIB = 1 << 30


def _read_int(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().split()[0])
    return None


def _host_available() -> int:
    """MemAvailable from /proc/meminfo, lowered to the cgroup's limit minus its usage when one is set."""
    available = None
    with contextlib.suppress(OSError, StopIteration, ValueError, IndexError):
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        available = int(line.split()[1]) * 1024
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(Path(limit_file)), _read_int(Path(usage_file))
        if limit is not None and usage is not None and limit < 1 << 60:
            available = min(available, max(0, limit - usage))
    return available


def available_memory(device: torch.device | str | None = None) -> int:
    """Bytes that can still be allocated on `device` (default: torch's default device)."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == "meta":
        return 1 << 62
    if device.type == "cpu":
        return _host_available()
    module = getattr(torch, device.type, None)
    mem_get_info = getattr(module, "mem_get_info", None)
    if mem_get_info is None:  # an accelerator without a free-memory query shares the host's memory
        return _host_available()
    return int(mem_get_info(device)[0])


def gib(n: float) -> str:
    """`n` bytes in GiB; an int past float's range (from a config with n_layer 10**400) as a power of ten."""
    try:
        return f"{n / GIB:,.2f} GiB"
    except OverflowError:
        return f"~1e{len(str(int(n) // GIB)) - 1} GiB"


def require_memory(needed: int, what: str, device: torch.device | str | None = None) -> None:
    """Refuse (ResourceError) a request for more than HEADROOM of the memory `device` has available."""
    available = available_memory(device)
    if needed > HEADROOM * available:
        where = torch.device(device) if device is not None else torch.get_default_device()
        raise ResourceError(f"{what} needs at least {gib(needed)} but {where} has {gib(available)} available; "
                            "reduce the size")


def model_bytes(config: ModelConfig, dtype: torch.dtype = torch.float32, fraction: float = 1.0) -> int:
    """Weights of the model (or of the `fraction` of its layers one tensor-parallel rank holds)."""
    layers = config.n_layer * config.layer_params()
    rest = config.num_params() - layers
    return int((layers * fraction + rest) * _itemsize(dtype))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def _layer_activations(config: ModelConfig, batch: int, tokens: int, dtype: torch.dtype) -> int:
    """One layer's widest intermediate (QKV or FFN hidden) and its residual input and output."""
    width = config.n_sub * (max(config.ffn_size, 3 * config.n_embd) + 2 * config.n_embd)
    return batch * tokens * width * _itemsize(dtype)


def forward_bytes(config: ModelConfig, batch: int, tokens: int, dtype: torch.dtype = torch.float32) -> int:
    """Activations of one forward pass, at least: fp32 logits plus one layer's intermediates."""
    return batch * tokens * 4 * config.vocab_size + _layer_activations(config, batch, tokens, dtype)


def training_bytes(config: ModelConfig, batch: int, tokens: int, dtype: torch.dtype = torch.float32) -> int:
    """At least: fp32 weights, gradients and two AdamW moments, logits and their gradient, and every
    layer's intermediates kept for the backward pass."""
    logits = 2 * batch * tokens * 4 * config.vocab_size
    return 16 * config.num_params() + logits + config.n_layer * _layer_activations(config, batch, tokens, dtype)
