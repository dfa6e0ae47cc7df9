"""The request sequence of a serving run: when requests arrive and how long their prompts and outputs are.

One module for both sides of the comparison: `krakenlm loadtest` sends exactly these requests to a real
server and `krakenlm simulate` feeds exactly these to the scheduler with predicted step times, so the
same ``LoadSpec`` (arguments and seed) is the same load for both.

Arrivals: ``poisson`` (exponential gaps at ``rate``), ``constant`` (one every 1/rate s), the first at 0;
rate ``inf`` sends every request at 0 (a burst); or a trace file (a JSON list or JSON lines of
``{"arrival": s, "prompt_len": n, "output_len": n}``). Lengths are fixed (``N``) or uniform
(``LOW-HIGH``). One seeded stream draws, request by request, the gap before it and then its prompt and
output lengths (a fixed length draws nothing, so fixed-length loads share their arrival times whatever
the lengths are).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from krakenlm.errors import ConfigError
from krakenlm.jsonio import read_json_or_lines
from krakenlm.validation import check_int

ARRIVALS = ("poisson", "constant")
MAX_REQUESTS = 1_000_000
MAX_SPAN_S = 1e9  # ~32 years; float64 seconds there still resolve 0.2 us
MAX_TOKENS = 1 << 40


def _is_tokens(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_TOKENS


@dataclass(frozen=True)
class Lengths:
    """Token counts drawn uniformly from [low, high] (fixed when equal)."""

    low: int
    high: int

    def __post_init__(self) -> None:
        for key in ("low", "high"):
            value = getattr(self, key)
            if not _is_tokens(value):
                raise ConfigError(f"lengths: {key} must be an integer in [1, {MAX_TOKENS}], got {value!r}")
        if self.high < self.low:
            raise ConfigError(f"lengths: high {self.high} is below low {self.low}")

    @classmethod
    def parse(cls, text: str | int, what: str) -> Lengths:
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

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"

    def sample(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)


@dataclass(frozen=True)
class Arrival:
    """One request of the load: when it arrives (seconds from the start) and its prompt and output lengths."""

    time: float
    prompt_len: int
    output_len: int


def _check_rate(rate: Any) -> None:
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or math.isnan(rate) or rate <= 0 or (
            math.isfinite(rate) and rate > 1e9):
        raise ConfigError(f"rate: must be a number of requests per second in (0, 1e9] or inf, got {rate!r}")


def arrivals(kind: str, rate: float, requests: int, prompt: Lengths, output: Lengths, seed: int = 0) -> list[Arrival]:
    """``requests`` arrivals at ``rate`` per second, ``poisson`` or ``constant`` (module docstring)."""
    if kind not in ARRIVALS:
        raise ConfigError(f"arrivals: must be one of {ARRIVALS} or a trace file, got {kind!r}")
    _check_rate(rate)
    check_int(requests, "requests", maximum=MAX_REQUESTS)
    if math.isfinite(rate) and (requests - 1) / rate > MAX_SPAN_S:  # float seconds would drop the latencies
        raise ConfigError(f"rate: {requests} requests at {rate:g}/s span {(requests - 1) / rate:.3g} s; at most "
                          f"{MAX_SPAN_S:g} s keeps timings to the microsecond (raise --rate or lower --requests)")
    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(requests):
        if i and math.isfinite(rate):
            t += rng.expovariate(rate) if kind == "poisson" else 1 / rate
        out.append(Arrival(t, prompt.sample(rng), output.sample(rng)))
    return out


def load_trace(path: str | Path) -> list[Arrival]:
    """Arrivals from a JSON list (or JSON lines) of {"arrival": s, "prompt_len": n, "output_len": n}, by time."""
    rows = read_json_or_lines(path, "trace")
    if not isinstance(rows, list):
        raise ConfigError(f"trace: {path} must hold a JSON list or JSON lines, got a {type(rows).__name__}")
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


@dataclass(frozen=True)
class LoadSpec:
    """A load as both the load generator and the simulator take it: ``arrivals`` (poisson, constant or a
    trace file's path), ``rate`` and ``requests`` (ignored for a trace), lengths, and the seed."""

    rate: float = math.inf
    requests: int = 64
    prompt: Lengths = Lengths(128, 128)
    output: Lengths = Lengths(64, 64)
    seed: int = 0
    arrivals: str = "poisson"

    def __post_init__(self) -> None:
        if self.arrivals in ARRIVALS:
            arrivals(self.arrivals, self.rate, self.requests, Lengths(1, 1), Lengths(1, 1))  # validates
        elif not isinstance(self.arrivals, str) or not Path(self.arrivals).is_file():
            raise ConfigError(f"arrivals: must be one of {ARRIVALS} or a trace file, got {self.arrivals!r}")
        if not isinstance(self.prompt, Lengths) or not isinstance(self.output, Lengths):
            raise ConfigError("load: prompt and output must be Lengths")
        # random.Random(-n) is random.Random(n): a negative seed would silently repeat a positive one's load
        check_int(self.seed, "seed", minimum=0)

    @property
    def trace(self) -> bool:
        return self.arrivals not in ARRIVALS

    @property
    def offered_rate(self) -> float | None:
        """The rate reports carry: None for a trace or a burst (rate inf)."""
        return None if self.trace or math.isinf(self.rate) else self.rate

    def generate(self) -> list[Arrival]:
        """The request sequence, the same on every call (seeded)."""
        if self.trace:
            return load_trace(self.arrivals)
        return arrivals(self.arrivals, self.rate, self.requests, self.prompt, self.output, self.seed)
