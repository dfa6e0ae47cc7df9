"""The ceiling a forward pass is held to: this machine's GEMM throughput at the model's own GEMM shapes
(per dtype), its memory bandwidth, and a forward's FLOPs per category.

A datasheet peak says little about a shared CPU guest (clocks, AVX-512 licences, which kernels the
BLAS picks for a shape), so the peak here is *measured*: every distinct weight GEMM of the model, as
the model runs it (stacked sub-layers batched), timed on random data; the model's peak is their
FLOP-weighted rate. A prefill's MFU is its useful FLOPs (weight GEMMs, causal attention, LM head) per
second over that peak. Results are cached per machine, dtype and shape (krakenlm/machine.py).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from krakenlm.config import ModelConfig
from krakenlm.dtypes import AUTO, AUTO_CANDIDATES, dtype_name, parse_dtype
from krakenlm.machine import MeasurementCache, fastest_seconds, machine_key, processor
from krakenlm.model.attention import attention_flops
from krakenlm.model.layers import stacked_linear
from krakenlm.model.sharding import Shard
from krakenlm.model.transformer import Transformer
from krakenlm.resources import require_memory

PROBES = MeasurementCache("roofline")
MEMORY_PROBE_BYTES = 256 * 2**20  # well beyond any last-level cache
# A 16-bit dtype chosen by name whose GEMMs run this many times slower than fp32 here gets a warning
# (AMD Zen 2, no AVX-512: bf16 ~60x slower; an Intel Xeon without AMX: 1.6x, no warning).
SLOW_16BIT = 4.0
SLOW_16BIT_PROBE = 256  # a [256 x 256] x [256 x 256] GEMM per dtype: milliseconds, once per machine


@dataclass(frozen=True)
class Gemm:
    """One weight GEMM of a forward: ``streams`` stacked [m, k] x [k, n] products, ``count`` times."""

    name: str
    streams: int
    m: int
    k: int
    n: int
    count: int

    @property
    def flops(self) -> float:
        return 2.0 * self.streams * self.m * self.k * self.n * self.count


@dataclass(frozen=True)
class ForwardShape:
    """What one rank computes in one forward: its GEMMs, attention and norm shapes."""

    gemms: tuple[Gemm, ...]
    attention_flops: float
    norm_bytes: float  # activations read and written by the norms
    lm_head: Gemm

    def flops(self) -> dict[str, float]:
        """Useful FLOPs per category (attention at the true head size, padded heads do no useful work)."""
        return {"GEMM": sum(g.flops for g in self.gemms), "attention": self.attention_flops,
                "LM head": self.lm_head.flops}


def forward_shape(config: ModelConfig, shard: Shard | None = None, *, batch: int = 1, prompt: int = 512,
                  head_tokens: int | None = None, pad_heads: int | None = None, itemsize: int = 2) -> ForwardShape:
    """The shapes of one forward of ``batch`` x ``prompt`` tokens (a one-layer model on the meta device
    says which weights exist, so every architecture is read the same way). ``head_tokens``: positions
    the LM head projects (default one per sequence: a prefill's first token)."""
    shard = shard or Shard.full(config)
    with torch.device("meta"):
        model = Transformer(config.replace(n_layer=1), shard, init=False)
        if pad_heads:
            model.pad_heads(pad_heads)
    tokens, layers = batch * prompt, config.n_layer
    layer = model.layers[0]
    gemms = [Gemm(name.replace(".", "_"), w.shape[0], tokens, w.shape[2], w.shape[1], layers)
             for name, w in layer.named_parameters() if w.dim() == 3]
    out_tokens = batch if head_tokens is None else head_tokens
    conj = getattr(model, "conj_weight", None)
    if conj is not None:
        gemms.append(Gemm("conj", 1, out_tokens, conj.shape[1], conj.shape[0], 1))
    attn = layer.attn.shape
    attention = attention_flops(attn.n_head, attn.head_size, prompt, batch * shard.sub_count) * layers
    norms = [m for m in layer.modules() if "Norm" in type(m).__name__]
    norm_bytes = sum(2.0 * itemsize * tokens * m.weight.numel() for m in norms) * layers
    lm_head = Gemm("lm_head", 1, out_tokens, config.n_embd, config.vocab_size, 1)
    return ForwardShape(tuple(gemms), attention, norm_bytes, lm_head)


@dataclass
class Roofline:
    """Measured ceilings for one (machine, dtype, shape): FLOP/s per GEMM and FLOP-weighted, memory B/s."""

    processor: str
    dtype: str
    threads: int
    gemm_flops_per_s: float
    per_gemm: dict[str, float] = field(default_factory=dict)  # name -> FLOP/s
    memory_bytes_per_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _time_gemm(g: Gemm, dtype: torch.dtype, device: torch.device) -> float:
    # fp32 draws, their casts and the output: refuse a shape (a 1e8-token prompt) the device cannot hold
    elements = g.streams * (g.m * g.k + g.n * g.k)
    need = elements * (4 + dtype.itemsize) + g.streams * g.m * g.n * dtype.itemsize
    require_memory(need, f"timing the {g.name} GEMM ({g.streams}x{g.m}x{g.k}x{g.n})", device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(g.streams, g.m, g.k, generator=gen, device=device).to(dtype)
    w = torch.randn(g.streams, g.n, g.k, generator=gen, device=device).to(dtype)
    with torch.no_grad():
        return fastest_seconds(lambda: stacked_linear(x, w), device)


def memory_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large copy (read + write), cached per machine."""
    key = f"{machine_key(device)}|copy {MEMORY_PROBE_BYTES}"
    cached = PROBES.get(key)
    if isinstance(cached, (int, float)) and cached > 0:
        return float(cached)
    src = torch.ones(MEMORY_PROBE_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    seconds = fastest_seconds(lambda: dst.copy_(src), device, repeats=5, budget_s=0.05)
    rate = 2 * MEMORY_PROBE_BYTES / seconds
    PROBES.put(key, rate)
    return rate


def gemm_key(g: Gemm, dtype: str, device: torch.device) -> str:
    """Where one GEMM shape's measured rate is cached."""
    return f"{machine_key(device)}|{dtype}|gemm {g.streams}x{g.m}x{g.k}x{g.n}"


def probe(shape: ForwardShape, dtype: str, device: torch.device | str = "cpu", memory: bool = True,
          busy: int = 0) -> Roofline:
    """Measure (or read from the cache) the GEMM throughput of ``shape``'s weight GEMMs in ``dtype`` and,
    with ``memory``, the memory bandwidth. ``busy``: how many other cores the caller keeps computing
    meanwhile (krakenlm.machine.busy_cores), part of what is cached."""
    device = torch.device(device)
    torch_dtype = parse_dtype(dtype)
    per_gemm: dict[str, float] = {}
    total_flops = total_seconds = 0.0
    for g in shape.gemms:
        if g.count == 1 and g.name == "conj":
            continue  # one small GEMM per forward: not what the model's time is made of
        key = gemm_key(g, dtype, device) + (f"|busy {busy}" if busy else "")
        rate = PROBES.get(key)
        if not isinstance(rate, (int, float)) or rate <= 0:
            rate = 2.0 * g.streams * g.m * g.k * g.n / _time_gemm(g, torch_dtype, device)
            PROBES.put(key, rate)
        per_gemm[g.name] = float(rate)
        total_flops += g.flops
        total_seconds += g.flops / rate
    return Roofline(processor(device), dtype, torch.get_num_threads(), total_flops / total_seconds, per_gemm,
                    memory_bandwidth(device) if memory else 0.0)


def efficiency(shape: ForwardShape, roof: Roofline, seconds: float | None = None,
               breakdown: dict[str, float] | None = None) -> dict[str, Any]:
    """A forward against the roofline: MFU of the whole prefill (``seconds``) and, from a per-category
    breakdown (krakenlm/bench/breakdown.py), each category's rate as a fraction of its ceiling: GEMM
    and attention against the GEMM peak, norms against memory bandwidth, the rest as time only."""
    flops = shape.flops()
    peak = roof.gemm_flops_per_s
    out: dict[str, Any] = {"peak_gemm_flops_per_s": peak, "memory_bytes_per_s": roof.memory_bytes_per_s,
                           "flops": flops, "floor_s": sum(flops.values()) / peak}
    if seconds:
        out["mfu"] = sum(flops.values()) / seconds / peak
    if breakdown:
        gemm_s = breakdown.get("GEMM", 0.0) + breakdown.get("overlapped GEMM", 0.0)
        cats = {"GEMM": (flops["GEMM"], gemm_s), "attention": (flops["attention"], breakdown.get("attention", 0.0))}
        out["category"] = {name: {"seconds": s, "of_peak": f / s / peak if s > 0 else None}
                           for name, (f, s) in cats.items()}
        norm_s = breakdown.get("norm", 0.0)
        bandwidth = roof.memory_bytes_per_s
        out["category"]["norm"] = {"seconds": norm_s, "of_memory_bw": shape.norm_bytes / norm_s / bandwidth
                                   if norm_s > 0 and bandwidth > 0 else None}
        out["category"]["other"] = {"seconds": breakdown.get("other", 0.0)}
    return out


def resolve_dtype(name: str, config: ModelConfig, device: torch.device | str = "cpu", shard: Shard | None = None,
                  tokens: int = 512) -> str:
    """``name`` itself, or for 'auto' the faster of bf16 and fp32 for the weight GEMMs of ``config``
    (as ``shard`` holds them) over ``tokens`` tokens on ``device``, measured once and cached."""
    if name != AUTO:
        chosen = dtype_name(parse_dtype(name))
        _warn_if_slow(chosen, torch.device(device))
        return chosen
    shape = forward_shape(config, shard, prompt=max(1, min(tokens, config.block_size)))
    rates = {d: probe(shape, d, device, memory=False).gemm_flops_per_s for d in AUTO_CANDIDATES}
    return max(AUTO_CANDIDATES, key=rates.__getitem__)


def _warn_if_slow(dtype: str, device: torch.device) -> None:
    """Warn when a 16-bit dtype chosen by name is far slower than fp32 on this CPU (no 16-bit GEMM
    instructions: the run is right but can take an hour where fp32 takes a minute)."""
    if dtype == "fp32" or device.type != "cpu":
        return
    key = f"{machine_key(device)}|{dtype} vs fp32|gemm {SLOW_16BIT_PROBE}"
    slowdown = PROBES.get(key)
    if not isinstance(slowdown, (int, float)) or slowdown <= 0:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(SLOW_16BIT_PROBE, SLOW_16BIT_PROBE, generator=gen)
        half = a.to(parse_dtype(dtype))
        seconds = [fastest_seconds(lambda x=x: x @ x, device, repeats=2) for x in (half, a)]
        slowdown = seconds[0] / seconds[1]
        PROBES.put(key, slowdown)
    if slowdown >= SLOW_16BIT:
        warnings.warn(f"krakenlm: {dtype} GEMMs run {slowdown:.0f}x slower than fp32 on this CPU "
                      f"({processor(device)}); --dtype auto or fp32 would be much faster", RuntimeWarning, stacklevel=3)


def agreed_dtype(name: str, config: ModelConfig, device: torch.device, shard: Shard | None = None, tokens: int = 512,
                 distributed: bool = False) -> str:
    """``resolve_dtype``; ``distributed``: rank 0 of the process group resolves and every rank takes its
    answer (each rank measuring for itself could end in different dtypes)."""
    if name != AUTO or not distributed:
        return resolve_dtype(name, config, device, shard, tokens)
    import torch.distributed as dist

    choice = resolve_dtype(name, config, device, shard, tokens) if dist.get_rank() == 0 else AUTO_CANDIDATES[0]
    index = torch.tensor([AUTO_CANDIDATES.index(choice)], device=device)
    dist.broadcast(index, 0)
    return AUTO_CANDIDATES[int(index.item())]
