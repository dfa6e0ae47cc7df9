"""Where a forward pass spends its time, per category (the paper's Figures 6-7 categories).

One untimed forward runs under torch.profiler with a Comm wrapper that marks collectives
(``bench::allreduce``: time the compute thread spent issuing or waiting for them) and the window in
which a Kraken exchange or a ladder module's AllReduce is in flight (``bench::overlap``): GEMMs inside
it are "overlapped GEMM".
Everything is self CPU time on the calling thread, so the categories add up to the profiled wall
time; what no category claims (elementwise ops, Python) is "other".
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from torch import Tensor
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from krakenlm.model.attention import PROFILE_RANGE
from krakenlm.model.transformer import Pending
from krakenlm.parallel.comm import DistComm

CATEGORIES = ("norm", "GEMM", "overlapped GEMM", "attention", "LM head", "AllReduce", "other")
_GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")
_ALLREDUCE, _OVERLAP = "bench::allreduce", "bench::overlap"
_ATTENTION = PROFILE_RANGE


class _MarkedPending:
    def __init__(self, inner: Pending, landed: Callable[[], None] | None) -> None:
        self.inner, self.landed = inner, landed

    def wait(self) -> Tensor:
        if self.landed is not None:
            self.landed()
            self.landed = None
        with record_function(_ALLREDUCE):
            return self.inner.wait()


class MarkedComm:
    """A DistComm whose collectives and in-flight windows show up as profiler ranges (the breakdown
    profiles the Megatron, Kraken and ladder plans).

    The overlap window is open while at least one async collective is in flight: Kraken's exchange
    from issue to wait; ladder's consecutive module sums overlap each other, so one window spans from
    the first issue to the last wait (profiler ranges must nest)."""

    def __init__(self, inner: DistComm) -> None:
        self.inner = inner
        self._in_flight = 0
        self._window: record_function | None = None

    def layer_begin(self, layer: int) -> None:
        self.inner.layer_begin(layer)

    def agree(self, tokens: Tensor) -> Tensor:
        return self.inner.agree(tokens)

    def reduce(self, x: Tensor, site: str) -> Tensor:
        with record_function(_ALLREDUCE):
            return self.inner.reduce(x, site)

    def reduce_async(self, x: Tensor, site: str) -> _MarkedPending:
        with record_function(_ALLREDUCE):
            pending = self.inner.reduce_async(x, site)
        return self._track(pending, self.inner.shard_size)

    def reduce_conj(self, x: Tensor) -> Tensor:
        with record_function(_ALLREDUCE):
            return self.inner.reduce_conj(x)

    def gather_vocab(self, x: Tensor, vocab: int) -> Tensor:
        with record_function(_ALLREDUCE):
            return self.inner.gather_vocab(x, vocab)

    def exchange(self, y: Tensor) -> _MarkedPending:
        with record_function(_ALLREDUCE):
            pending = self.inner.exchange(y)
        return self._track(pending, self.inner.exchange_size)

    def _track(self, pending: object, group_size: int) -> _MarkedPending:
        if not (self.inner.overlap and not self.inner.no_comm and group_size > 1):
            return _MarkedPending(pending, None)
        if self._in_flight == 0:
            self._window = record_function(_OVERLAP)
            self._window.__enter__()
        self._in_flight += 1
        return _MarkedPending(pending, self._landed)

    def _landed(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._window is not None:
            self._window.__exit__(None, None, None)
            self._window = None


def _category(name: str, shapes: list, ancestors: set[str], vocab: int) -> str:
    if _ALLREDUCE in ancestors or name == _ALLREDUCE:
        return "AllReduce"
    if _ATTENTION in ancestors or name == _ATTENTION:  # every op of a causal attention kernel (GEMMs included)
        return "attention"
    if name in _GEMMS:
        if any(vocab in s for s in shapes if isinstance(s, list)):
            return "LM head"
        return "overlapped GEMM" if _OVERLAP in ancestors else "GEMM"
    if "layer_norm" in name or "rms_norm" in name:
        return "norm"
    if "scaled_dot_product" in name or "attention" in name:
        return "attention"
    return "other"


def profile_forward(run: Callable[[], object], vocab: int) -> dict[str, float]:
    """Seconds per category of one call of ``run`` (which must do exactly one forward)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    events = prof.events()
    main = Counter(e.thread for e in events).most_common(1)[0][0] if events else None
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in events:
        if event.thread != main:
            continue  # gloo's background threads: their work is what AllReduce hides or exposes
        ancestors, parent = set(), event.cpu_parent
        while parent is not None:
            ancestors.add(parent.name)
            parent = parent.cpu_parent
        totals[_category(event.name, event.input_shapes or [], ancestors, vocab)] += event.self_cpu_time_total / 1e6
    claimed = sum(v for k, v in totals.items() if k != "other")
    totals["other"] = max(0.0, wall - claimed)
    totals["wall"] = wall
    return totals
