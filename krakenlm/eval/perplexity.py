"""Perplexity: exp(mean next-token cross-entropy) over a fixed, seeded set of windows.

The same windows for the same (data, block, count, seed), so numbers from different models,
checkpoints or runs are comparable; the paper used ~5000 random 1024-token validation windows.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from krakenlm.data import gather_windows, load_tokens, window_starts
from krakenlm.engine import Engine
from krakenlm.errors import InputError
from krakenlm.model import Transformer
from krakenlm.resources import forward_bytes, require_memory
from krakenlm.validation import check_int

TokenSource = str | Path | np.ndarray | Tensor | Sequence[int]


MAX_WINDOWS = 1_000_000  # 200x the paper's ~5000: more is hours of forwards, not a better estimate


@torch.no_grad()
def mean_cross_entropy(model: Transformer | Engine, data: TokenSource, *, split: str = "val",
                       block_size: int | None = None, num_windows: int = 200, batch_size: int = 8, seed: int = 1234,
                       autocast: torch.dtype | None = None) -> float:
    """Mean cross-entropy (nats/token) of the model on `num_windows` seeded random windows of data.

    data: a prepared data dir (uses `split`), a .bin token file, or token ids (array / tensor / list).
    block_size: window length (default: the model's context). autocast: e.g. torch.bfloat16.
    ``model``: a one-device Engine (what `krakenlm eval ppl` runs), or the Transformer a trainer holds.
    """
    forward = model.forward if isinstance(model, Engine) else model
    model = model.model if isinstance(model, Engine) else model
    if model.shard.sub_count != model.config.n_sub or model.shard.parts != 1:
        raise InputError("perplexity needs a full (unsharded) model")
    check_int(num_windows, "num_windows", maximum=MAX_WINDOWS)
    check_int(batch_size, "batch_size")
    tokens = load_tokens(data, split)
    block = block_size or model.config.block_size
    if block > model.config.block_size:
        raise InputError(f"block_size {block} exceeds the model's context of {model.config.block_size}")
    if tokens.size and int(tokens.max()) >= model.config.vocab_size:
        raise InputError(f"data has token id {int(tokens.max())}, outside the model's vocabulary "
                         f"of {model.config.vocab_size}")
    device = model.wte.weight.device
    dtype = autocast or model.wte.weight.dtype
    require_memory(8 * num_windows + forward_bytes(model.config, min(batch_size, num_windows), block, dtype),
                   f"perplexity over {num_windows:,} windows of {block} tokens (batch_size={batch_size})", device)
    starts = window_starts(len(tokens), block, num_windows, torch.Generator().manual_seed(seed))
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    cast = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    try:
        for first in range(0, num_windows, batch_size):  # slices, not split(): no tensor object per batch
            x, y = gather_windows(tokens, starts[first:first + batch_size], block)
            with cast:
                logits = forward(x.to(device))
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum")
            total += loss.double().cpu()
    finally:
        model.train(was_training)
    return float(total) / (num_windows * block)


def perplexity(model: Transformer | Engine, data: TokenSource, *, split: str = "val", block_size: int | None = None,
               num_windows: int = 200, batch_size: int = 8, seed: int = 1234,
               autocast: torch.dtype | None = None) -> float:
    """exp(mean cross-entropy) over seeded windows; arguments as for mean_cross_entropy."""
    return math.exp(mean_cross_entropy(model, data, split=split, block_size=block_size, num_windows=num_windows,
                                       batch_size=batch_size, seed=seed, autocast=autocast))
