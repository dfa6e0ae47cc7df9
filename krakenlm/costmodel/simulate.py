"""Serving simulator: requests arrive (Poisson at a rate, evenly spaced, or from a trace), wait in the
iteration-level scheduler the server uses (krakenlm.serve.scheduler, the same code), and every step
takes the cost model's time: each admitted request is prefilled on its own at batch 1, then one decode
step runs at the running batch and its mean context. The result is the report of krakenlm.serve.report,
field for field what the load generator prints for a real server.

``plan_slo`` searches deployments (chips, pipeline stages, Kraken degree, batch limit) from the fewest
chips up and returns the cheapest whose simulated percentiles meet every target (``p99_ttft<=200ms``)
with no request refused.

Limits: steps run one after another as the scheduler's semantics say (a pipelined engine could overlap
a newcomer's prefill with other micro-batches' decode); a decode step is priced at the batch's mean
context (rounded to a token), exact for the KV reads and attention FLOPs, which are linear in it.
"""

from __future__ import annotations

import json
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from krakenlm.config import ModelConfig
from krakenlm.costmodel.estimator import Workload, best_phase, check_context, estimate, format_bytes, tp_degree
from krakenlm.costmodel.hardware import Hardware
from krakenlm.costmodel.layouts import check_split
from krakenlm.costmodel.pipeline import Pipeline
from krakenlm.costmodel.planner import deployment_label, deployments
from krakenlm.errors import ConfigError, InputError
from krakenlm.serve.report import RequestRecord, SloTarget, summarize
from krakenlm.serve.scheduler import BatchingPolicy, QueueFull, Request, Scheduler

ARRIVALS = ("poisson", "constant")
MAX_REQUESTS = 1_000_000


def _is_tokens(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1 << 40


@dataclass(frozen=True)
class Lengths:
    """Token counts drawn uniformly from [low, high] (fixed when equal)."""

    low: int
    high: int

    def __post_init__(self) -> None:
        for key in ("low", "high"):
            value = getattr(self, key)
            if not _is_tokens(value):
                raise ConfigError(f"lengths: {key} must be an integer in [1, {1 << 40}], got {value!r}")
        if self.high < self.low:
            raise ConfigError(f"lengths: high {self.high} is below low {self.low}")

    @classmethod
    def parse(cls, text: str, what: str) -> Lengths:
        """``"128"`` (fixed) or ``"64-512"`` (uniform)."""
        low, sep, high = str(text).partition("-")
        try:
            values = int(low), int(high) if sep else int(low)
        except ValueError:
            raise ConfigError(f"{what}: expected N or LOW-HIGH tokens, got {text!r}") from None
        try:
            return cls(*values)
        except ConfigError as err:
            raise ConfigError(f"{what}: {err}") from None

    def sample(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)


@dataclass(frozen=True)
class Arrival:
    """One request of the workload: when it arrives and its prompt and output lengths."""

    time: float
    prompt_len: int
    output_len: int


def arrivals(kind: str, rate: float, requests: int, prompt: Lengths, output: Lengths, seed: int = 0) -> list[Arrival]:
    """``requests`` arrivals at ``rate`` per second: ``poisson`` (exponential gaps, seeded) or ``constant``
    (one every 1/rate s, the first at 0); lengths drawn from ``prompt`` and ``output`` with the same seed."""
    if kind not in ARRIVALS:
        raise ConfigError(f"arrivals: must be one of {ARRIVALS} or a trace file, got {kind!r}")
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 < rate <= 1e9 or math.isnan(rate):
        raise ConfigError(f"rate: must be a number of requests per second in (0, 1e9], got {rate!r}")
    if not isinstance(requests, int) or isinstance(requests, bool) or not 1 <= requests <= MAX_REQUESTS:
        raise ConfigError(f"requests: must be an integer in [1, {MAX_REQUESTS}], got {requests!r}")
    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(requests):
        if i:
            t += rng.expovariate(rate) if kind == "poisson" else 1 / rate
        out.append(Arrival(t, prompt.sample(rng), output.sample(rng)))
    return out


def load_trace(path: str | Path) -> list[Arrival]:
    """Arrivals from a JSON list (or JSON lines) of {"arrival": s, "prompt_len": n, "output_len": n}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"trace: {path} is not a readable regular file")
    try:
        text = path.read_text()
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines()
                                                                        if x.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"trace: cannot read {path}: {err}") from err
    out = []
    for i, row in enumerate(rows):
        t = row.get("arrival") if isinstance(row, dict) else None
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise ConfigError(f"trace: entry {i} needs an 'arrival' time in seconds >= 0, got {row!r}")
        p, o = row.get("prompt_len"), row.get("output_len")
        if not (_is_tokens(p) and _is_tokens(o)):
            raise ConfigError(f"trace: entry {i} needs integer 'prompt_len' and 'output_len' >= 1, got {row!r}")
        out.append(Arrival(float(t), p, o))
    if not 1 <= len(out) <= MAX_REQUESTS:
        raise ConfigError(f"trace: {path} must hold 1 to {MAX_REQUESTS} requests, got {len(out)}")
    return sorted(out, key=lambda a: a.time)


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


class CostModelTimes:
    """Step times from the estimator: prefill at batch 1, decode at the batch and its mean context, the
    fastest layout per phase (or ``layout``), on ``chips`` chips in ``stages`` pipeline stages."""

    def __init__(self, config: ModelConfig, hw: Hardware, chips: int, stages: int = 1, dtype: str = "bf16",
                 overlap: str = "none", lm_head: str = "sharded") -> None:
        check_split(config, tp_degree(chips, stages), stages, hw.chips_per_node)
        self.config, self.hw, self.tp, self.dtype = config, hw, chips // stages, dtype
        self.pipe, self.overlap, self.lm_head = Pipeline(stages=stages), overlap, lm_head
        self._prefill = lru_cache(maxsize=None)(self._prefill_uncached)
        self._decode = lru_cache(maxsize=None)(self._decode_uncached)

    def _phase(self, phase: str, batch: int, prompt: int) -> float:
        wl = Workload(batch=batch, prompt=prompt, dtype=self.dtype)
        return best_phase(self.config, self.hw, wl, phase, self.tp, self.overlap, self.lm_head, self.pipe).time_s

    def _prefill_uncached(self, prompt_len: int) -> float:
        return self._phase("prefill", 1, prompt_len)

    def _decode_uncached(self, batch: int, context: int) -> float:
        return self._phase("decode", batch, context)

    def prefill(self, prompt_len: int) -> float:
        return self._prefill(prompt_len)

    def decode(self, contexts: Sequence[int]) -> float:
        return self._decode(len(contexts), max(1, round(sum(contexts) / len(contexts))))


@dataclass(frozen=True)
class Simulation:
    """A simulated run: the report (krakenlm.serve.report fields), the per-request records and the
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
             rate: float | None = None, slo: dict[str, float] | None = None) -> Simulation:
    """Run ``workload`` through a Scheduler(policy, context) with ``times`` (module docstring). Requests
    the scheduler refuses (queue full, too long) are failed records."""
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
        for req, _ in step.admit:
            t += _step_time(times.prefill(req.prompt_len), "prefill")
            traces[req.id].times.append(t)
            sched.token(req.id)
        if step.decode:
            contexts = [req.prompt_len + len(traces[req.id].times) for req, _ in step.decode]
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
