"""The torch.distributed implementation of the model's Comm hooks, with a timeline.

- reduce_shard: blocking all_reduce over the ranks sharing a sub-layer (Megatron).
- exchange: Kraken's sum over sub-layers, issued with async_op=True at the end of a layer and
  awaited by the model right before the next layer's FFN, so it runs during that layer's attention.
- reduce_conj: the conjunction's partial products summed over all ranks.
- agree: rank 0's sampled tokens broadcast to everyone.
``no_comm`` skips every collective (wrong numbers, right shapes): the compute-only ceiling.
``overlap=False`` waits for each exchange at once: the same Kraken with blocking AllReduces.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist
from torch import Tensor

from krakenlm.errors import DistributedError
from krakenlm.parallel.plan import ParallelPlan


@dataclass
class Event:
    name: str
    layer: int
    start: float
    end: float = 0.0
    exposed: float = 0.0  # seconds the compute thread sat waiting for it


@dataclass
class Timeline:
    """Per-rank timestamps of layers and collectives (perf_counter seconds)."""

    layers: list[tuple[int, float]] = field(default_factory=list)
    collectives: list[Event] = field(default_factory=list)
    enabled: bool = False

    def clear(self) -> None:
        self.layers.clear()
        self.collectives.clear()

    def hidden_fraction(self, name: str = "exchange") -> float:
        """Share of the collective's in-flight time that the compute thread did not wait for."""
        events = [e for e in self.collectives if e.name == name and e.end > e.start]
        total = sum(e.end - e.start for e in events)
        exposed = sum(min(e.exposed, e.end - e.start) for e in events)
        return 1.0 - exposed / total if total > 0 else float("nan")

    def chrome_trace(self, path: str | Path, rank: int) -> None:
        """Write a chrome://tracing / Perfetto JSON: layers on one track, collectives on another."""
        if not self.layers:
            return
        t0 = self.layers[0][1]
        us = lambda t: (t - t0) * 1e6  # noqa: E731
        events = []
        ends = [t for _, t in self.layers[1:]] + [max([e.end for e in self.collectives] + [self.layers[-1][1]])]
        for (layer, start), end in zip(self.layers, ends, strict=True):
            events.append({"name": f"layer {layer}", "ph": "X", "pid": rank, "tid": 0, "ts": us(start),
                           "dur": max(0.0, us(end) - us(start))})
        for e in self.collectives:
            events.append({"name": f"{e.name} (after layer {e.layer})", "ph": "X", "pid": rank, "tid": 1,
                           "ts": us(e.start), "dur": max(0.0, us(e.end) - us(e.start)),
                           "args": {"exposed_us": e.exposed * 1e6}})
        Path(path).write_text(json.dumps({"traceEvents": events}))


class _InFlight:
    def __init__(self, work, value: Tensor, event: Event | None) -> None:
        self.work, self.value, self.event = work, value, event
        if event is not None and work is not None:
            work.get_future().then(lambda _: setattr(event, "end", time.perf_counter()))

    def wait(self) -> Tensor:
        if self.work is not None:
            start = time.perf_counter()
            _guard(self.work.wait, "Kraken exchange all_reduce")
            if self.event is not None:
                now = time.perf_counter()
                self.event.exposed = now - start
                self.event.end = self.event.end or now
        return self.value


def _guard(fn, what: str):
    try:
        return fn()
    except (RuntimeError, dist.DistBackendError) as err:  # peer died, stalled past the timeout, or reset
        raise DistributedError(f"rank {dist.get_rank()}: {what} failed: a peer rank died or stalled "
                               f"({str(err).splitlines()[0][:200]})") from err


class DistComm:
    """Comm for one rank of a ParallelPlan (process groups created collectively by every rank)."""

    def __init__(self, plan: ParallelPlan, *, no_comm: bool = False, overlap: bool = True) -> None:
        self.plan, self.no_comm, self.overlap = plan, no_comm, overlap
        rank = dist.get_rank()
        shard_groups, exchange_groups = plan.groups()
        self.shard_group = self._my_group(shard_groups, rank)
        self.exchange_group = self._my_group(exchange_groups, rank)
        self.shard_size = len(plan.shard_group(rank))
        self.exchange_size = len(plan.exchange_group(rank))
        self.timeline = Timeline()
        self._layer = -1  # the layer now running, for labelling collectives

    @staticmethod
    def _my_group(groups: list[list[int]], rank: int):
        mine = None
        for ranks in groups:  # new_group is collective: every rank creates every group, in order
            group = dist.new_group(ranks) if len(ranks) < dist.get_world_size() else dist.group.WORLD
            if rank in ranks:
                mine = group
        return mine

    def _record(self, name: str, layer: int) -> Event | None:
        if not self.timeline.enabled:
            return None
        event = Event(name, layer, time.perf_counter())
        self.timeline.collectives.append(event)
        return event

    def _blocking(self, x: Tensor, group, size: int, name: str) -> Tensor:
        if self.no_comm or size == 1:
            return x
        event = self._record(name, self._layer)
        x = x.contiguous()
        _guard(lambda: dist.all_reduce(x, group=group), name)
        if event is not None:
            event.end = time.perf_counter()
            event.exposed = event.end - event.start
        return x

    def layer_begin(self, layer: int) -> None:
        self._layer = layer
        if self.timeline.enabled:
            self.timeline.layers.append((layer, time.perf_counter()))

    def reduce_shard(self, x: Tensor) -> Tensor:
        return self._blocking(x, self.shard_group, self.shard_size, "megatron")

    def exchange(self, y: Tensor):
        local = y.sum(0)
        if self.no_comm or self.exchange_size == 1:
            return _InFlight(None, local, None)
        event = self._record("exchange", self._layer)
        work = _guard(lambda: dist.all_reduce(local, group=self.exchange_group, async_op=True), "exchange")
        pending = _InFlight(work, local, event)
        if not self.overlap:
            pending.wait()
        return pending

    def reduce_conj(self, x: Tensor) -> Tensor:
        return self._blocking(x, dist.group.WORLD, dist.get_world_size(), "conjunction")

    def agree(self, tokens: Tensor) -> Tensor:
        if self.no_comm or dist.get_world_size() == 1:
            return tokens
        tokens = tokens.contiguous()
        _guard(lambda: dist.broadcast(tokens, src=0), "token broadcast")
        return tokens
