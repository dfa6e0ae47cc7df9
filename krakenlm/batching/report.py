"""The latency report of a serving run: per-request records in, one JSON-ready dict out. The load
generator (measured) and the cost model's simulator (predicted) both print it, so the two lie side by
side field for field.

Per request (completed ones only): TTFT = first token - arrival; TPOT = (end - first token) /
(output tokens - 1), requests of one token excluded; ITL = every gap between consecutive token times
(pooled over requests); e2e = end - arrival. Each is summarised as {p50, p90, p99, mean} (percentiles
by linear interpolation between order statistics, numpy's default; null when there is no value).
duration_s = last end (or arrival) - first arrival unless the caller measured it; throughput_rps and
output_tokens_per_s count completed requests over it; goodput_rps counts completed requests whose TTFT,
TPOT and e2e all meet the per-request ``slo`` (e.g. {"ttft_s": 0.2, "tpot_s": 0.05}).

Percentile targets for choosing a deployment (``plan --slo "p99_ttft<=200ms"``) are ``SloTarget``s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from krakenlm.errors import InputError
from krakenlm.validation import is_finite_number

METRICS = ("ttft_s", "tpot_s", "itl_s", "e2e_s")
SLO_KEYS = ("ttft_s", "tpot_s", "e2e_s")  # per-request thresholds for goodput
STATS = ("p50", "p90", "p99", "mean")
_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one request (seconds on one clock). ``token_times`` lists every output token's
    time, the first included (empty when the client did not stream: ITL is then unknown)."""

    arrival: float
    first_token: float | None = None
    token_times: tuple[float, ...] = field(default=())
    end: float | None = None
    output_tokens: int = 0
    ok: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_times", tuple(self.token_times))
        times = [self.arrival, *self.token_times] + [t for t in (self.first_token, self.end) if t is not None]
        if not all(is_finite_number(t) for t in times):
            raise InputError(f"request record: times must be finite numbers, got {self}")
        if not isinstance(self.output_tokens, int) or isinstance(self.output_tokens, bool) or self.output_tokens < 0:
            raise InputError(f"request record: output_tokens must be an integer >= 0, got {self.output_tokens!r}")
        if self.ok and (self.first_token is None or self.end is None or self.output_tokens < 1):
            raise InputError("request record: a completed request needs first_token, end and output_tokens >= 1")

    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.end - self.first_token) / (self.output_tokens - 1)  # type: ignore[operator]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between order statistics; None if empty."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats(values: Sequence[float]) -> dict[str, float | None]:
    """{p50, p90, p99, mean} of ``values`` (None each when empty)."""
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99),
            "mean": sum(values) / len(values) if values else None}


def check_slo(slo: dict[str, float] | None) -> dict[str, float]:
    """A per-request SLO: keys from SLO_KEYS, positive finite seconds."""
    slo = dict(slo or {})
    for key, value in slo.items():
        if key not in SLO_KEYS:
            raise InputError(f"slo: unknown key {key!r}; known: {SLO_KEYS}")
        if not is_finite_number(value) or value <= 0:
            raise InputError(f"slo: {key} must be a positive number of seconds, got {value!r}")
    return slo


def _meets(r: RequestRecord, slo: dict[str, float]) -> bool:
    assert r.first_token is not None and r.end is not None
    values = {"ttft_s": r.first_token - r.arrival, "tpot_s": r.tpot(), "e2e_s": r.end - r.arrival}
    return all(values[k] is None or values[k] <= limit for k, limit in slo.items())


def summarize(records: Iterable[RequestRecord], rate: float | None = None, slo: dict[str, float] | None = None,
              duration_s: float | None = None) -> dict[str, Any]:
    """The report (module docstring) of ``records``; ``rate`` is the offered request rate (None for a trace)."""
    recs, slo = list(records), check_slo(slo)
    done = [r for r in recs if r.ok]
    if duration_s is None:
        ends = [t for r in recs for t in (r.end, r.arrival) if t is not None]
        duration_s = max(ends) - min(r.arrival for r in recs) if recs else 0.0
    if not is_finite_number(duration_s) or duration_s < 0:
        raise InputError(f"report: duration_s must be a finite number >= 0, got {duration_s!r}")

    def per_s(n: int) -> float | None:
        return n / duration_s if duration_s > 0 else None

    gaps = [b - a for r in done for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    tpots = [t for t in (r.tpot() for r in done) if t is not None]
    return {
        "rate": rate, "requests": len(recs), "completed": len(done), "failed": len(recs) - len(done),
        "duration_s": duration_s, "throughput_rps": per_s(len(done)),
        "output_tokens_per_s": per_s(sum(r.output_tokens for r in done)),
        "ttft_s": stats([r.first_token - r.arrival for r in done]),  # type: ignore[operator]
        "tpot_s": stats(tpots), "itl_s": stats(gaps),
        "e2e_s": stats([r.end - r.arrival for r in done]),  # type: ignore[operator]
        "slo": slo, "goodput_rps": per_s(sum(1 for r in done if _meets(r, slo))),
    }


@dataclass(frozen=True)
class SloTarget:
    """A percentile target on the report, e.g. p99 of TTFT <= 0.2 s."""

    stat: str
    metric: str
    limit_s: float

    def __str__(self) -> str:
        return f"{self.stat}_{self.metric.removesuffix('_s')}<={self.limit_s * 1e3:g}ms"

    def value(self, report: dict[str, Any]) -> float | None:
        return report[self.metric][self.stat]

    def met(self, report: dict[str, Any]) -> bool:
        """Met when the statistic exists and is within the limit (a metric with no value is not met)."""
        value = self.value(report)
        return value is not None and value <= self.limit_s


_SLO_RE = re.compile(r"^\s*(p50|p90|p99|mean)_(ttft|tpot|itl|e2e)\s*<=\s*([0-9.eE+-]+)\s*(ms|us|s)\s*$")


def parse_slo_targets(text: str) -> list[SloTarget]:
    """``"p99_ttft<=200ms,p50_tpot<=50ms"`` -> targets (stats p50/p90/p99/mean of ttft/tpot/itl/e2e;
    units s, ms, us)."""
    targets = []
    for part in str(text).split(","):
        m = _SLO_RE.match(part)
        value = None
        if m:
            try:
                value = float(m.group(3)) * _UNITS[m.group(4)]
            except ValueError:
                value = None
        if not m or value is None or not math.isfinite(value) or value <= 0:
            raise InputError(f"slo: cannot read {part.strip()!r}; write e.g. 'p99_ttft<=200ms' "
                             f"(stat p50|p90|p99|mean, metric ttft|tpot|itl|e2e, positive limit in s|ms|us)")
        targets.append(SloTarget(m.group(1), f"{m.group(2)}_s", value))
    return targets
