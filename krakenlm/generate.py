"""Sampling on the device and the prefill + decode loop; the same loop on one device and on N ranks.

Prompts of different lengths are left-padded into one batch: positions count only real tokens and
pad keys are masked, so every sequence gets exactly the tokens it would get alone. The loop keeps
tokens on the device: sampling (temperature, top-k, top-p, a seeded draw) needs no host reads, and
the host looks at the tokens only every ``check_every`` steps to stop early, and once at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from krakenlm.errors import InputError
from krakenlm.model import LOCAL, Comm, KVCache, Transformer
from krakenlm.validation import check_float, check_int


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; top_k / top_p filter before sampling; seed makes sampling repeatable."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_float(self.temperature, "temperature", minimum=0)
        check_int(self.top_k, "top_k", optional=True)
        check_float(self.top_p, "top_p", minimum=0, maximum=1, exclusive=True, optional=True)
        check_int(self.seed, "seed", minimum=-(2**63), maximum=2**64 - 1)  # what a torch.Generator takes

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _positive(values: list[float], device: torch.device) -> Tensor:
    """float32 values kept within float32's finite normals: a valid 1e-300 would round to 0 and a valid
    1e39 to inf, turning a division (temperature: masked -inf / inf) or a threshold (top_p: even the first
    token dropped) into a NaN draw."""
    finfo = torch.finfo(torch.float32)
    return torch.tensor(values, dtype=torch.float32, device=device).clamp(min=finfo.tiny, max=finfo.max)


class RowSampler:
    """Per-row sampling parameters as device tensors: one batch may mix greedy and sampled rows with
    their own seeds (a server's requests), or share one config and generator (a batch generate).
    ``generators`` continues existing per-row generators (a server's requests from step to step)."""

    def __init__(self, configs: Sequence[SamplingConfig], device: torch.device, vocab_limit: int | None = None,
                 *, shared_seed: bool = False, generators: Sequence[torch.Generator] | None = None) -> None:
        self.vocab_limit = vocab_limit
        self.all_greedy = all(c.greedy for c in configs)
        self.greedy = torch.tensor([c.greedy for c in configs], device=device)
        self.temperature = _positive([c.temperature or 1.0 for c in configs], device)
        self.top_k = torch.tensor([min(c.top_k or 0, 2**31) for c in configs], device=device)  # > vocab: all
        self.top_p = _positive([c.top_p or 1.0 for c in configs], device)
        # no row filters its distribution: sample it as it is, without sorting the vocabulary (a sort of 50k
        # logits per row per step cost more than the GPT-2 decode step's GEMMs at batch 8)
        self.unfiltered = all(not c.top_k and (c.top_p or 1.0) >= 1.0 for c in configs)
        seeds = configs[:1] if shared_seed else configs
        self.generators = (list(generators) if generators is not None
                           else [torch.Generator(device=device).manual_seed(c.seed) for c in seeds])

    def __call__(self, logits: Tensor) -> Tensor:
        """Next token per row of logits [B, V] (ids >= vocab_limit are never chosen)."""
        logits = logits.float()
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit:] = float("-inf")
        top, best = logits.max(dim=-1, keepdim=True)
        best = best.squeeze(1)
        if self.all_greedy:
            return best
        if self.unfiltered:
            drawn = self._draw(((logits - top) / self.temperature.unsqueeze(1)).softmax(dim=-1))
            return torch.where(self.greedy, best, drawn)
        # shifted so the largest is 0: a tiny temperature sends the others to -inf, never to inf - inf = NaN
        ordered, order = ((logits - top) / self.temperature.unsqueeze(1)).sort(dim=-1, descending=True)
        # top-k keeps every logit >= the k-th largest (ties included); k = 0 keeps all
        kth = ordered.gather(1, (self.top_k.clamp(1, ordered.shape[-1]) - 1).unsqueeze(1))
        drop = (self.top_k.unsqueeze(1) > 0) & (ordered < kth)
        ordered = ordered.masked_fill(drop, float("-inf"))
        # top-p drops a token when the tokens before it already reach top_p (the first always stays)
        probs = ordered.softmax(dim=-1)
        ordered = ordered.masked_fill(probs.cumsum(dim=-1) - probs >= self.top_p.unsqueeze(1), float("-inf"))
        probs = torch.full_like(logits, float("-inf")).scatter(1, order, ordered).softmax(dim=-1)
        drawn = self._draw(probs)
        return torch.where(self.greedy, best, drawn)

    def _draw(self, probs: Tensor) -> Tensor:
        """One draw per row by inverting its CDF at a uniform from the row's generator (one generator: one
        uniform per row from it), in float64. Exact, like torch.multinomial, whose one-row call took
        ~0.9 ms on a 50k vocabulary (Intel Xeon family 6 model 167): 7 of a served 8-row step's ~84 ms."""
        rows = probs.shape[0]
        kw = {"dtype": torch.float64, "device": probs.device}
        if len(self.generators) == 1:
            uniform = torch.rand(rows, generator=self.generators[0], **kw)
        else:
            uniform = torch.cat([torch.rand(1, generator=g, **kw) for g in self.generators])
        cdf = probs.double().cumsum(dim=-1)
        total = cdf[:, -1]
        below = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))  # < the total
        return torch.searchsorted(cdf, below.unsqueeze(1), right=True).squeeze(1)  # never a zero-probability id


@dataclass(frozen=True)
class Stop:
    """When a row is finished: one of ``tokens`` was produced (not part of the output) or, checked on
    rank 0 only, the decoded text contains one of ``strings``."""

    tokens: tuple[int, ...] = ()
    strings: tuple[str, ...] = ()


HIDDEN_BEHIND = {"kraken": "Kraken AllReduce time hidden behind attention",
                 "ladder": "Ladder AllReduce time hidden behind the next module"}


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    prompt_tokens: int
    step_seconds: list[float] = field(default_factory=list)
    exchange_hidden: float | None = None  # Kraken / ladder TP, eager: share of async AllReduces hidden by compute

    @property
    def decode_tokens_per_second(self) -> float:
        generated = sum(len(t) for t in self.tokens)
        return generated / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def completions(self, prompts: Sequence[str], decode: Callable[[list[int]], str]) -> list[str]:
        """Each prompt followed by its decoded continuation, in prompt order."""
        return [text + decode(tokens) for text, tokens in zip(prompts, self.tokens, strict=True)]

    def summary(self, tp: int, arch: str) -> list[str]:
        """The run's timing lines (and how much AllReduce time was hidden, when the run measured it)."""
        lines = [f"[tp={tp}] prompt tokens {self.prompt_tokens}, TTFT {self.prefill_seconds * 1e3:.1f} ms, "
                 f"decode {self.decode_tokens_per_second:.1f} tokens/s"]
        if self.exchange_hidden is not None:
            what = HIDDEN_BEHIND.get(arch, "AllReduce time hidden by the --overlap mode")
            lines.append(f"[tp={tp}] {what}: {self.exchange_hidden:.0%}")
        return lines


def validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, context: int, max_new_tokens: int,
                     kind: str = "prompt") -> None:
    """Refuse what the model cannot serve, before any rank does work (``kind`` names the rows in messages)."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens: must be an integer >= 0, got {max_new_tokens!r}")
    if not prompts:
        raise InputError(f"no {kind}s given")
    for i, p in enumerate(prompts):
        if not p:
            raise InputError(f"{kind} {i} is empty")
        bad = [t for t in p if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
        if bad:
            raise InputError(f"{kind} {i} has token ids {bad[:5]} that are not integers in 0..{vocab_size - 1}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > context:
        raise InputError(f"{kind} of {longest} tokens + {max_new_tokens} new tokens exceeds the model's "
                         f"context of {context} tokens")


def left_pad(prompts: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """Token ids, valid mask and position ids [B, T] for a left-padded batch."""
    width = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, p in enumerate(prompts):
        idx[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[row, width - len(p):] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    return idx.to(device), valid.to(device), positions.to(device)


DecodeStep = Callable[[Tensor, Tensor, Tensor, KVCache], Tensor]


@dataclass
class Generation:
    """One batch generation on one rank; every rank of a group runs it in lockstep.

    ``decode`` is the (possibly compiled) one-token step; ``new_cache(batch, max_len)`` makes the
    static KV cache; ``synchronize`` waits for the device so
    timings are the device's; ``agree`` makes rank 0's tokens and stop decision everyone's; ``text`` (rank 0
    only) decodes token ids for stop strings.
    """

    model: Transformer
    decode: DecodeStep
    new_cache: Callable[[int, int], KVCache]
    comm: Comm = LOCAL
    synchronize: Callable[[], None] = lambda: None  # noqa: E731
    text: Callable[[list[int]], str] | None = None
    check_every: int = 8
    timed_steps: bool = False
    agree: Callable[[Tensor], Tensor] = lambda tokens: tokens  # noqa: E731  (rank 0's values for every rank)

    @torch.inference_mode()
    def run(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampler: RowSampler,
            stop: Stop | None = None) -> GenerationResult:
        stop = stop or Stop()
        device = self.model.wte.weight.device
        idx, valid, positions = left_pad(prompts, device)
        batch, width = idx.shape
        if max_new_tokens == 0:
            return GenerationResult([[] for _ in prompts], 0.0, 0.0, 0, int(valid.sum()))
        cache = self.new_cache(batch, width + max_new_tokens)
        out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
        self.synchronize()
        start = time.perf_counter()
        logits = self.model(idx, cache=cache, valid=None if len({len(p) for p in prompts}) == 1 else valid,
                            positions=positions, logits_at="last", comm=self.comm)
        token = self.agree(sampler(logits[:, -1]))
        out[:, 0] = token
        self.synchronize()
        prefill = time.perf_counter() - start
        slots = torch.full((batch,), width, dtype=torch.long, device=device)
        pos = positions[:, -1] + 1
        steps, step_seconds, produced = 0, [], 1
        for step in range(1, max_new_tokens):
            if step % (1 if stop.strings else self.check_every) == 0 and self._finished(out[:, :step], stop):
                break
            t0 = time.perf_counter()
            token = self.agree(sampler(self.decode(token, slots, pos, cache)))
            out[:, step] = token
            slots += 1
            pos += 1
            steps, produced = steps + 1, step + 1
            if self.timed_steps:
                self.synchronize()
                step_seconds.append(time.perf_counter() - t0)
        self.synchronize()
        decode = time.perf_counter() - start - prefill
        rows = [_cut(row, stop.tokens) for row in out[:, :produced].tolist()]
        return GenerationResult(rows, prefill, decode, steps, int(valid.sum()), step_seconds)

    def _finished(self, produced: Tensor, stop: Stop) -> bool:
        """Whether every row has stopped (one host read); rank 0's answer is everyone's."""
        rows = [_cut(row, stop.tokens) for row in produced.tolist()]
        done = [len(row) < produced.shape[1] for row in rows]
        if stop.strings and self.text is not None:
            done = [d or any(s in self.text(row) for s in stop.strings) for d, row in zip(done, rows, strict=True)]
        flag = torch.tensor([all(done)], device=produced.device)
        return bool(self.agree(flag).item())


def _cut(row: list[int], stop_tokens: tuple[int, ...]) -> list[int]:
    for i, token in enumerate(row):
        if token in stop_tokens:
            return row[:i]
    return row


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: SamplingConfig | None = None, *, stop_token: int | None = None,
             vocab_limit: int | None = None) -> GenerationResult:
    """Single-device convenience: up to max_new_tokens per prompt (eager; the Engine adds TP and compile)."""
    sampling = sampling or SamplingConfig()
    validate_prompts(prompts, model.config.vocab_size, model.config.block_size, max_new_tokens)
    sampler = RowSampler([sampling] * len(prompts), model.wte.weight.device, vocab_limit, shared_seed=True)
    loop = Generation(model, lambda t, s, p, c: model.decode(t, s, p, c), model.new_cache)
    return loop.run(prompts, max_new_tokens, sampler, Stop(() if stop_token is None else (stop_token,)))
