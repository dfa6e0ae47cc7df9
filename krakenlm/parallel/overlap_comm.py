"""System-level overlap of standard (Megatron) tensor parallelism, applied to the built model: the same
model and weights, its all-reduces hidden by the runtime instead of by the architecture (what Kraken and
Ladder are compared against; krakenlm.costmodel.overlap prices both modes).

The plan installs, on a view of the rank's model sharing its weights (as the partitioning layouts do):

    attn / mlp  return a ``Deferred`` out-projection: the activations before the row-parallel matmul and
                the stored module's ``project_out``; a parallel block's ``attn + mlp`` is one fused pair
    wte / wpe   collective-matmul only: this rank's token rows (the residual is sequence-sharded)
    ln1 / ln2   unchanged: a norm of the rank's token rows (collective-matmul) or of every token
    head        collective-matmul only: every rank's rows gathered after the last layer

and ``OverlapComm.reduce(x, site)`` computes the deferred out-projection together with its sum:

    chunked:K          the pair's tokens in K chunks; chunk k's all-reduce is issued async while chunk k+1
                       is projected, all awaited at the end (a decode step of one token is one chunk:
                       blocking)
    collective-matmul  Pope et al.'s looped reduce-scatter: step s projects the chunk of tokens whose running
                       sum arrives from the previous rank while this rank's sum of the chunk before moves
                       one hop on; the pair's entry is the looped all-gather (step s multiplies the piece
                       already here while the next one moves), so norms, residuals and biases stay sharded

Collectives are c10d calls (gloo or NCCL; one code path). Ring hops are point-to-point pairs through
``batch_isend_irecv``; ranks holding no rows (fewer tokens than ranks) skip their empty transfers. The
timeline watches both (names "chunked" and "ring"), so the hidden fraction is measured as for Kraken.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from krakenlm.costmodel.estimator import SYSTEM_OVERLAP_ARCHS
from krakenlm.costmodel.overlap import Overlap
from krakenlm.errors import ConfigError
from krakenlm.model.layers import AttentionShape, AttentionStep, StackedAttention, StackedMLP
from krakenlm.model.transformer import Ready, Transformer
from krakenlm.parallel.comm import CudaClock, DistComm, HostClock, _guard, _nccl_duration, watch_layers
from krakenlm.parallel.layout_comm import _shallow, sequence_rows
from krakenlm.parallel.plan import ParallelPlan


def check_system_overlap(arch: str, mode: Overlap, *, layout_default: bool, compile: bool) -> None:
    """Refuse what the runtime does not overlap this way, naming why."""
    if arch not in SYSTEM_OVERLAP_ARCHS:
        raise ConfigError(f"overlap: {mode} overlaps standard tensor parallelism (gpt / parallel models), got "
                          f"arch={arch!r}; Kraken and ladder models overlap by their own schedule (overlap none)")
    if not layout_default:
        raise ConfigError(f"overlap: {mode} runs Megatron TP (1d-ws); it does not combine with a partitioning layout")
    if compile and mode.mode == "collective-matmul":
        raise ConfigError("overlap: collective-matmul's ring hops run eager; drop --compile (chunked:K compiles)")


class Deferred:
    """A pair's row-parallel out-projection not computed yet: (activations [1, M, k], project_out) terms,
    summed. The Comm computes it where the model sums it, so the matmul can be pipelined with the sum."""

    def __init__(self, terms: list[tuple[Tensor, Callable[[Tensor], Tensor]]]) -> None:
        self.terms = terms

    def __add__(self, other: Deferred) -> Deferred:  # a parallel block: attention + MLP, one fused pair
        return Deferred(self.terms + other.terms)

    @property
    def tokens(self) -> int:
        return self.terms[0][0].shape[1]

    def rows(self, a: int, b: int) -> Tensor:
        """The partial out-projection of token rows [a, b)."""
        parts = [project(h[:, a:b]) for h, project in self.terms]
        return functools.reduce(torch.add, parts)


def token_bounds(tokens: int, parts: int) -> list[tuple[int, int]]:
    return [sequence_rows(tokens, parts, i) for i in range(parts)]


@dataclass
class RunState:
    """Shared by a view's modules and every variant of its Comm: the forward's token count (set by the
    embedding) and the Comm of the layer running (set by its ``layer_begin``)."""

    tokens: int = 0
    comm: OverlapComm | None = None
    memo: tuple[Tensor, Tensor] | None = field(default=None, repr=False)  # parallel block: its gathered input


class _Hop:
    """One ring step in flight: this rank's piece to the next rank, the previous rank's into ``value``.
    Its in-flight time is the receive's completion callback where the backend has one (gloo's
    point-to-point work has none: a hop already done when awaited then counts its time up to the wait,
    an upper bound; one still running is timed exactly)."""

    def __init__(self, works: list[Any], value: Tensor, comm: OverlapComm) -> None:
        self.works, self.value, self.comm = works, value, comm
        self.event = comm._record("ring") if works else None
        if self.event is not None and isinstance(comm.timeline.clock, HostClock):
            event = self.event
            with contextlib.suppress(RuntimeError):  # Work::getFuture not implemented (gloo send / recv)
                works[-1].get_future().then(lambda _: setattr(event, "duration", time.perf_counter() - event.start))

    def wait(self) -> Tensor:
        event, clock = self.event, self.comm.timeline.clock
        if event is not None:
            event.wait_start = clock.mark()
        for work in self.works:
            _guard(work.wait, "ring hop")
        if event is not None:
            event.wait_end = clock.mark()
            if isinstance(clock, CudaClock):
                event.duration = _nccl_duration(self.works[-1])
            elif event.duration is None:
                event.duration = clock.seconds(event.start, event.wait_end)
        return self.value


class OverlapComm(DistComm):
    """DistComm whose pair sums are a system overlap mode (the module docstring)."""

    def __init__(self, plan: ParallelPlan, mode: Overlap, state: RunState | None = None, **options: Any) -> None:
        super().__init__(plan, **options)
        self.mode, self.state = mode, state or RunState()
        group = plan.shard_group(dist.get_rank())
        self.index = group.index(dist.get_rank())

    def variant(self, **changes: Any) -> OverlapComm:
        options = {"no_comm": self.no_comm, "overlap": self.overlap, "functional": self.functional} | changes
        return OverlapComm(self.plan, self.mode, self.state, device=self.device,
                           groups=(self.shard_group, self.exchange_group), **options)

    def layer_begin(self, layer: int) -> None:
        super().layer_begin(layer)
        self.state.comm = self

    def reduce(self, x: Tensor | Deferred, site: str) -> Tensor:
        if not isinstance(x, Deferred):
            return super().reduce(x, site)
        if self.mode.mode == "chunked":
            return self._chunked(x)
        return self._ring_reduce_scatter(x)

    def _chunked(self, x: Deferred) -> Tensor:
        """Chunk k's all-reduce in flight while chunk k+1 is projected; awaited together at the end."""
        bounds = token_bounds(x.tokens, max(1, min(self.mode.chunks, x.tokens)))
        if len(bounds) == 1:  # nothing to split (chunked:1, a one-token decode step): Megatron's blocking sum
            return super().reduce(x.rows(0, x.tokens), "chunked")
        pending = [self._issue(x.rows(a, b), self.shard_group, self.shard_size, "chunked") for a, b in bounds]
        return torch.cat([p.wait() for p in pending], 1)

    def _ring_reduce_scatter(self, x: Deferred) -> Tensor:
        """This rank's token rows of the pair's sum. Step s projects chunk (r-1-s) mod n and adds the sum of
        it the previous rank sent, which arrived while projecting; after n-1 hops chunk r is complete."""
        n, r = self.shard_size, self.index
        bounds = token_bounds(x.tokens, n)
        acc = x.rows(*bounds[(r - 1) % n])
        self._note_loop("reduce_scatter", x.tokens * acc.shape[-1] * acc.element_size(), "ring reduce-scatter")
        for s in range(1, n):
            a, b = bounds[(r - 1 - s) % n]
            hop = self._hop(acc, b - a)
            part = x.rows(a, b)
            acc = part + hop.wait()
        return acc

    def gather_matmul(self, x: Tensor, project: Callable[[Tensor], Tensor], keep: bool = False) -> Tensor:
        """``project`` of every rank's token rows in rank order, from this rank's rows ``x`` [1, m_r, w]:
        each step projects the piece already here while the next one moves one hop. ``keep``: remember the
        gathered input for the next call with the same ``x`` (a parallel block's MLP)."""
        memo = self.state.memo
        if memo is not None and memo[0] is x:
            self.state.memo = None
            return project(memo[1])
        n, r = self.shard_size, self.index
        sizes = [b - a for a, b in token_bounds(self.state.tokens, n)]
        self._note_loop("all_gather", sum(sizes) * x.shape[-1] * x.element_size(), "ring all-gather")
        outs: list[Tensor | None] = [None] * n
        pieces: list[Tensor | None] = [None] * n
        piece, src = x, r
        for s in range(n):
            hop = self._hop(piece, sizes[(r - s - 1) % n]) if s < n - 1 else None
            pieces[src], outs[src] = piece, project(piece)
            if hop is not None:
                piece, src = hop.wait(), (r - s - 1) % n
        if keep:
            self.state.memo = (x, torch.cat(pieces, 1))  # type: ignore[arg-type]
        return torch.cat(outs, 1)  # type: ignore[arg-type]

    def gather_rows(self, y: Tensor) -> Tensor:
        """Every rank's token rows of ``y`` on every rank (the head's input; no layer's collective)."""
        self._layer = -1
        return self.gather_matmul(y, lambda rows: rows)

    def _note_loop(self, kind: str, nbytes: int, site: str) -> None:
        """One looped collective in the ledger, as the collective it decomposes (its hops move the same bytes)."""
        if self.ledger is not None and not self.no_comm and not torch.compiler.is_compiling():
            self.ledger.record(kind, tuple(dist.get_process_group_ranks(self.shard_group)), nbytes, site, self._layer)

    def _hop(self, send: Tensor, rows: int) -> _Hop | Ready:
        """Send ``send`` to the next rank of the ring and receive ``rows`` rows from the previous one (a rank
        and its peer agree on every size, so an empty side is skipped by both)."""
        recv = send.new_empty((send.shape[0], rows, send.shape[-1]))
        if self.no_comm:
            return Ready(recv.zero_())
        n, r = self.shard_size, self.index
        ops = []
        if send.numel():
            ops.append(dist.P2POp(dist.isend, send.contiguous(), group=self.shard_group, group_peer=(r + 1) % n))
        if recv.numel():
            ops.append(dist.P2POp(dist.irecv, recv, group=self.shard_group, group_peer=(r - 1) % n))
        works = _guard(lambda: dist.batch_isend_irecv(ops), "ring hop") if ops else []
        return _Hop(works, recv, self)


# Modules the plan installs -------------------------------------------------------------------------------
class TokenRows(nn.Module):
    """collective-matmul: this rank's token rows of an embedding's output, [1, m_r, d] (the residual is
    sequence-sharded); records the forward's token count for the ring's piece sizes."""

    def __init__(self, inner: nn.Module, state: RunState, parts: int, index: int) -> None:
        super().__init__()
        self.inner, self.state, self.parts, self.index = inner, state, parts, index

    @property
    def weight(self) -> Any:  # the whole table, for a tied LM head
        return self.inner.weight

    def forward(self, idx: Tensor) -> Tensor:
        self.state.tokens = idx.numel()
        a, b = sequence_rows(idx.numel(), self.parts, self.index)
        return self.inner(idx.reshape(1, -1)[:, a:b])


class _Entry:
    """A pair's in-projection: on every token (chunked) or looped over the ring (collective-matmul)."""

    def __init__(self, state: RunState | None, keep: bool = False) -> None:
        self.state, self.keep = state, keep

    def __call__(self, x: Tensor, project: Callable[[Tensor], Tensor]) -> Tensor:
        if self.state is None:
            return project(x)
        assert self.state.comm is not None, "collective-matmul: the layer was called without its Comm"
        return self.state.comm.gather_matmul(x, project, self.keep)


class DeferredAttention(nn.Module):
    """Attention whose out-projection is left to the Comm's sum (a ``Deferred``)."""

    def __init__(self, inner: StackedAttention, entry: _Entry) -> None:
        super().__init__()
        self.inner, self.entry = inner, entry

    @property
    def shape(self) -> AttentionShape:
        return self.inner.shape

    def forward(self, x: Tensor, step: AttentionStep) -> Deferred:
        attn = self.inner
        return Deferred([(attn.attend(self.entry(x, attn.project_in), step), attn.project_out)])


class DeferredMLP(nn.Module):
    """The FFN whose down-projection is left to the Comm's sum (a ``Deferred``)."""

    def __init__(self, inner: StackedMLP, entry: _Entry) -> None:
        super().__init__()
        self.inner, self.entry = inner, entry

    def forward(self, x: Tensor) -> Deferred:
        mlp = self.inner
        return Deferred([(mlp.activate(self.entry(x, mlp.project_in)), mlp.project_out)])


def _gather_rows_hook() -> Any:
    """collective-matmul head: every rank's rows of the last layer's output, on every rank."""
    def hook(module: nn.Module, args: Any, kwargs: Any, out: Tensor) -> Tensor:
        return kwargs["comm"].gather_rows(out)
    return hook


def overlap_view(model: Transformer, comm: OverlapComm) -> Transformer:
    """``model`` as ``comm``'s mode runs it: a view sharing its weights with the mode's modules installed."""
    view = _shallow(model)
    view.layers = nn.ModuleList(_shallow(layer) for layer in model.layers)
    ring = comm.mode.mode == "collective-matmul"
    state = comm.state if ring else None
    for layer in view.layers:
        layer.attn = DeferredAttention(layer.attn, _Entry(state, keep=layer.parallel_block))
        layer.mlp = DeferredMLP(layer.mlp, _Entry(state))
    if ring:
        view.wte = TokenRows(model.wte, comm.state, comm.shard_size, comm.index)
        view.wpe = None if model.wpe is None else TokenRows(model.wpe, comm.state, comm.shard_size, comm.index)
        view.layers[-1].register_forward_hook(_gather_rows_hook(), with_kwargs=True)
    watch_layers(view)
    return view
