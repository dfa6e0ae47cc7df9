"""The estimator: config + hardware + workload + layout -> time, memory, MFU and cost per phase.

Composition of one layer on one chip (all times per forward):

    compute  C = 2 * matmul params * tokens / chips / (peak[dtype] * matmul_eff)
               + 4 * tokens * context * q_width / chips / (peak[dtype] * matmul_eff * attention_eff)
    memory   M = (weight bytes read + KV bytes read/written) / (memory_bw * memory_eff)
    comm     X = sum of the layout's collectives (collectives.py; link_bw * comm_eff)
    (matmul_eff, attention_eff and memory_eff may be per dtype; attention_eff is 1 unless calibrated)
    overlap "none":  layer = max(C, M) + X + layer_overhead_s       (default)
    overlap "full":  layer = max(C, M, X) + layer_overhead_s
    Kraken:  layer = max(max(C_attn, M_attn), X_overlapped) + max(C_ffn, M_ffn) + X_blocking + overhead
             (the previous layer's all-reduce runs under this layer's attention; layer 0 has none)
    Ladder:  modules u_1..u_2L (attention, FFN, ...) of time c_k = max(C_k, M_k) and all-reduce X_k;
             u_k's all-reduce runs under u_{k+1}'s compute, so each step costs max(c_{k+1}, X_k)
             (exposed comm max(0, X_k - c_{k+1})) and the last X_2L is awaited after the stack;
             layers below ``ladder_start`` pay their all-reduces in line (Megatron 1d-ws only)

A phase is n_layer layers plus the LM head (2*V*E FLOPs per sequence, prefill: only the last
position is projected; split over the chips, or whole on each with ``Layout(head="replicated")``)
and, for Kraken, the conjunction (local matmul + one all-reduce of B*d).
Prefill processes B*prompt tokens with causal attention (mean context (prompt+1)/2); a decode step
processes B tokens at the mean context prompt + generate/2; decode time = generate * step.
MFU = 2 * num_params * tokens / (chips * peak * time) (the paper's definition; attention excluded).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from krakenlm.config import ModelConfig
from krakenlm.costmodel.collectives import Group, collective_time
from krakenlm.costmodel.hardware import BYTES, DTYPES, Hardware
from krakenlm.costmodel.layouts import (
    ATTENTION,
    FFN_LAYOUTS,
    KRAKEN_LAYOUT,
    CommOp,
    gathered_fraction,
    kraken_ops,
    kv_bytes_per_token,
    kv_cache_bytes_per_chip,
    layer_pairs,
    make_mesh,
    pair_ops,
    sequences_per_chip,
)
from krakenlm.errors import ConfigError

PHASES = ("prefill", "decode")
OVERLAP = ("none", "full")
PREFILL_LAYOUTS = FFN_LAYOUTS
DECODE_LAYOUTS = ("1d-ws", "2d-ws")  # the paper always decodes weight-stationary
LM_HEAD = ("sharded", "replicated")
LADDER_LAYOUT = "1d-ws/attn-heads"  # Megatron TP, what the Ladder Residual schedule overlaps


@dataclass(frozen=True)
class Workload:
    """What is asked of the model: ``batch`` sequences, ``prompt`` tokens in, ``generate`` tokens out.

    ``dtype`` is the weight type (int8 = weight-only quantisation, matmuls in bf16); activations and
    the KV cache are bf16 unless dtype is fp32/fp16.
    """

    batch: int = 1
    prompt: int = 128
    generate: int = 0
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        for key in ("batch", "prompt"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"workload: {key} must be a positive integer, got {value!r}")
        if not isinstance(self.generate, int) or self.generate < 0:
            raise ConfigError(f"workload: generate must be an integer >= 0, got {self.generate!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"workload: dtype must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def act_bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2


@dataclass(frozen=True)
class Layout:
    """How a phase is partitioned: FFN layout (or "kraken"), attention sharding, number of chips, and
    whether the LM head is split over the vocabulary ("sharded", usual for tensor parallelism) or
    computed whole on every chip ("replicated", what the krakenlm runtime does)."""

    ffn: str
    attention: str = "heads"
    chips: int = 1
    head: str = "sharded"

    def __post_init__(self) -> None:
        if self.head not in LM_HEAD:
            raise ConfigError(f"layout: head must be one of {LM_HEAD}, got {self.head!r}")
        if self.ffn not in FFN_LAYOUTS + (KRAKEN_LAYOUT,):
            raise ConfigError(f"layout: must be one of {FFN_LAYOUTS + (KRAKEN_LAYOUT,)}, got {self.ffn!r}")
        if self.attention not in ATTENTION:
            raise ConfigError(f"layout: attention must be one of {ATTENTION}, got {self.attention!r}")
        if not isinstance(self.chips, int) or self.chips < 1:
            raise ConfigError(f"chips: must be a positive integer, got {self.chips!r}")

    def __str__(self) -> str:
        return self.ffn if self.ffn == KRAKEN_LAYOUT else f"{self.ffn}/attn-{self.attention}"


@dataclass(frozen=True)
class PhaseEstimate:
    """Time and its parts for one phase (prefill: the whole forward; decode: one step)."""

    phase: str
    layout: str
    tokens: int  # tokens processed by this forward (B*prompt or B)
    time_s: float
    compute_s: float
    memory_s: float
    comm_s: float
    exposed_comm_s: float
    overhead_s: float
    flops_per_chip: float
    bytes_per_chip: float
    comm_bytes_per_chip: float
    mfu: float
    chip_seconds_per_token: float

    @property
    def bound(self) -> str:
        """Which term dominates: compute, memory or comm."""
        parts = {"compute": self.compute_s, "memory": self.memory_s, "comm": self.exposed_comm_s}
        return max(parts, key=parts.__getitem__)


@dataclass(frozen=True)
class Estimate:
    """Prediction for one request shape: per-phase breakdown plus the derived user-facing numbers."""

    model: str
    hardware: str
    chips: int
    workload: Workload
    prefill: PhaseEstimate
    decode: PhaseEstimate | None
    ttft_s: float
    per_token_s: float
    total_s: float
    chip_seconds_per_token: float
    memory_per_chip_bytes: float
    weights_per_chip_bytes: float
    kv_per_chip_bytes: float
    max_context: int
    fits: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["prefill"]["bound"] = self.prefill.bound
        if self.decode is not None:
            data["decode"]["bound"] = self.decode.bound
        return data


# Per-layer pieces -----------------------------------------------------------------------------------
def _ops_time(ops: list[CommOp], hw: Hardware, act_bytes: int, w_bytes: int) -> tuple[float, float]:
    """(blocking, overlappable) seconds of a layer's collectives on ``hw``."""
    blocking = overlapped = 0.0
    for op in ops:
        t = collective_time(op.kind, op.elements * (w_bytes if op.tensor == "weight" else act_bytes), op.group, hw)
        if op.overlapped:
            overlapped += t
        else:
            blocking += t
    return blocking, overlapped


def _comm_bytes(ops: list[CommOp], act_bytes: int, w_bytes: int) -> float:
    return sum(op.elements * (w_bytes if op.tensor == "weight" else act_bytes) for op in ops)


def _attn_ffn_params(config: ModelConfig) -> tuple[int, int]:
    """Matmul parameters of one sub-layer's attention and FFN."""
    d, hd = config.n_embd, config.head_size
    q, kv = config.n_head * hd, config.kv_heads * hd
    f = config.ffn_size
    ffn_in = (2 if config.mlp == "swiglu" else 1) * f
    return d * (q + 2 * kv) + q * d, d * (ffn_in + f)


def phase_estimate(config: ModelConfig, hw: Hardware, workload: Workload, phase: str, layout: Layout,
                   overlap: str = "none") -> PhaseEstimate:
    """One forward of ``phase`` under ``layout``: the module docstring's composition, itemised."""
    if phase not in PHASES:
        raise ConfigError(f"phase: must be one of {PHASES}, got {phase!r}")
    if overlap not in OVERLAP:
        raise ConfigError(f"overlap: must be one of {OVERLAP}, got {overlap!r}")
    kraken, ladder = config.arch == "kraken", config.arch == "ladder"
    if kraken != (layout.ffn == KRAKEN_LAYOUT):
        raise ConfigError(f"layout: {layout.ffn!r} does not apply to arch={config.arch!r} "
                          f"(Kraken models use 'kraken', gpt/parallel/ladder models one of {FFN_LAYOUTS})")
    if ladder and str(layout) != LADDER_LAYOUT:
        raise ConfigError(f"layout: ladder models run Megatron TP, {LADDER_LAYOUT!r} (one all-reduce per "
                          f"module, which ladder overlaps), got {str(layout)!r}")
    n, b = layout.chips, workload.batch
    seq_len = workload.prompt if phase == "prefill" else 1
    context = (workload.prompt + 1) / 2 if phase == "prefill" else workload.prompt + workload.generate / 2
    tokens = b * seq_len
    w_bytes, a_bytes = BYTES[workload.dtype], workload.act_bytes
    flop_rate, attn_rate = hw.flop_rate(workload.dtype), hw.attention_rate(workload.dtype)
    mem_rate = hw.memory_rate(workload.dtype)
    q_width = config.n_head * config.head_size * config.n_sub
    attn_p, ffn_p = _attn_ffn_params(config)
    attn_p, ffn_p = attn_p * config.n_sub, ffn_p * config.n_sub
    # KV traffic per layer per chip: prefill writes the new K/V, decode reads the whole cache.
    kv_tok = kv_bytes_per_token(config, n, layout.attention, a_bytes) / config.n_layer
    seqs = sequences_per_chip(config, b, n, layout.attention)
    kv_rw = kv_tok * seqs * (seq_len if phase == "prefill" else workload.prompt + workload.generate / 2)
    attn_flops = 4 * tokens * context * q_width / n

    if kraken:
        ops = kraken_ops(config, n, tokens)
        fraction = 1 / n
    else:
        mesh = make_mesh(n, hw.torus_axes)
        ops = [op for pair in layer_pairs(config) for op in pair_ops(layout.ffn, pair, tokens, mesh)]
        fraction = gathered_fraction(layout.ffn, mesh)
        if layout.attention == "batch" and n > 1:
            qkv = config.n_head * config.head_size + 2 * config.kv_heads * config.head_size
            everyone = Group(tuple(mesh))
            ops += [CommOp("all_to_all", tokens * qkv / n, everyone),
                    CommOp("all_to_all", tokens * config.n_head * config.head_size / n, everyone)]
    blocking, overlapped = _ops_time(ops, hw, a_bytes, w_bytes)
    c_attn = 2 * tokens * attn_p / n / flop_rate + attn_flops / attn_rate
    c_ffn = 2 * tokens * ffn_p / n / flop_rate
    m_attn = (attn_p * fraction * w_bytes + kv_rw) / mem_rate
    m_ffn = ffn_p * fraction * w_bytes / mem_rate
    compute, memory = c_attn + c_ffn, m_attn + m_ffn
    ladder_exposed: float | None = None
    if kraken:
        first = max(c_attn, m_attn) + max(c_ffn, m_ffn) + blocking
        rest = max(max(c_attn, m_attn), overlapped) + max(c_ffn, m_ffn) + blocking
        if overlap == "full":
            first = max(compute, memory, blocking)
            rest = max(compute, memory, blocking + overlapped)
        layers = first + (config.n_layer - 1) * rest
    elif overlap == "full":
        layers = config.n_layer * max(compute, memory, blocking + overlapped)
    elif ladder:
        x_attn, x_ffn = (sum(_ops_time(pair_ops(layout.ffn, pair, tokens, mesh), hw, a_bytes, w_bytes))
                         for pair in layer_pairs(config))
        modules = [(max(c_attn, m_attn), x_attn), (max(c_ffn, m_ffn), x_ffn)] * config.n_layer
        layers, ladder_exposed = ladder_stack(modules, max(2 * config.ladder_start - 1, 0))
    else:
        layers = config.n_layer * (max(compute, memory) + blocking + overlapped)
    # Head: LM head on the last position of each sequence (plus Kraken's conjunction).
    vocab_p = config.vocab_size * config.n_embd / (n if layout.head == "sharded" else 1)
    head_p = vocab_p + (config.n_sub * config.n_embd ** 2 / n if kraken else 0)
    c_head = 2 * b * head_p / flop_rate
    m_head = head_p * w_bytes / mem_rate
    x_head = collective_time("all_reduce", b * config.n_embd * a_bytes, Group((n,)), hw) if kraken else 0.0
    overhead = config.n_layer * hw.layer_overhead_s
    time_s = layers + max(c_head, m_head) + x_head + overhead
    n_comm_layers = config.n_layer - 1 if kraken else config.n_layer
    comm = config.n_layer * blocking + n_comm_layers * overlapped + x_head
    exposed = (time_s - overhead - config.n_layer * max(compute, memory) - max(c_head, m_head)
               if ladder_exposed is None else ladder_exposed)
    flops = config.n_layer * (2 * tokens * (attn_p + ffn_p) / n + attn_flops) + c_head * flop_rate
    mfu = 2 * config.num_params() * tokens / (n * hw.peak(workload.dtype) * time_s)
    return PhaseEstimate(
        phase=phase, layout=str(layout), tokens=tokens, time_s=time_s,
        compute_s=config.n_layer * compute + c_head, memory_s=config.n_layer * memory + m_head,
        comm_s=comm, exposed_comm_s=max(exposed, 0.0), overhead_s=overhead, flops_per_chip=flops,
        bytes_per_chip=config.n_layer * memory * mem_rate + m_head * mem_rate,
        comm_bytes_per_chip=config.n_layer * _comm_bytes(ops, a_bytes, w_bytes), mfu=mfu,
        chip_seconds_per_token=n * time_s / tokens)


def ladder_stack(modules: list[tuple[float, float]], first_async: int) -> tuple[float, float]:
    """(time, exposed comm) of a module sequence given as (compute, all-reduce) seconds.

    Modules from index ``first_async`` on issue their all-reduce async, so it runs under the next
    module's compute and only max(0, X_k - c_{k+1}) shows (the next module waits for it before it
    starts: the runtime awaits u_k before u_{k+2}, so the link carries one all-reduce at a time);
    earlier modules reduce in line; the last in-flight all-reduce is awaited after the stack.
    """
    time = exposed = inflight = 0.0
    for index, (compute, comm) in enumerate(modules):
        time += max(compute, inflight)
        exposed += max(inflight - compute, 0.0)
        inflight = comm if index >= first_async else 0.0
        if index < first_async:
            time, exposed = time + comm, exposed + comm
    return time + inflight, exposed + inflight


# Memory ---------------------------------------------------------------------------------------------
def weights_per_chip(config: ModelConfig, chips: int, dtype: str) -> float:
    """Weight bytes stored per chip: every layout keeps one 1/n shard (weight-gathered ones too)."""
    return config.num_params() * BYTES[dtype] / chips


def max_context(config: ModelConfig, hw: Hardware, chips: int, batch: int, attention: str = "heads",
                dtype: str = "bf16", kv_fraction: float | None = None) -> int:
    """Longest context (tokens per sequence) whose KV cache fits.

    The KV budget is ``kv_fraction`` of HBM when given (the paper's Table 1 reserves 30%), else the
    HBM left after the weights.
    """
    kv_bytes = 4 if dtype == "fp32" else 2
    if kv_fraction is not None:
        budget = kv_fraction * hw.memory_bytes
    else:
        budget = hw.memory_bytes - weights_per_chip(config, chips, dtype)
    per_token = kv_bytes_per_token(config, chips, attention, kv_bytes) * sequences_per_chip(
        config, batch, chips, attention)
    return max(0, math.floor(budget / per_token))


# Layout choice and the public entry point -----------------------------------------------------------
def candidate_layouts(config: ModelConfig, chips: int, phase: str) -> list[Layout]:
    """Layouts worth trying for ``phase``: Kraken and ladder models have one; others the paper's options."""
    if config.arch == "kraken":
        return [Layout(KRAKEN_LAYOUT, "heads", chips)]
    if config.arch == "ladder":
        return [Layout("1d-ws", "heads", chips)]
    names = PREFILL_LAYOUTS if phase == "prefill" else DECODE_LAYOUTS
    return [Layout(f, a, chips) for f in names for a in ATTENTION]


def _as_layout(layout: Layout | str | None, config: ModelConfig, chips: int, lm_head: str) -> Layout | None:
    if layout is None or isinstance(layout, Layout):
        return layout
    ffn, _, attn = layout.partition("/")
    return Layout(ffn, attn.removeprefix("attn-") or "heads", chips, lm_head)


def best_phase(config: ModelConfig, hw: Hardware, workload: Workload, phase: str, chips: int,
               overlap: str = "none", lm_head: str = "sharded") -> PhaseEstimate:
    """The fastest candidate layout for ``phase`` (the decode choice also weighs KV memory fit)."""
    best = None
    for lay in candidate_layouts(config, chips, phase):
        lay = replace(lay, head=lm_head)
        est = phase_estimate(config, hw, workload, phase, lay, overlap)
        if best is None or est.time_s < best[0].time_s:
            best = (est, lay)
    assert best is not None
    return best[0]


def estimate(config: ModelConfig, hw: Hardware, workload: Workload, chips: int = 1,
             layout: Layout | str | tuple[Layout | str | None, Layout | str | None] | None = None,
             overlap: str = "none", lm_head: str = "sharded") -> Estimate:
    """Predict one request shape. ``layout`` is one layout for both phases, a (prefill, decode) pair,
    or None to pick the fastest per phase. Strings look like ``2d-ws/attn-batch`` or ``kraken``;
    ``lm_head`` applies to string and searched layouts ("replicated" = the krakenlm runtime)."""
    pre, dec = layout if isinstance(layout, tuple) else (layout, layout)
    pre_l, dec_l = _as_layout(pre, config, chips, lm_head), _as_layout(dec, config, chips, lm_head)
    prefill = (phase_estimate(config, hw, workload, "prefill", pre_l, overlap) if pre_l
               else best_phase(config, hw, workload, "prefill", chips, overlap, lm_head))
    decode = None
    if workload.generate:
        decode = (phase_estimate(config, hw, workload, "decode", dec_l, overlap) if dec_l
                  else best_phase(config, hw, workload, "decode", chips, overlap, lm_head))
    per_token = decode.time_s if decode else 0.0
    total = prefill.time_s + workload.generate * per_token
    tokens_all = workload.batch * (workload.prompt + workload.generate)
    attention = "heads"
    if decode is not None and "attn-batch" in decode.layout:
        attention = "batch"
    context = workload.prompt + workload.generate
    w = weights_per_chip(config, chips, workload.dtype)
    kv = kv_cache_bytes_per_chip(config, workload.batch, context, chips, attention, workload.act_bytes)
    notes = []
    if w + kv > hw.memory_bytes:
        notes.append(f"does not fit: {(w + kv) / 2**30:.1f} GiB per chip > {hw.memory_bytes / 2**30:.1f} GiB")
    return Estimate(
        model=config.name or config.arch, hardware=hw.name, chips=chips, workload=workload, prefill=prefill,
        decode=decode, ttft_s=prefill.time_s, per_token_s=per_token, total_s=total,
        chip_seconds_per_token=chips * total / tokens_all, memory_per_chip_bytes=w + kv, weights_per_chip_bytes=w,
        kv_per_chip_bytes=kv, max_context=max_context(config, hw, chips, workload.batch, attention, workload.dtype),
        fits=w + kv <= hw.memory_bytes, notes=notes)
