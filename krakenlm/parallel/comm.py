"""The torch.distributed implementation of the model's Comm contract, with a device-aware timeline.

- reduce: blocking all_reduce over the ranks sharing a sub-layer (Megatron).
- reduce_async: the same sum issued asynchronously (Ladder Residual: a module's AllReduce runs
  while the next module computes; the model awaits it right before the module after that).
- exchange: Kraken's sum over sub-layers, issued asynchronously at the end of a layer and awaited by
  the model right before the next layer's FFN, so it runs during that layer's attention. On CUDA the
  collective runs on NCCL's stream and the wait only makes the compute stream wait (no host block).
- reduce_conj: the conjunction's partial products summed over all ranks.
Beside the contract, for the engine: ``agree`` (rank 0's sampled tokens broadcast to everyone) and
``layer_begin``, called by a forward pre-hook ``watch_layers`` puts on every layer (it labels
collectives and timeline marks with the layer running; the forward itself never calls it).

Two ways to issue the same collectives: c10d calls with work handles (eager; the timeline can watch
them) or functional collectives (``functional=True``), which torch.compile traces into the graph
without breaks; the wait then sits where the value is first used, so the overlap is the same.
``no_comm`` skips every collective (wrong numbers, right shapes): the compute-only ceiling.
``overlap=False`` waits for each exchange (and each ladder AllReduce) at once: the same model with
blocking AllReduces.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from krakenlm.errors import DistributedError
from krakenlm.model.transformer import Ready, Transformer
from krakenlm.parallel.ledger import Ledger
from krakenlm.parallel.plan import ParallelPlan

# collectives issued async: Kraken's exchange, ladder's per-module sums, overlap_comm's chunks and ring hops
OVERLAPPED = ("exchange", "ladder", "chunked", "ring")


class HostClock:
    """Marks are perf_counter seconds: on the CPU the compute thread's time is the device's time."""

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        return end - start


class CudaClock:
    """Marks are CUDA events on the current stream: GPU time, not the host's enqueue time."""

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def clock_for(device: torch.device) -> HostClock | CudaClock:
    return CudaClock() if device.type == "cuda" else HostClock()


@dataclass
class Event:
    """One collective: issued at ``start``; the compute stream waited from ``wait_start`` to ``wait_end``;
    ``duration`` is how long it was in flight (gloo: completion callback; NCCL: its own timing)."""

    name: str
    layer: int
    start: Any
    wait_start: Any = None
    wait_end: Any = None
    duration: float | None = None


@dataclass
class Timeline:
    """Per-rank marks of layers and collectives, in the engine's clock (host or CUDA events)."""

    clock: HostClock | CudaClock = field(default_factory=HostClock)
    layers: list[tuple[int, Any]] = field(default_factory=list)
    collectives: list[Event] = field(default_factory=list)
    enabled: bool = False

    def clear(self) -> None:
        self.layers.clear()
        self.collectives.clear()

    def _exposed(self, e: Event) -> float:
        return self.clock.seconds(e.wait_start, e.wait_end) if e.wait_start is not None else 0.0

    def hidden_fraction(self, names: tuple[str, ...] = OVERLAPPED) -> float:
        """Share of the overlapped collectives' in-flight time that the compute stream did not wait for."""
        events = [e for e in self.collectives if e.name in names and e.duration]
        total = sum(e.duration for e in events)
        exposed = sum(min(self._exposed(e), e.duration) for e in events)
        return 1.0 - exposed / total if total > 0 else float("nan")

    def chrome_trace(self, path: str | Path, rank: int) -> None:
        """Write a chrome://tracing / Perfetto JSON: layers on one track, collectives on another."""
        if not self.layers:
            return
        t0 = self.layers[0][1]
        us = lambda mark: self.clock.seconds(t0, mark) * 1e6  # noqa: E731
        starts = [us(mark) for _, mark in self.layers]
        ends = starts[1:] + [max([us(e.start) + (e.duration or 0) * 1e6 for e in self.collectives] + [starts[-1]])]
        spans = zip(self.layers, starts, ends, strict=True)
        events = [{"name": f"layer {layer}", "ph": "X", "pid": rank, "tid": 0, "ts": start,
                   "dur": max(0.0, end - start)} for (layer, _), start, end in spans]
        for e in self.collectives:
            events.append({"name": f"{e.name} (after layer {e.layer})", "ph": "X", "pid": rank, "tid": 1,
                           "ts": us(e.start), "dur": (e.duration or 0.0) * 1e6,
                           "args": {"exposed_us": self._exposed(e) * 1e6}})
        Path(path).write_text(json.dumps({"traceEvents": events}))


def _guard(fn: Callable[[], Any], what: str) -> Any:
    try:
        return fn()
    except (RuntimeError, dist.DistBackendError) as err:  # peer died, stalled past the timeout, or reset
        raise DistributedError(f"rank {dist.get_rank()}: {what} failed: a peer rank died or stalled "
                               f"({str(err).splitlines()[0][:200]})") from err


class _Functional:
    """An exchange issued as a functional collective; waiting is a graph node torch.compile can place."""

    def __init__(self, value: Tensor) -> None:
        self.value = value

    def wait(self) -> Tensor:
        return funcol.wait_tensor(self.value)


class _InFlight:
    """An exchange issued with a c10d work handle (eager), watched by the timeline when enabled."""

    def __init__(self, work: Any, value: Tensor, event: Event | None, timeline: Timeline, what: str) -> None:
        self.work, self.value, self.event, self.timeline, self.what = work, value, event, timeline, what
        if event is not None and isinstance(timeline.clock, HostClock):
            work.get_future().then(lambda _: setattr(event, "duration", time.perf_counter() - event.start))

    def wait(self) -> Tensor:
        event, clock = self.event, self.timeline.clock
        if event is not None:
            event.wait_start = clock.mark()
        _guard(self.work.wait, self.what)
        if event is not None:
            event.wait_end = clock.mark()
            if isinstance(clock, CudaClock):
                event.duration = _nccl_duration(self.work)
            elif event.duration is None:  # the callback had not run yet: it finished just now
                event.duration = time.perf_counter() - event.start
        return self.value


def _nccl_duration(work: Any) -> float | None:
    """NCCL's own in-flight time of a collective (needs TORCH_NCCL_ENABLE_TIMING=1, set by the engine)."""
    try:
        return work._get_duration() / 1e3
    except RuntimeError:
        return None


class DistComm:
    """Comm for one rank of a ParallelPlan (process groups created collectively by every rank)."""

    def __init__(self, plan: ParallelPlan, *, no_comm: bool = False, overlap: bool = True,
                 functional: bool = False, device: torch.device | None = None, groups: Any = None) -> None:
        self.plan, self.no_comm, self.overlap, self.functional = plan, no_comm, overlap, functional
        self.device = device or torch.device("cpu")
        rank = dist.get_rank()
        self.shard_group, self.exchange_group = groups if groups is not None else self.make_groups(plan, rank)
        self.shard_size = len(plan.shard_group(rank))
        self.exchange_size = len(plan.exchange_group(rank))
        self.timeline = Timeline(clock_for(self.device))
        self._layer = -1  # the layer now running, for labelling collectives
        self.ledger: Ledger | None = None  # when set, every collective is recorded (eager only)

    @staticmethod
    def make_groups(plan: ParallelPlan, rank: int) -> tuple[Any, Any]:
        """This rank's (shard group, exchange group); every rank creates every group, in order."""
        shard_groups, exchange_groups = plan.groups()
        mine = []
        for groups in (shard_groups, exchange_groups):
            found = None
            for ranks in groups:  # new_group is collective
                group = dist.new_group(ranks) if len(ranks) < dist.get_world_size() else dist.group.WORLD
                if rank in ranks:
                    found = group
            mine.append(found)
        return mine[0], mine[1]

    def variant(self, **changes: Any) -> DistComm:
        """The same groups with other switches (no_comm, overlap, functional): no new process groups."""
        options = {"no_comm": self.no_comm, "overlap": self.overlap, "functional": self.functional} | changes
        return DistComm(self.plan, device=self.device, groups=(self.shard_group, self.exchange_group), **options)

    def _record(self, name: str) -> Event | None:
        if not self.timeline.enabled:
            return None
        event = Event(name, self._layer, self.timeline.clock.mark())
        self.timeline.collectives.append(event)
        return event

    def _note(self, kind: str, group: Any, x: Tensor, name: str, layer: int, copies: int = 1) -> None:
        """Ledger entry of a collective on ``x`` (an all-gather's output is ``copies`` of it)."""
        if self.ledger is not None and not torch.compiler.is_compiling():
            ranks = tuple(dist.get_process_group_ranks(group))
            self.ledger.record(kind, ranks, copies * x.numel() * x.element_size(), name, layer)

    def _done(self, event: Event | None) -> None:
        """A blocking collective's timeline event ends now (it waited all its duration)."""
        if event is not None:
            event.wait_start, event.wait_end = event.start, self.timeline.clock.mark()
            event.duration = self.timeline.clock.seconds(event.start, event.wait_end)

    def _blocking(self, x: Tensor, group: Any, size: int, name: str) -> Tensor:
        if self.no_comm or size == 1:
            return x
        self._note("all_reduce", group, x, name, -1 if name == "conjunction" else self._layer)
        if self.functional:
            return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))
        event = self._record(name)
        x = x.contiguous()
        _guard(lambda: dist.all_reduce(x, group=group), name)
        self._done(event)
        return x

    def layer_begin(self, layer: int) -> None:
        self._layer = layer
        if self.timeline.enabled:
            self.timeline.layers.append((layer, self.timeline.clock.mark()))

    def reduce(self, x: Tensor, site: str) -> Tensor:
        return self._blocking(x, self.shard_group, self.shard_size, "megatron")

    def reduce_async(self, x: Tensor, site: str) -> Ready | _Functional | _InFlight:
        return self._issue(x, self.shard_group, self.shard_size, "ladder")

    def exchange(self, y: Tensor) -> Ready | _Functional | _InFlight:
        return self._issue(y.sum(0), self.exchange_group, self.exchange_size, "exchange")

    def _issue(self, x: Tensor, group: Any, size: int, name: str) -> Ready | _Functional | _InFlight:
        """An all_reduce issued now and awaited by the model (at once when ``overlap`` is off)."""
        if self.no_comm or size == 1:
            return Ready(x)
        self._note("all_reduce", group, x, name, self._layer)
        if self.functional:
            pending: Any = _Functional(funcol.all_reduce(x, "sum", group))
            return Ready(pending.wait()) if not self.overlap else pending
        event = self._record(name)
        x = x.contiguous()
        work = _guard(lambda: dist.all_reduce(x, group=group, async_op=True), name)
        pending = _InFlight(work, x, event, self.timeline, f"{name} all_reduce")
        if not self.overlap:
            pending.wait()
        return pending

    def reduce_conj(self, x: Tensor) -> Tensor:
        return self._blocking(x, dist.group.WORLD, dist.get_world_size(), "conjunction")

    def gather_vocab(self, x: Tensor, vocab: int) -> Tensor:
        """Every rank's [M, slice] logits (Shard.vocab_part: equal slices of ceil(V / ranks), the last one
        padded here) joined in rank order into [M, vocab]."""
        world = dist.get_world_size()
        if world == 1:
            return x
        per = -(-vocab // world)
        x = torch.nn.functional.pad(x, (0, per - x.shape[-1])).contiguous()
        if self.no_comm:
            return x.repeat(1, world)[:, :vocab]  # the shape, not the numbers (the ceiling variant)
        self._note("all_gather", dist.group.WORLD, x, "vocab", -1, copies=world)
        if self.functional:
            return funcol.wait_tensor(funcol.all_gather_tensor(x, 1, dist.group.WORLD))[:, :vocab]
        event = self._record("vocab")
        parts = [torch.empty_like(x) for _ in range(world)]
        _guard(lambda: dist.all_gather(parts, x), "vocab all_gather")
        self._done(event)
        return torch.cat(parts, -1)[:, :vocab]

    def agree(self, tokens: Tensor) -> Tensor:
        return broadcast_tokens(tokens, self.no_comm)


def broadcast_tokens(tokens: Tensor, no_comm: bool = False) -> Tensor:
    """Rank 0's values (sampled tokens, stop decisions) become every rank's."""
    if no_comm or dist.get_world_size() == 1:
        return tokens
    tokens = tokens.contiguous()
    _guard(lambda: dist.broadcast(tokens, src=0), "token broadcast")
    return tokens


def watch_layers(model: Transformer) -> None:
    """Before each layer runs, tell the comm it was called with (a ``comm=`` keyword) which layer it is, if
    that comm labels its collectives (``layer_begin``): the timeline's layer marks and the ledger's layers."""
    for index, layer in enumerate(model.layers):
        layer.register_forward_pre_hook(functools.partial(_layer_begins, index), with_kwargs=True)


def _layer_begins(index: int, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
    begin = getattr(kwargs.get("comm"), "layer_begin", None)
    if begin is not None:
        begin(index)
