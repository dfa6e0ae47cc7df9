"""System-level overlap of standard tensor parallelism: what Kraken's architecture is compared against.

Standard (Megatron, ``1d-ws``) TP pays one all-reduce of T*E per matrix pair (attention, FFN; one fused
pair for a parallel block), after the pair's row-parallel (out-)projection. Two ways a system hides it
without changing the model:

``chunked:K`` (chunked row-parallel output): the pair's out-projection runs on K token chunks; chunk k's
all-reduce (D/K bytes, its own latency) is issued async while chunk k+1 computes. A chunk reads the
projection's weights again, so its time is c = max(C_out/K, M_out). Two-stage pipeline:

    T_out = c + (K-1) * seg(c, x) + x          x = all_reduce(D/K)

``collective-matmul`` (Pope et al.'s looped CollectiveEinsum, async TP): the all-reduce is split into
the all-gather before the in-projection and the reduce-scatter after the out-projection (norms and
residuals sharded), each looped over the n chips of the ring: step i multiplies the shard already
here (1/n of the contraction, so the weights are read once in all: c = max(C/n, M/n)) while the next
shard moves one hop, x = one ring step of D/n, a point-to-point send (latency + bytes over the slowest
link of the ring, at ``ring_hop_eff`` of its achievable bandwidth):

    T_in = T_out = c + (n-1) * seg(c, x)       (the first step computes on local data)

seg(c, x) = max(x, c + s*x): a transfer of x seconds alongside c of compute; the slowdown s is the
fraction of the transfer's duration the concurrent compute loses (SMs running NCCL kernels on a GPU, a
CPU core copying and reducing for gloo): s = 0 hides min(c, x), s = 1 hides nothing. Each extra chunk
or ring step beyond the one op it replaces costs a fixed step (a kernel launch and a stream wait). The
two modes have their own pair (``Hardware.overlap_factors``): ``overlap_slowdown`` / ``overlap_step_s``
for chunked's async all-reduces, ``ring_slowdown`` / ``ring_step_s`` for the ring's send/recv hops
(on gloo/CPU the two differ: an all-reduce's transfer hides partly, a hop's less). A layer then costs
max(C, M) + sum over pairs of (T_in + T_out - the unsplit projections' max(C, M)) + the extra steps:
exactly ``none``'s max(C, M) + X at K = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from krakenlm.errors import ConfigError

MODES = ("none", "full", "chunked", "collective-matmul")
SYSTEM_MODES = ("chunked", "collective-matmul")  # overlap by the system, priced pair by pair here
MAX_CHUNKS = 4096


@dataclass(frozen=True)
class Overlap:
    """A parsed ``overlap`` option: ``mode`` and, for ``chunked``, the chunk count."""

    mode: str
    chunks: int = 1

    @property
    def system(self) -> bool:
        """Priced pair by pair (this module) rather than by a whole-layer rule."""
        return self.mode in SYSTEM_MODES

    def __str__(self) -> str:
        return f"chunked:{self.chunks}" if self.mode == "chunked" else self.mode


NO_OVERLAP = Overlap("none")


def parse_overlap(text: str | Overlap) -> Overlap:
    """``none``, ``full``, ``chunked:K`` (1 <= K <= 4096) or ``collective-matmul``; anything else is an
    error naming the option."""
    if isinstance(text, Overlap):
        return text
    mode, _, count = str(text).partition(":")
    if mode == "chunked" and count.isdigit() and 1 <= int(count) <= MAX_CHUNKS:
        return Overlap("chunked", int(count))
    if mode in MODES and mode != "chunked" and not count:
        return Overlap(mode)
    raise ConfigError(f"overlap: must be none, full, chunked:K (K chunks, 1-{MAX_CHUNKS}) or collective-matmul, "
                      f"got {text!r}")


@dataclass(frozen=True)
class PairWork:
    """One matrix pair of a standard-TP layer on one chip: seconds of compute and of memory traffic of
    its in- and out-projection (what runs between, attention scores and KV reads, is not split), and
    its collective: the all-reduce time of D/K (K = the chunks actually used) and one ring hop of D/n."""

    c_in: float
    m_in: float
    c_out: float
    m_out: float
    x_chunk: float
    x_step: float


def segment(compute: float, transfer: float, slowdown: float) -> float:
    """A transfer alongside compute that loses ``slowdown`` of the transfer's duration (module docstring)."""
    return max(transfer, compute + slowdown * transfer)


def pipelined(compute: float, transfer: float, steps: int, slowdown: float, drain: bool) -> float:
    """``steps`` computes of ``compute`` each, the transfer of step k under compute k+1; ``drain``: the
    last step's transfer follows the last compute (chunked), else it ran under the first (looped)."""
    return compute + (steps - 1) * segment(compute, transfer, slowdown) + (transfer if drain else 0.0)


def chunks_used(overlap: Overlap, tokens: int) -> int:
    """Chunks of a chunked pair: never more than its tokens (a decode step of one token is one chunk)."""
    return max(1, min(overlap.chunks, tokens))


def pair_comm(pair: PairWork, overlap: Overlap, chips: int, tokens: int) -> float:
    """Seconds of communication a pair issues under a system mode, hidden or not."""
    if overlap.mode == "chunked":
        return chunks_used(overlap, tokens) * pair.x_chunk
    return 2 * (chips - 1) * pair.x_step


def pair_extra(pair: PairWork, overlap: Overlap, chips: int, slowdown: float, step_s: float,
               tokens: int) -> float:
    """Seconds a pair adds to the layer's max(C, M) under a system overlap mode: its overlapped
    projections minus their unsplit time, plus the extra steps."""
    if overlap.mode == "chunked":
        k = chunks_used(overlap, tokens)
        out = pipelined(max(pair.c_out / k, pair.m_out), pair.x_chunk, k, slowdown, drain=True)
        return out - max(pair.c_out, pair.m_out) + (k - 1) * step_s
    if chips <= 1:
        return 0.0
    loop_in = pipelined(max(pair.c_in, pair.m_in) / chips, pair.x_step, chips, slowdown, drain=False)
    loop_out = pipelined(max(pair.c_out, pair.m_out) / chips, pair.x_step, chips, slowdown, drain=False)
    return (loop_in - max(pair.c_in, pair.m_in) + loop_out - max(pair.c_out, pair.m_out)
            + 2 * (chips - 1) * step_s)
