"""Prefill + decode with a KV cache and sampling; the same loop on one device and on N ranks.

Prompts of different lengths are left-padded into one batch: positions count only real tokens and
pad keys are masked, so every sequence gets exactly the tokens it would get alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from krakenlm.errors import ConfigError, InputError
from krakenlm.model import LOCAL, Comm, Transformer


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; top_k / top_p filter before sampling; seed makes sampling repeatable."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k: must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")


def sample(logits: Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """Next token per row of logits [B, V]."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / config.temperature
    if config.top_k is not None:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= config.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    prompt_tokens: int
    step_seconds: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        generated = sum(len(t) for t in self.tokens)
        return generated / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def validate_prompts(prompts: list[list[int]], vocab_size: int, context: int, max_new_tokens: int) -> None:
    if not prompts:
        raise InputError("no prompts given")
    for i, p in enumerate(prompts):
        if not p:
            raise InputError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise InputError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary 0..{vocab_size - 1}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > context:
        raise InputError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's "
                         f"context of {context} tokens")


def left_pad(prompts: list[list[int]], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """Token ids, valid mask and position ids [B, T] for a left-padded batch."""
    width = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        idx[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[row, width - len(p):] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    return idx, valid, positions


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int,
             sampling: SamplingConfig | None = None, *, stop_token: int | None = None,
             comm: Comm = LOCAL) -> GenerationResult:
    """Generate up to max_new_tokens per prompt. On N ranks every rank calls this with the same
    arguments; ``comm.agree`` makes rank 0's sampled tokens everyone's."""
    sampling = sampling or SamplingConfig()
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    validate_prompts(prompts, model.config.vocab_size, model.config.block_size, max_new_tokens)
    device = model.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    idx, valid, positions = left_pad(prompts, device)
    batch, width = idx.shape
    cache = model.new_cache(batch, width + max_new_tokens)
    padded = not bool(valid.all())

    start = time.perf_counter()
    logits = model(idx, cache=cache, valid=valid if padded else None, positions=positions,
                   logits_at="last", comm=comm)
    token = comm.agree(sample(logits[:, -1], sampling, generator))
    prefill = time.perf_counter() - start

    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    next_pos = positions[:, -1] + 1
    steps: list[float] = []
    for step in range(max_new_tokens):
        for row in range(batch):
            if not done[row]:
                out[row].append(int(token[row]))
        if stop_token is not None:
            done |= token == stop_token
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        t0 = time.perf_counter()
        logits = model(token.unsqueeze(1), cache=cache, positions=(next_pos + step).unsqueeze(1),
                       logits_at="last", comm=comm)
        token = comm.agree(sample(logits[:, -1], sampling, generator))
        steps.append(time.perf_counter() - t0)
    return GenerationResult(out, prefill, sum(steps), len(steps), int(valid.sum()), steps)
