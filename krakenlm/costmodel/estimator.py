"""The estimator: config + hardware + workload + layout (+ pipeline) -> time, memory, MFU and cost.

Composition of one layer on one chip (all times per forward):

    compute  C = 2 * matmul params * tokens / chips / (peak[dtype] * matmul_eff)
               + 4 * tokens * context * q_width / chips / (peak[dtype] * matmul_eff * attention_eff)
    memory   M = (weight bytes read + KV bytes read/written) / (memory_bw * memory_eff)
    comm     X = sum of the layout's collectives (collectives.py: link_bw * comm_eff inside a node,
               hierarchical over the network when a group spans nodes)
    (matmul_eff, attention_eff and memory_eff may be per dtype; attention_eff is 1 unless calibrated)
    overlap "none":  layer = max(C, M) + X + layer_overhead_s       (default)
    overlap "full":  layer = max(C, M, X) + layer_overhead_s
    overlap "chunked:K" / "collective-matmul" (gpt and parallel on 1d-ws): standard TP overlapped by
             the system, pair by pair (overlap.py): layer = max(C, M) + sum of each pair's exposed part
    Kraken:  layer = max(max(C_attn, M_attn), X_overlapped) + max(C_ffn, M_ffn) + X_blocking + overhead
             (the previous layer's all-reduce runs under this layer's attention; layer 0 has none)
    Ladder:  modules u_1..u_2L (attention, FFN, ...) of time c_k = max(C_k, M_k) and all-reduce X_k;
             u_k's all-reduce runs under u_{k+1}'s compute, so each step costs max(c_{k+1}, X_k)
             (exposed comm max(0, X_k - c_{k+1})) and the last X_2L is awaited after the stack;
             layers below ``ladder_start`` pay their all-reduces in line (Megatron 1d-ws only); a
             pipeline stage runs this over its own layers and awaits its last X before the hand-off
    (``LAYER_RULES`` holds the per-architecture rule: a new architecture adds its own overlap there.)

A phase is n_layer layers plus the LM head (2*V*E FLOPs per sequence, prefill: only the last
position is projected; split over the chips, or whole on each with ``Layout(head="replicated")``)
and, for Kraken, the conjunction (local matmul + one all-reduce of B*d). With pipeline stages the
layers are split over the stages and the phase time composes the stages (pipeline.py).
Prefill processes B*prompt tokens with causal attention (mean context (prompt+1)/2); a decode step
processes B' tokens (B' = the decode batch, B unless set) at the mean context prompt + generate/2;
decode time = generate * step.
MFU = 2 * num_params * tokens / (chips * peak * time) (the paper's definition; attention excluded).
Whole request, with prefill batch P and decode batch D: a request costs chips * (t_prefill / P +
generate * t_step / D) chip-seconds; chip-seconds per token divides that by prompt + generate and the
request's MFU is 2 * num_params / (peak * chip-seconds per token).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from krakenlm.config import ModelConfig
from krakenlm.costmodel.collectives import collective_time, p2p_time
from krakenlm.costmodel.hardware import BYTES, DTYPES, Hardware
from krakenlm.costmodel.layouts import (
    CommOp,
    check_split,
    gathered_fraction,
    kraken_ops,
    kv_bytes_per_token,
    kv_cache_bytes_per_chip,
    layer_pairs,
    make_mesh,
    mesh_group,
    pair_ops,
    sequences_per_chip,
    wg_rest_group,
)
from krakenlm.costmodel.overlap import (
    SYSTEM_MODES,
    Overlap,
    PairWork,
    chunks_used,
    pair_comm,
    pair_extra,
    parse_overlap,
)
from krakenlm.costmodel.pipeline import Pipeline, crosses_node, pipeline_time, stage_layers
from krakenlm.errors import ConfigError
from krakenlm.layout import ATTENTION, FFN_LAYOUTS, KRAKEN_LAYOUT

PHASES = ("prefill", "decode")
SYSTEM_OVERLAP_ARCHS = ("gpt", "parallel")  # what chunked / collective-matmul overlap: Megatron 1d-ws
PREFILL_LAYOUTS = FFN_LAYOUTS
DECODE_LAYOUTS = ("1d-ws", "2d-ws")  # the paper always decodes weight-stationary
LM_HEAD = ("sharded", "replicated")
LADDER_LAYOUT = "1d-ws/attn-heads"  # Megatron TP, what the Ladder Residual schedule overlaps
MAX_BATCH = 1 << 30


def _positive_int(key: str, value: Any, minimum: int = 1, maximum: int = MAX_BATCH) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise ConfigError(f"workload: {key} must be an integer in [{minimum}, {maximum}], got {value!r}")


@dataclass(frozen=True)
class Workload:
    """What is asked of the model: ``batch`` sequences, ``prompt`` tokens in, ``generate`` tokens out.

    ``decode_batch`` is the batch of the decode steps when it differs from the prefill's (a server
    prefills requests one at a time and decodes them together); None = ``batch``.
    ``dtype`` is the weight type (int8 = weight-only quantisation, matmuls in bf16); activations and
    the KV cache are bf16 unless dtype is fp32/fp16.
    """

    batch: int = 1
    prompt: int = 128
    generate: int = 0
    dtype: str = "bf16"
    decode_batch: int | None = None

    def __post_init__(self) -> None:
        _positive_int("batch", self.batch)
        _positive_int("prompt", self.prompt, maximum=1 << 40)
        _positive_int("generate", self.generate, minimum=0, maximum=1 << 40)
        if self.decode_batch is not None:
            _positive_int("decode_batch", self.decode_batch)
        if self.dtype not in DTYPES:
            raise ConfigError(f"workload: dtype must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def act_bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    def phase_batch(self, phase: str) -> int:
        """Sequences per forward of ``phase``."""
        return self.batch if phase == "prefill" or self.decode_batch is None else self.decode_batch


def beyond_context(config: ModelConfig, workload: Workload) -> bool:
    """Whether the request runs past the model's trained context (prompt + new > block_size)."""
    return workload.prompt + workload.generate > config.block_size


def check_context(config: ModelConfig, workload: Workload) -> None:
    """A model with learned positions has no position past block_size: the request must fit, as the engine
    requires. A position-free (RoPE) model computes the same shapes past it, so a cost estimate goes on
    (Pope et al.'s Table 3 prices PaLM 62B at 2048 + 64 tokens); the estimate carries a note instead."""
    if beyond_context(config, workload) and config.position == "learned":
        raise ConfigError(f"prompt, generate: {workload.prompt} prompt + {workload.generate} generated tokens "
                          f"exceed the context of {config.name or config.arch} ({config.block_size} tokens, "
                          f"block_size)")


@dataclass(frozen=True)
class Layout:
    """How a phase is partitioned: FFN layout (or "kraken"), attention sharding, number of chips (per
    pipeline stage: the tensor-parallel degree), and whether the LM head is split over the vocabulary
    ("sharded", usual for tensor parallelism) or computed whole on every chip ("replicated", what the
    krakenlm runtime does)."""

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
        if not isinstance(self.chips, int) or isinstance(self.chips, bool) or self.chips < 1:
            raise ConfigError(f"chips: must be a positive integer, got {self.chips!r}")

    def __str__(self) -> str:
        return self.ffn if self.ffn == KRAKEN_LAYOUT else f"{self.ffn}/attn-{self.attention}"


@dataclass(frozen=True)
class PhaseEstimate:
    """Time and its parts for one phase (prefill: the whole forward; decode: one step). With pipeline
    stages the parts are those of the busiest stage's chips over all micro-batches."""

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
    stages: int = 1
    microbatches: int = 1
    p2p_s: float = 0.0  # one micro-batch's point-to-point transfers through the pipeline
    bubble_s: float = 0.0  # time the busiest stage idles (pipeline.py)

    @property
    def hidden_comm_s(self) -> float:
        """Communication that ran under compute or memory traffic: comm_s less what was exposed."""
        return max(self.comm_s - self.exposed_comm_s, 0.0)

    @property
    def bound(self) -> str:
        """Which term dominates: compute, memory, comm or the pipeline bubble."""
        parts = {"compute": self.compute_s, "memory": self.memory_s, "comm": self.exposed_comm_s,
                 "bubble": self.bubble_s}
        return max(parts, key=parts.__getitem__)


@dataclass(frozen=True)
class Estimate:
    """Prediction for one request shape: per-phase breakdown plus the derived user-facing numbers."""

    model: str
    hardware: str
    chips: int  # all chips: tp x stages
    tp: int
    stages: int
    workload: Workload
    prefill: PhaseEstimate
    decode: PhaseEstimate | None
    ttft_s: float
    per_token_s: float
    total_s: float
    chip_seconds_per_token: float  # whole request (module docstring)
    mfu: float  # whole request
    requests_per_s: float  # one deployment, steady state, at these batches
    memory_per_chip_bytes: float
    weights_per_chip_bytes: float
    kv_per_chip_bytes: float  # the larger of the two below
    kv_prefill_bytes: float
    kv_decode_bytes: float
    max_context: int
    fits: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name, phase in (("prefill", self.prefill), ("decode", self.decode)):
            if phase is not None:
                data[name]["bound"], data[name]["hidden_comm_s"] = phase.bound, phase.hidden_comm_s
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
    """Bytes per chip moved by ``ops``: an all-reduce of D counts 2D (it is a reduce-scatter plus an
    all-gather of D, the accounting 1d-ws's AG + RS uses), and a collective over one chip moves nothing."""
    return sum(op.elements * (w_bytes if op.tensor == "weight" else act_bytes) * (2 if op.kind == "all_reduce" else 1)
               for op in ops if op.group.size > 1)


def _attn_ffn_params(config: ModelConfig) -> tuple[int, int]:
    """Matmul parameters of one sub-layer's attention and FFN."""
    d, hd = config.n_embd, config.head_size
    q, kv = config.n_head * hd, config.kv_heads * hd
    f = config.ffn_size
    ffn_in = (2 if config.mlp == "swiglu" else 1) * f
    return d * (q + 2 * kv) + q * d, d * (ffn_in + f)


@dataclass(frozen=True)
class _Costs:
    """One layer and the head of one forward (one micro-batch) on one chip: the module docstring's terms."""

    tokens: int
    c_attn: float
    c_ffn: float
    m_attn: float
    m_ffn: float
    blocking: float
    overlapped: float
    layer_flops: float
    layer_comm_bytes: float
    c_head: float
    m_head: float
    x_head: float
    flop_rate: float
    mem_rate: float
    x_attn: float = 0.0  # ladder: the attention module's all-reduce, hidden under the next module
    x_ffn: float = 0.0   # ladder: the FFN module's
    system_extra: float = 0.0  # chunked / collective-matmul: what the pairs add to max(C, M) (overlap.py)

    @property
    def compute(self) -> float:
        return self.c_attn + self.c_ffn

    @property
    def memory(self) -> float:
        return self.m_attn + self.m_ffn


def _layer_ops(config: ModelConfig, hw: Hardware, layout: Layout, tokens: int) -> tuple[list[CommOp], float]:
    """A layer's collectives and the fraction of its weights each chip multiplies with."""
    n, cpn = layout.chips, hw.chips_per_node
    if config.arch == "kraken":
        return kraken_ops(config, n, tokens, cpn), 1 / n
    mesh = make_mesh(n, hw.torus_axes)
    ops = [op for pair in layer_pairs(config) for op in pair_ops(layout.ffn, pair, tokens, mesh, cpn)]
    if layout.attention == "batch" and n > 1:
        qkv = config.n_head * config.head_size + 2 * config.kv_heads * config.head_size
        # Weight-gathered layouts already shard the batch over the gathered axes: only the rest exchange.
        group = (wg_rest_group(layout.ffn, mesh, cpn) if layout.ffn.startswith("wg-")
                 else mesh_group(mesh, tuple(range(len(mesh))), cpn))
        ops += [CommOp("all_to_all", tokens * qkv / n, group),
                CommOp("all_to_all", tokens * config.n_head * config.head_size / n, group)]
    return ops, gathered_fraction(layout.ffn, mesh)


def _module_comm(config: ModelConfig, hw: Hardware, layout: Layout, tokens: int, a_bytes: int,
                 w_bytes: int) -> tuple[float, float]:
    """Ladder: the (attention, FFN) modules' all-reduce times, which ladder_stack overlaps one by one."""
    if config.arch != "ladder":
        return 0.0, 0.0
    mesh = make_mesh(layout.chips, hw.torus_axes)
    x_attn, x_ffn = (sum(_ops_time(pair_ops(layout.ffn, pair, tokens, mesh, hw.chips_per_node), hw, a_bytes,
                                   w_bytes)) for pair in layer_pairs(config))
    return x_attn, x_ffn


def _system_pairs(config: ModelConfig, hw: Hardware, layout: Layout, tokens: int, overlap: Overlap,
                  rates: tuple[float, float], nbytes: tuple[int, int]) -> tuple[float, float]:
    """(seconds added to max(C, M), seconds of communication issued) by a standard-TP layer's pairs under
    a system overlap mode (overlap.py): each pair's in/out projections (1/n of the weights, 1d-ws) and
    its all-reduce of tokens x E over every chip of the stage. ``rates``: FLOP/s and HBM bytes/s;
    ``nbytes``: bytes per weight and per activation element."""
    (flop_rate, mem_rate), (w_bytes, a_bytes), n = rates, nbytes, layout.chips
    mesh = make_mesh(n, hw.torus_axes)
    group = mesh_group(mesh, tuple(range(len(mesh))), hw.chips_per_node)
    extra = comm = 0.0
    for pair in layer_pairs(config):
        d = tokens * pair.e * a_bytes
        p_in, p_out = pair.e * pair.f_in / n, pair.f_out * pair.e / n
        work = PairWork(c_in=2 * tokens * p_in / flop_rate, m_in=p_in * w_bytes / mem_rate,
                        c_out=2 * tokens * p_out / flop_rate, m_out=p_out * w_bytes / mem_rate,
                        x_chunk=collective_time("all_reduce", d / chunks_used(overlap, tokens), group, hw),
                        x_step=p2p_time(d / n, hw, group.nodes > 1, hw.ring_hop_eff) if n > 1 else 0.0)
        extra += pair_extra(work, overlap, n, *hw.overlap_factors(overlap.mode), tokens)
        comm += pair_comm(work, overlap, n, tokens)
    return extra, comm


def _costs(config: ModelConfig, hw: Hardware, workload: Workload, phase: str, layout: Layout, b: int,
           overlap: Overlap) -> _Costs:
    """The per-layer and head terms for ``b`` sequences of ``phase`` under ``layout`` and ``overlap``."""
    n = layout.chips
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
    ops, fraction = _layer_ops(config, hw, layout, tokens)
    blocking, overlapped = _ops_time(ops, hw, a_bytes, w_bytes)
    system_extra = 0.0
    if overlap.system:  # the pairs' all-gathers / reduce-scatters are priced by overlap.py; all-to-alls block
        blocking, _ = _ops_time([op for op in ops if op.kind == "all_to_all"], hw, a_bytes, w_bytes)
        system_extra, overlapped = _system_pairs(config, hw, layout, tokens, overlap, (flop_rate, mem_rate),
                                                 (w_bytes, a_bytes))
    x_attn, x_ffn = _module_comm(config, hw, layout, tokens, a_bytes, w_bytes)
    # Head: LM head on the last position of each sequence (plus Kraken's conjunction).
    kraken = config.arch == "kraken"
    vocab_p = config.vocab_size * config.n_embd / (n if layout.head == "sharded" else 1)
    head_p = vocab_p + (config.n_sub * config.n_embd ** 2 / n if kraken else 0)
    x_head = (collective_time("all_reduce", b * config.n_embd * a_bytes, mesh_group((n,), (0,), hw.chips_per_node), hw)
              if kraken else 0.0)
    return _Costs(
        tokens=tokens, c_attn=2 * tokens * attn_p / n / flop_rate + attn_flops / attn_rate,
        c_ffn=2 * tokens * ffn_p / n / flop_rate, m_attn=(attn_p * fraction * w_bytes + kv_rw) / mem_rate,
        m_ffn=ffn_p * fraction * w_bytes / mem_rate, blocking=blocking, overlapped=overlapped,
        layer_flops=2 * tokens * (attn_p + ffn_p) / n + attn_flops, layer_comm_bytes=_comm_bytes(ops, a_bytes, w_bytes),
        c_head=2 * b * head_p / flop_rate, m_head=head_p * w_bytes / mem_rate, x_head=x_head, flop_rate=flop_rate,
        mem_rate=mem_rate, x_attn=x_attn, x_ffn=x_ffn, system_extra=system_extra)


# Composition ----------------------------------------------------------------------------------------
def _standard_layer(k: _Costs, overlap: str) -> tuple[float | None, float]:
    """gpt / parallel blocks: every layer alike (no distinct first layer); under a system overlap mode the
    pairs' collectives are in ``system_extra`` (issued async: ``overlapped``), the all-to-alls block."""
    if overlap in SYSTEM_MODES:
        return None, max(k.compute, k.memory) + k.blocking + k.system_extra
    if overlap == "full":
        return None, max(k.compute, k.memory, k.blocking + k.overlapped)
    return None, max(k.compute, k.memory) + k.blocking + k.overlapped


def _kraken_layer(k: _Costs, overlap: str) -> tuple[float | None, float]:
    """Kraken: the previous layer's all-reduce hides under attention; layer 0 has none to hide."""
    if overlap == "full":
        return max(k.compute, k.memory, k.blocking), max(k.compute, k.memory, k.blocking + k.overlapped)
    ffn = max(k.c_ffn, k.m_ffn)
    return (max(k.c_attn, k.m_attn) + ffn + k.blocking,
            max(max(k.c_attn, k.m_attn), k.overlapped) + ffn + k.blocking)


# arch -> (time of layer 0 or None when it is like the others, time of any later layer); with no full
# overlap a ladder stage is priced module by module instead (_ladder_stage)
LAYER_RULES = {"gpt": _standard_layer, "parallel": _standard_layer, "kraken": _kraken_layer,
               "ladder": _standard_layer}


def _ladder_stage(config: ModelConfig, k: _Costs, overlap: str, start: int, layers: int) -> tuple[float, float] | None:
    """(time, exposed comm) of ladder layers start..start+layers-1 by ladder_stack, None unless ladder
    without full overlap. Below ``ladder_start`` modules reduce in line; the stage's first async module
    is at max(2 * (ladder_start - start) - 1, 0), and its last all-reduce is awaited at the stage's end."""
    if config.arch != "ladder" or overlap == "full":
        return None
    modules = [(max(k.c_attn, k.m_attn), k.x_attn), (max(k.c_ffn, k.m_ffn), k.x_ffn)] * layers
    return ladder_stack(modules, max(2 * (config.ladder_start - start) - 1, 0))


def _stage_time(config: ModelConfig, k: _Costs, hw: Hardware, overlap: str, start: int, layers: int,
                last: bool) -> float:
    """One micro-batch through a stage of ``layers`` layers from layer ``start`` (``last``: the head)."""
    ladder = _ladder_stage(config, k, overlap, start, layers)
    if ladder is not None:
        t = ladder[0]
    else:
        t_first, t_rest = LAYER_RULES[config.arch](k, overlap)
        t = t_first + (layers - 1) * t_rest if start == 0 and t_first is not None else layers * t_rest
    if last:
        t = t + max(k.c_head, k.m_head) + k.x_head
    return t + layers * hw.layer_overhead_s


def _check_phase(config: ModelConfig, hw: Hardware, workload: Workload, phase: str, layout: Layout,
                 overlap: Overlap, stages: int) -> None:
    if phase not in PHASES:
        raise ConfigError(f"phase: must be one of {PHASES}, got {phase!r}")
    if overlap.system and (config.arch not in SYSTEM_OVERLAP_ARCHS or layout.ffn != "1d-ws"):
        raise ConfigError(f"overlap: {overlap} overlaps standard tensor parallelism (gpt / parallel models on "
                          f"1d-ws), got arch={config.arch!r} on {layout.ffn!r}; Kraken and ladder models overlap "
                          f"by their own schedule (overlap none)")
    if (config.arch == "kraken") != (layout.ffn == KRAKEN_LAYOUT):
        raise ConfigError(f"layout: {layout.ffn!r} does not apply to arch={config.arch!r} "
                          f"(Kraken models use 'kraken', gpt/parallel/ladder models one of {FFN_LAYOUTS})")
    if config.arch == "ladder" and str(layout) != LADDER_LAYOUT:
        raise ConfigError(f"layout: ladder models run Megatron TP, {LADDER_LAYOUT!r} (one all-reduce per "
                          f"module, which ladder overlaps), got {str(layout)!r}")
    check_context(config, workload)
    check_split(config, layout.chips, stages, hw.chips_per_node)


def phase_estimate(config: ModelConfig, hw: Hardware, workload: Workload, phase: str, layout: Layout,
                   overlap: str | Overlap = "none", pipeline: Pipeline | None = None) -> PhaseEstimate:
    """One forward of ``phase`` under ``layout`` (on each of ``pipeline.stages`` stages): the module
    docstring's composition, itemised; automatic micro-batching picks the fastest count. ``overlap``:
    none, full, chunked:K or collective-matmul (overlap.py)."""
    pipe, ov = pipeline or Pipeline(), parse_overlap(overlap)
    _check_phase(config, hw, workload, phase, layout, ov, pipe.stages)
    batch = workload.phase_batch(phase)
    best = None
    for m in pipe.options(phase, batch):
        est = _pipelined(config, hw, workload, phase, layout, ov, pipe.stages, m)
        if best is None or est.time_s < best.time_s:
            best = est
    assert best is not None
    return best


def _pipelined(config: ModelConfig, hw: Hardware, workload: Workload, phase: str, layout: Layout, ov: Overlap,
               stages: int, m: int) -> PhaseEstimate:
    """The phase on ``stages`` stages with ``m`` micro-batches (pipeline.py's formulas)."""
    batch, overlap = workload.phase_batch(phase), ov.mode
    k = _costs(config, hw, workload, phase, layout, batch // m, ov)
    layers = stage_layers(config.n_layer, stages)
    starts = [sum(layers[:s]) for s in range(stages)]
    times = [_stage_time(config, k, hw, overlap, starts[s], n, s == stages - 1) for s, n in enumerate(layers)]
    p2p_bytes = k.tokens * config.n_embd * config.n_sub * workload.act_bytes / layout.chips
    p2p = [p2p_time(p2p_bytes, hw, crosses_node(s, layout.chips, hw.chips_per_node)) for s in range(stages - 1)]
    total = pipeline_time(phase, times, p2p, m)
    s = max(range(stages), key=times.__getitem__)  # the busiest stage
    first, last, n_layers = s == 0, s == stages - 1, layers[s]
    c_head, m_head, x_head = (k.c_head, k.m_head, k.x_head) if last else (0.0, 0.0, 0.0)
    overhead = n_layers * hw.layer_overhead_s
    n_overlapped = n_layers - 1 if config.arch == "kraken" and first else n_layers
    ladder = _ladder_stage(config, k, overlap, starts[s], n_layers)
    exposed = (times[s] - overhead - n_layers * max(k.compute, k.memory) - max(c_head, m_head) if ladder is None
               else ladder[1] + x_head)
    chips = layout.chips * stages
    tokens = batch * (workload.prompt if phase == "prefill" else 1)
    return PhaseEstimate(
        phase=phase, layout=str(layout), tokens=tokens, time_s=total,
        compute_s=m * (n_layers * k.compute + c_head), memory_s=m * (n_layers * k.memory + m_head),
        comm_s=m * (n_layers * k.blocking + n_overlapped * k.overlapped + x_head),
        exposed_comm_s=m * max(exposed, 0.0), overhead_s=m * overhead,
        flops_per_chip=m * (n_layers * k.layer_flops + c_head * k.flop_rate),
        bytes_per_chip=m * (n_layers * k.memory * k.mem_rate + m_head * k.mem_rate),
        comm_bytes_per_chip=m * n_layers * k.layer_comm_bytes,
        mfu=2 * config.num_params() * tokens / (chips * hw.peak(workload.dtype) * total),
        chip_seconds_per_token=chips * total / tokens, stages=stages, microbatches=m, p2p_s=sum(p2p),
        bubble_s=max(total - m * times[s], 0.0))


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
def stage_params(config: ModelConfig, stages: int) -> list[int]:
    """Parameters per pipeline stage: its layers, the embeddings on the first, the final norm,
    conjunction and a copy of the (tied) LM head on the last."""
    layers = stage_layers(config.n_layer, stages)
    per_layer = config.layer_params()
    if stages == 1:
        return [config.num_params()]
    embed = config.vocab_size * config.n_embd + (config.block_size * config.n_embd if config.position == "learned"
                                                 else 0)
    tail = config.num_params() - config.n_layer * per_layer - embed + config.vocab_size * config.n_embd
    out = [n * per_layer for n in layers]
    out[0] += embed
    out[-1] += tail
    return out


def weights_per_chip(config: ModelConfig, chips: int, dtype: str, stages: int = 1) -> float:
    """Weight bytes stored per chip (``chips`` per stage) on the fullest stage: every layout keeps one
    1/n shard of its stage's weights (weight-gathered ones too)."""
    if stages == 1:
        return config.num_params() * BYTES[dtype] / chips
    return max(stage_params(config, stages)) * BYTES[dtype] / chips


def _stage_share(config: ModelConfig, stages: int) -> float:
    """Fraction of the layers (and so of the KV cache) on the fullest stage."""
    return max(stage_layers(config.n_layer, stages)) / config.n_layer


def kv_per_chip(config: ModelConfig, batch: int, context: int, chips: int, attention: str, kv_bytes: int,
                stages: int = 1) -> float:
    """KV cache bytes on one chip of the fullest stage (``chips`` per stage)."""
    kv = kv_cache_bytes_per_chip(config, batch, context, chips, attention, kv_bytes)
    return kv if stages == 1 else kv * _stage_share(config, stages)


def max_context(config: ModelConfig, hw: Hardware, chips: int, batch: int, attention: str = "heads",
                dtype: str = "bf16", kv_fraction: float | None = None, stages: int = 1) -> int:
    """Longest context (tokens per sequence) whose KV cache fits (``chips`` per stage).

    The KV budget is ``kv_fraction`` of HBM when given (the paper's Table 1 reserves 30%), else the
    HBM left after the weights.
    """
    kv_bytes = 4 if dtype == "fp32" else 2
    if kv_fraction is not None:
        budget = kv_fraction * hw.memory_bytes
    else:
        budget = hw.memory_bytes - weights_per_chip(config, chips, dtype, stages)
    per_token = kv_bytes_per_token(config, chips, attention, kv_bytes) * sequences_per_chip(
        config, batch, chips, attention)
    if stages > 1:
        per_token *= _stage_share(config, stages)
    return max(0, math.floor(budget / per_token))


# Layout choice and the public entry point -----------------------------------------------------------
def candidate_layouts(config: ModelConfig, chips: int, phase: str, overlap: str | Overlap = "none") -> list[Layout]:
    """Layouts worth trying for ``phase`` (``chips`` per stage): Kraken and ladder models have one; others
    the paper's, or Megatron's 1d-ws alone under a system overlap mode (what chunked / collective-matmul
    overlap)."""
    if config.arch == "kraken":
        return [Layout(KRAKEN_LAYOUT, "heads", chips)]
    if config.arch == "ladder":
        return [Layout("1d-ws", "heads", chips)]
    names = PREFILL_LAYOUTS if phase == "prefill" else DECODE_LAYOUTS
    if parse_overlap(overlap).system:
        names = ("1d-ws",)
    return [Layout(f, a, chips) for f in names for a in ATTENTION]


def _as_layout(layout: Layout | str | None, config: ModelConfig, chips: int, lm_head: str) -> Layout | None:
    if layout is None or isinstance(layout, Layout):
        return layout
    ffn, _, attn = layout.partition("/")
    return Layout(ffn, attn.removeprefix("attn-") or "heads", chips, lm_head)


def best_phase(config: ModelConfig, hw: Hardware, workload: Workload, phase: str, chips: int,
               overlap: str | Overlap = "none", lm_head: str = "sharded",
               pipeline: Pipeline | None = None) -> PhaseEstimate:
    """The fastest candidate layout for ``phase`` on ``chips`` chips per stage."""
    best = None
    for lay in candidate_layouts(config, chips, phase, overlap):
        est = phase_estimate(config, hw, workload, phase, replace(lay, head=lm_head), overlap, pipeline)
        if best is None or est.time_s < best.time_s:
            best = est
    assert best is not None
    return best


def tp_degree(chips: int, stages: int) -> int:
    """Chips per pipeline stage: ``chips`` must split into ``stages`` equal stages."""
    if not isinstance(chips, int) or isinstance(chips, bool) or chips < 1:
        raise ConfigError(f"chips: must be a positive integer, got {chips!r}")
    Pipeline(stages=stages)  # validates the stage count
    if chips % stages:
        raise ConfigError(f"chips: {chips} chips do not split into {stages} equal pipeline stages")
    return chips // stages


def _as_pipeline(pipeline: Pipeline | int | None) -> Pipeline:
    if pipeline is None:
        return Pipeline()
    return pipeline if isinstance(pipeline, Pipeline) else Pipeline(stages=pipeline)


def estimate(config: ModelConfig, hw: Hardware, workload: Workload, chips: int = 1,
             layout: Layout | str | tuple[Layout | str | None, Layout | str | None] | None = None,
             overlap: str | Overlap = "none", lm_head: str = "sharded",
             pipeline: Pipeline | int | None = None) -> Estimate:
    """Predict one request shape on ``chips`` chips in all (``pipeline`` stages of chips / stages each).
    ``layout`` is one layout for both phases, a (prefill, decode) pair, or None to pick the fastest per
    phase. Strings look like ``2d-ws/attn-batch`` or ``kraken``; ``lm_head`` applies to string and
    searched layouts ("replicated" = the krakenlm runtime)."""
    pipe = _as_pipeline(pipeline)
    tp = tp_degree(chips, pipe.stages)
    check_context(config, workload)
    check_split(config, tp, pipe.stages, hw.chips_per_node)
    pre, dec = layout if isinstance(layout, tuple) else (layout, layout)
    pre_l, dec_l = _as_layout(pre, config, tp, lm_head), _as_layout(dec, config, tp, lm_head)
    for lay in (pre_l, dec_l):
        if lay is not None and lay.chips != tp:
            raise ConfigError(f"layout: {lay} is for {lay.chips} chips per stage, the estimate has {tp} "
                              f"({chips} chips in {pipe.stages} stage(s))")
    prefill = (phase_estimate(config, hw, workload, "prefill", pre_l, overlap, pipe) if pre_l
               else best_phase(config, hw, workload, "prefill", tp, overlap, lm_head, pipe))
    decode = None
    if workload.generate:
        decode = (phase_estimate(config, hw, workload, "decode", dec_l, overlap, pipe) if dec_l
                  else best_phase(config, hw, workload, "decode", tp, overlap, lm_head, pipe))
    return _assemble(config, hw, workload, tp, pipe.stages, prefill, decode)


def _attention_of(phase: PhaseEstimate) -> str:
    return "batch" if phase.layout.endswith("attn-batch") else "heads"


def _assemble(config: ModelConfig, hw: Hardware, workload: Workload, tp: int, stages: int,
              prefill: PhaseEstimate, decode: PhaseEstimate | None) -> Estimate:
    """The whole request from its phases: latency, cost, MFU, memory at the peak of either phase."""
    chips, wl = tp * stages, workload
    per_token = decode.time_s if decode else 0.0
    p_batch, d_batch = wl.phase_batch("prefill"), wl.phase_batch("decode")
    request_chip_s = chips * (prefill.time_s / p_batch + wl.generate * per_token / d_batch)
    cost = request_chip_s / (wl.prompt + wl.generate)
    w = weights_per_chip(config, tp, wl.dtype, stages)
    kv_pre = kv_per_chip(config, p_batch, wl.prompt, tp, _attention_of(prefill), wl.act_bytes, stages)
    kv_dec = (kv_per_chip(config, d_batch, wl.prompt + wl.generate, tp, _attention_of(decode), wl.act_bytes, stages)
              if decode else 0.0)
    kv = max(kv_pre, kv_dec)
    notes = []
    if beyond_context(config, wl):
        notes.append(f"{wl.prompt + wl.generate} tokens run past {config.name or config.arch}'s trained context "
                     f"of {config.block_size} (RoPE has no position limit: priced, but quality there is untested)")
    if w + kv > hw.memory_bytes:
        notes.append(f"does not fit: {format_bytes(w + kv)} per chip > {format_bytes(hw.memory_bytes)}")
    padded = config.n_head < (tp // config.n_sub if config.arch == "kraken" else tp)
    if padded:
        notes.append(f"{config.n_head} heads padded to one per chip; the padding's FLOPs are not counted")
    limit_phase = decode or prefill
    return Estimate(
        model=config.name or config.arch, hardware=hw.name, chips=chips, tp=tp, stages=stages, workload=wl,
        prefill=prefill, decode=decode, ttft_s=prefill.time_s, per_token_s=per_token,
        total_s=prefill.time_s + wl.generate * per_token, chip_seconds_per_token=cost,
        mfu=2 * config.num_params() / (hw.peak(wl.dtype) * cost), requests_per_s=chips / request_chip_s,
        memory_per_chip_bytes=w + kv, weights_per_chip_bytes=w, kv_per_chip_bytes=kv, kv_prefill_bytes=kv_pre,
        kv_decode_bytes=kv_dec,
        max_context=max_context(config, hw, tp, wl.phase_batch(limit_phase.phase), _attention_of(limit_phase),
                                wl.dtype, stages=stages),
        fits=w + kv <= hw.memory_bytes, notes=notes)


def format_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number readable (GiB, MiB, KiB, B)."""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
