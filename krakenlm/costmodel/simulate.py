"""Serving simulator: requests arrive (Poisson at a rate, evenly spaced, or from a trace), wait in the
iteration-level scheduler the server uses (krakenlm.batching.scheduler, the same code), and every step
takes the cost model's time: each admitted request is prefilled on its own at batch 1, then one decode
step runs at the running batch and its mean context. The result is the report of krakenlm.batching.report,
field for field what the load generator prints for a real server.

``plan_slo`` searches deployments (chips, pipeline stages, Kraken degree, batch limit) from the fewest
chips up and returns the cheapest whose simulated percentiles meet every target (``p99_ttft<=200ms``)
with no request refused.

Limits: steps run one after another as the scheduler's semantics say (a pipelined engine could overlap
a newcomer's prefill with other micro-batches' decode); a decode step is priced at the batch's mean
context (rounded to a token), exact for the KV reads and attention FLOPs, which are linear in it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol

from krakenlm.batching.report import RequestRecord, SloTarget, summarize
from krakenlm.batching.scheduler import BatchingPolicy, QueueFull, Request, Scheduler, decode_shape
from krakenlm.batching.workload import Arrival
from krakenlm.config import ModelConfig
from krakenlm.costmodel.estimator import (
    Layout,
    Workload,
    best_phase,
    check_context,
    estimate,
    format_bytes,
    phase_estimate,
    tp_degree,
)
from krakenlm.costmodel.hardware import Hardware
from krakenlm.costmodel.layouts import check_split
from krakenlm.costmodel.pipeline import Pipeline
from krakenlm.costmodel.planner import deployment_label, deployments
from krakenlm.errors import ConfigError, InputError

if TYPE_CHECKING:
    from krakenlm.batching.profile import EngineProfile


class StepTimes(Protocol):
    """Seconds of the engine's steps: a prefill of one request, a decode step of a batch."""

    def prefill(self, prompt_len: int) -> float: ...

    def decode(self, contexts: Sequence[int]) -> float: ...


@dataclass(frozen=True)
class ConstantTimes:
    """Fixed step times (tests, and a measured engine summarised by two numbers)."""

    prefill_s: float
    decode_s: float

    def prefill(self, prompt_len: int) -> float:
        return self.prefill_s

    def decode(self, contexts: Sequence[int]) -> float:
        return self.decode_s


@dataclass(frozen=True)
class HostOverhead:
    """Host seconds a serving engine spends around the model, which the cost model's step times leave out:
    per prefill (request handling, sampling, the first token's publishing), per decode step (scheduling,
    the step's dispatch to every rank) and per running row of a decode step (sampling, detokenising and
    streaming its token). Fitted to the server's own profile (``fit_host_overhead``; ``krakenlm loadtest
    --profile``), never to the loads the simulator is validated on."""

    prefill_s: float = 0.0
    step_s: float = 0.0
    row_s: float = 0.0

    def __post_init__(self) -> None:
        for key in ("prefill_s", "step_s", "row_s"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 60:
                raise ConfigError(f"host overhead: {key} must be seconds in [0, 60), got {value!r}")


def fit_host_overhead(times: StepTimes, profile: EngineProfile, max_batch: int, context: int,
                      engine_shapes: bool = False) -> HostOverhead:
    """The host time a measured server spends beyond ``times`` (the cost model's, no overhead): per prefill,
    the mean of TTFT alone - predicted prefill over the profile's prompt lengths; per step and per row, a
    least-squares line through ITL at width w - predicted decode step of w rows (at the engine's padded
    shape with ``engine_shapes``), both terms kept >= 0."""
    mid_context = profile.prompt + profile.output // 2

    def decode(rows: int) -> float:
        if not engine_shapes:
            return times.decode([mid_context] * rows)
        width, keys = decode_shape(list(range(rows)), [mid_context - 1] * rows, max_batch, context)
        return times.decode([keys] * width)

    prefill = sum(t - times.prefill(p) for p, t in zip(profile.prompts, profile.ttft_alone_s, strict=True))
    extra = [t - decode(w) for w, t in zip(profile.widths, profile.itl_s, strict=True)]
    step, row = _nonnegative_line([float(w) for w in profile.widths], extra)
    return HostOverhead(prefill_s=max(0.0, prefill / len(profile.prompts)), step_s=step, row_s=row)


def _nonnegative_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope, both >= 0 (a negative one is dropped and the other refitted)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    if slope < 0:
        return max(0.0, my), 0.0
    if my - slope * mx < 0:
        return 0.0, max(0.0, sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs))
    return my - slope * mx, slope


class ProfileTimes:
    """Step times read off a server's measured profile (krakenlm.batching.profile), the way Vidur-style
    simulators use profiled operators: a prefill from the least-squares line of TTFT alone over prompt
    length; a decode step of w rows from the inter-token gap measured at the engine widths, linear between
    them (simulate with ``engine_shapes``, whose widths are the engine's own). Host time is in the
    measurements, so nothing is added; context enters only through the widths' mid context."""

    def __init__(self, profile: EngineProfile) -> None:
        self._intercept, self._slope = _nonnegative_line([float(p) for p in profile.prompts],
                                                         list(profile.ttft_alone_s))
        self._widths = sorted(zip(profile.widths, profile.itl_s, strict=True))

    def prefill(self, prompt_len: int) -> float:
        return self._intercept + self._slope * prompt_len

    def decode(self, contexts: Sequence[int]) -> float:
        rows = len(contexts)
        below = [(w, t) for w, t in self._widths if w <= rows] or self._widths[:1]
        above = [(w, t) for w, t in self._widths if w >= rows] or self._widths[-1:]
        (w0, t0), (w1, t1) = below[-1], above[0]
        return t0 if w1 == w0 else t0 + (t1 - t0) * (rows - w0) / (w1 - w0)


class CostModelTimes:
    """Step times from the estimator: prefill at batch 1, decode at the batch and its mean context, the
    fastest layout per phase (or ``layout``, e.g. the runtime's own), on ``chips`` chips in ``stages``
    pipeline stages, plus the engine's measured ``overhead``."""

    def __init__(self, config: ModelConfig, hw: Hardware, chips: int, stages: int = 1, dtype: str = "bf16",
                 overlap: str = "none", lm_head: str = "sharded", layout: Layout | None = None,
                 overhead: HostOverhead = HostOverhead()) -> None:
        check_split(config, tp_degree(chips, stages), stages, hw.chips_per_node)
        self.config, self.hw, self.tp, self.dtype = config, hw, chips // stages, dtype
        self.pipe, self.overlap, self.lm_head = Pipeline(stages=stages), overlap, lm_head
        if layout is not None and layout.chips != self.tp:
            raise ConfigError(f"layout: {layout.chips} chips, but the deployment has {self.tp} per stage")
        self.layout, self.overhead = layout, overhead
        self._prefill = lru_cache(maxsize=None)(self._prefill_uncached)
        self._decode = lru_cache(maxsize=None)(self._decode_uncached)

    def _phase(self, phase: str, batch: int, prompt: int) -> float:
        wl = Workload(batch=batch, prompt=prompt, dtype=self.dtype)
        if self.layout is not None:
            return phase_estimate(self.config, self.hw, wl, phase, self.layout, self.overlap, self.pipe).time_s
        return best_phase(self.config, self.hw, wl, phase, self.tp, self.overlap, self.lm_head, self.pipe).time_s

    def _prefill_uncached(self, prompt_len: int) -> float:
        return self._phase("prefill", 1, prompt_len) + self.overhead.prefill_s

    def _decode_uncached(self, batch: int, context: int) -> float:
        return self._phase("decode", batch, context) + self.overhead.step_s + batch * self.overhead.row_s

    def prefill(self, prompt_len: int) -> float:
        return self._prefill(prompt_len)

    def decode(self, contexts: Sequence[int]) -> float:
        return self._decode(len(contexts), max(1, round(sum(contexts) / len(contexts))))


@dataclass(frozen=True)
class Simulation:
    """A simulated run: the report (krakenlm.batching.report fields), the per-request records and the
    scheduler's side of it (steps, mean decode batch, longest queue)."""

    report: dict[str, Any]
    records: list[RequestRecord]
    steps: int
    mean_decode_batch: float
    max_waiting: int


@dataclass
class _Trace:
    arrival: float
    times: list[float] = field(default_factory=list)


def _step_time(value: float, what: str) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"step times: {what} must be a finite number of seconds >= 0, got {value!r}")
    return value


def simulate(workload: Sequence[Arrival], policy: BatchingPolicy, context: int, times: StepTimes,
             rate: float | None = None, slo: dict[str, float] | None = None,
             engine_shapes: bool = False) -> Simulation:
    """Run ``workload`` through a Scheduler(policy, context) with ``times`` (module docstring). Requests
    the scheduler refuses (queue full, too long) are failed records. ``engine_shapes`` prices each decode
    step at the shape krakenlm's eager engine computes (``decode_shape``: rows up to the highest one in use,
    keys over the longest context rounded up) instead of the running requests at their mean context."""
    sched = Scheduler(policy, context)
    pending = deque(sorted(workload, key=lambda a: a.time))
    traces: dict[int, _Trace] = {}
    failed: list[RequestRecord] = []
    t, steps, decode_steps, decoded, max_waiting = 0.0, 0, 0, 0, 0
    next_id = 0
    while pending or not sched.idle:
        while pending and pending[0].time <= t:
            a = pending.popleft()
            try:
                sched.submit(Request(next_id, a.prompt_len, a.output_len))
                traces[next_id] = _Trace(a.time)
            except (QueueFull, InputError):
                failed.append(RequestRecord(arrival=a.time, ok=False))
            next_id += 1
        max_waiting = max(max_waiting, sched.waiting)
        step = sched.plan()
        if step.empty:
            if not pending:
                break
            t = max(t, pending[0].time)
            continue
        steps += 1
        for chunk in step.prefill:  # priced as a prefill of the chunk's tokens, one request at a time
            t += _step_time(times.prefill(chunk.stop - chunk.start), "prefill")
            if chunk.last:
                traces[chunk.request.id].times.append(t)
                sched.token(chunk.request.id)
        if step.decode:
            contexts = [req.prompt_len + len(traces[req.id].times) for req, _ in step.decode]
            if engine_shapes:
                cached = [c - 1 for c in contexts]  # the newest token is written by this step
                width, keys = decode_shape([row for _, row in step.decode], cached, policy.max_batch, context)
                contexts = [keys] * width
            t += _step_time(times.decode(contexts), "decode")
            decode_steps, decoded = decode_steps + 1, decoded + len(step.decode)
            for req, _ in step.decode:
                traces[req.id].times.append(t)
                sched.token(req.id)
    done = [RequestRecord(arrival=tr.arrival, first_token=tr.times[0], token_times=tuple(tr.times),
                          end=tr.times[-1], output_tokens=len(tr.times)) for tr in traces.values()]
    records = sorted(done + failed, key=lambda r: r.arrival)
    return Simulation(report=summarize(records, rate=rate, slo=slo), records=records, steps=steps,
                      mean_decode_batch=decoded / decode_steps if decode_steps else 0.0, max_waiting=max_waiting)


# Choosing a deployment for a service-level objective ----------------------------------------------
DEFAULT_BATCH_LIMITS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class SloCandidate:
    """One simulated deployment and whether it met every target."""

    config: ModelConfig
    chips: int
    stages: int
    max_batch: int
    report: dict[str, Any]
    met: bool
    memory_per_chip_bytes: float

    @property
    def label(self) -> str:
        return f"{deployment_label(self.config, self.chips, self.stages)}, max_batch {self.max_batch}"


@dataclass(frozen=True)
class SloPlan:
    """The cheapest deployment meeting the targets, every one simulated, and why."""

    best: SloCandidate
    tried: list[SloCandidate]
    explanation: str


def plan_slo(config: ModelConfig, hw: Hardware, load: Sequence[Arrival], chips: int, targets: list[SloTarget],
             rate: float | None = None, dtype: str = "bf16", batches: tuple[int, ...] | None = None,
             kraken_degrees: tuple[int, ...] | None = None, stages: tuple[int, ...] | None = None,
             overlap: str = "none", max_queue: int = 256, memory_limit: float | None = None) -> SloPlan:
    """The deployment on the fewest chips (up to ``chips``) whose simulated run of ``load`` meets every
    target with no request refused; ties (same chips) go to the lowest value of the first target.
    Candidates: every valid (chips, stages) split x Kraken degree x batch limit (max_batch, with
    max_tokens = max_batch x the longest request) whose KV cache for max_batch rows fits the memory."""
    if not targets:
        raise ConfigError("slo: give at least one target, e.g. 'p99_ttft<=200ms'")
    longest_prompt = max(a.prompt_len for a in load)
    need = max(a.prompt_len + a.output_len for a in load)
    check_context(config, Workload(prompt=longest_prompt, generate=need - longest_prompt, dtype=dtype))
    limit = memory_limit or hw.memory_bytes
    tried: list[SloCandidate] = []
    by_chips: dict[int, list[tuple[ModelConfig, int]]] = {}
    for variant, n, s in deployments(config, hw, chips, kraken_degrees, stages)[0]:
        by_chips.setdefault(n, []).append((variant, s))
    for n, group in sorted(by_chips.items()):
        for variant, s in group:
            times = CostModelTimes(variant, hw, n, s, dtype, overlap)
            for b in batches or DEFAULT_BATCH_LIMITS:
                wl = Workload(1, longest_prompt, need - longest_prompt, dtype, decode_batch=b)
                memory = estimate(variant, hw, wl, n, overlap=overlap, pipeline=s).memory_per_chip_bytes
                if memory > limit:
                    continue
                policy = BatchingPolicy(max_batch=b, max_tokens=b * need, max_queue=max_queue)
                report = simulate(load, policy, variant.block_size, times, rate=rate).report
                met = report["failed"] == 0 and all(t.met(report) for t in targets)
                tried.append(SloCandidate(variant, n, s, b, report, met, memory))
        winners = [c for c in tried if c.met and c.chips == n]
        if winners:
            best = min(winners, key=lambda c: targets[0].value(c.report))  # type: ignore[arg-type,return-value]
            return SloPlan(best, tried, _explain_slo(best, tried, targets))
    raise ConfigError(f"plan: no deployment on up to {chips} x {hw.name} meets {', '.join(map(str, targets))} "
                      f"({len(tried)} simulated within {format_bytes(limit)} per chip); allow more chips, a "
                      f"lower rate or looser targets")


def _explain_slo(best: SloCandidate, tried: list[SloCandidate], targets: list[SloTarget]) -> str:
    r = best.report
    got = ", ".join(f"{t} (predicted {t.value(r) * 1e3:.1f} ms)" for t in targets)  # type: ignore[operator]
    return "\n".join([
        f"Chosen: {best.label}, the fewest chips meeting {got}.",
        f"Simulated {r['requests']} requests" + (f" at {r['rate']:g} req/s" if r["rate"] else " of the trace")
        + f": throughput {r['throughput_rps']:.3g} req/s, "
        f"p50 TTFT {r['ttft_s']['p50'] * 1e3:.1f} ms, p50 TPOT "
        + (f"{r['tpot_s']['p50'] * 1e3:.2f} ms" if r["tpot_s"]["p50"] is not None else "n/a")
        + f", {format_bytes(best.memory_per_chip_bytes)} per chip.",
        f"Simulated {len(tried)} deployments, {sum(c.met for c in tried)} meeting the targets."])
