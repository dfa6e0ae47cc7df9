"""Checks that run before anything expensive (rank processes, dtype probes, weights): a TP degree the model or
the machine cannot take, or a model the memory cannot hold, is refused at once and by name.

Every engine start goes through ``check_engine`` (Engine.launch before it starts a rank, and each rank
before it measures dtypes); the trainer calls ``check_training_memory`` before its dtype probe. The
numbers are lower bounds: they exist to refuse the impossible (``generate --tp 1000``, a 175B model on a
laptop), not to predict peaks.
"""

from __future__ import annotations

import os

import torch

from krakenlm.config import ModelConfig
from krakenlm.dtypes import parse_dtype
from krakenlm.errors import ResourceError
from krakenlm.parallel.plan import ParallelPlan
from krakenlm.resources import gib, model_bytes, require_memory, training_bytes

RANK_PROCESS_BYTES = 256 << 20  # one rank process before any weight: the interpreter, torch, gloo buffers
RANKS_PER_CORE = 4  # CPU ranks past this many per core only thrash (tests and demos use up to 2 per core)
SMALLEST_AUTO = torch.bfloat16  # 'auto' picks bf16 or fp32: the smaller is the lower bound before the probe


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity; a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _dtype(name: str) -> torch.dtype:
    return SMALLEST_AUTO if name == "auto" else parse_dtype(name)


def check_ranks(tp: int) -> None:
    """Refuse starting `tp` rank processes on this host when its cores or memory cannot run them."""
    cores = usable_cores()
    if tp > RANKS_PER_CORE * cores:
        raise ResourceError(f"tp: {tp} rank processes on {cores} CPU core(s); at most {RANKS_PER_CORE * cores} "
                            "can run here (use a smaller --tp, or torchrun across machines)")
    require_memory(tp * RANK_PROCESS_BYTES, f"tp: {tp} rank processes ({gib(RANK_PROCESS_BYTES)} each before "
                   "weights)", "cpu")


def check_engine(config: ModelConfig, tp: int, dtype: str, device: torch.device, *, local_ranks: int = 1,
                 quantize: str | None = None) -> None:
    """The TP degree fits the model's heads and sub-layers, and the weights of `local_ranks` ranks of this
    host fit its memory (on CUDA, one rank's shard fits one device), in the smallest dtype `dtype` allows
    (int8 with `quantize`)."""
    ParallelPlan(config, tp)  # ConfigError naming heads or sub-layers that do not divide
    shard = model_bytes(config, torch.int8 if quantize else _dtype(dtype), fraction=1 / tp)
    what = f"{config.name or 'the model'} ({config.num_params():,} parameters) at tp={tp}"
    if device.type == "cpu":
        require_memory(local_ranks * shard, f"{what}, weights of {local_ranks} local rank(s),", device)
    else:
        require_memory(shard, f"{what}, one rank's weights,", device)


def check_training_memory(config: ModelConfig, batch: int, tokens: int, dtype: str, extra: int,
                          device: torch.device) -> None:
    """Weights, gradients, AdamW state and activations of one training step (plus `extra` bytes) fit."""
    need = training_bytes(config, batch, tokens, _dtype(dtype)) + extra
    require_memory(need, f"training {config.name or 'the model'} ({config.num_params():,} parameters, "
                   f"batch_size={batch} x {tokens} tokens)", device)
