"""A serving engine's step-time profile, measured from outside as its clients see it (``krakenlm loadtest
--profile``, krakenlm.serve.profiler): a lone request's TTFT at a few prompt lengths (prefill plus the host
time around it), and the inter-token gap of ``w`` requests decoded together for each width the engine
computes (it pads a step's rows to a power of two; krakenlm.batching.scheduler.bucket). The simulator turns
a profile into the host time the cost model leaves out (krakenlm.costmodel.simulate.fit_host_overhead), so
a deployment's simulated percentiles can be checked against, and extrapolated from, the server it was
measured on.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from krakenlm.batching.scheduler import bucket
from krakenlm.errors import ConfigError
from krakenlm.jsonio import read_json
from krakenlm.validation import check_int, check_output_file, is_finite_number


@dataclass(frozen=True)
class EngineProfile:
    """Medians measured on one server: ``ttft_alone_s[i]`` of a lone request of ``prompts[i]`` tokens;
    ``itl_s[j]`` between tokens of ``widths[j]`` requests of ``prompt`` + ``output`` tokens sent at once."""

    prompt: int
    output: int
    prompts: tuple[int, ...]
    ttft_alone_s: tuple[float, ...]
    widths: tuple[int, ...]
    itl_s: tuple[float, ...]

    def __post_init__(self) -> None:
        for name in ("prompt", "output"):
            check_int(getattr(self, name), f"profile: {name}")
        for keys, values in (("prompts", "ttft_alone_s"), ("widths", "itl_s")):
            xs, ys = getattr(self, keys), getattr(self, values)
            if not isinstance(xs, (list, tuple)) or not isinstance(ys, (list, tuple)) or len(xs) != len(ys) or not xs:
                raise ConfigError(f"profile: {keys} and {values} must be lists of the same non-zero length")
            for x in xs:
                check_int(x, f"profile: each of {keys}")
            if not all(is_finite_number(y) and y > 0 for y in ys):
                raise ConfigError(f"profile: {values} must be positive seconds, got {list(ys)}")
            object.__setattr__(self, keys, tuple(xs))
            object.__setattr__(self, values, tuple(float(y) for y in ys))
        if len(set(self.widths)) < 2:
            raise ConfigError(f"profile: at least two distinct widths are needed to tell per-step from per-row "
                              f"time, got {list(self.widths)}")

    @property
    def capacity_rps(self) -> float:
        """Requests/s the server sustains at full batches: a lone prefill per request plus its share of the
        widest decode steps."""
        widest = max(range(len(self.widths)), key=lambda j: self.widths[j])
        per_row = self.itl_s[widest] / self.widths[widest]
        return 1.0 / (statistics.median(self.ttft_alone_s) + self.output * per_row)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> EngineProfile:
        if not isinstance(data, dict) or set(data) != {f for f in cls.__dataclass_fields__}:
            raise ConfigError(f"profile: expected an object with keys {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


def engine_widths(max_batch: int) -> tuple[int, ...]:
    """The decode widths an engine with ``max_batch`` rows computes: powers of two, then max_batch."""
    return tuple(sorted({bucket(n, max_batch) for n in range(1, max_batch + 1)}))


def save_profiles(path: str | Path, profiles: dict[str, EngineProfile]) -> None:
    """Write ``{"profiles": {server: profile}}`` (what ``krakenlm simulate --profile`` reads)."""
    doc = {"profiles": {n: p.to_dict() for n, p in profiles.items()}}
    check_output_file(path, "out").write_text(json.dumps(doc, indent=2) + "\n")


def load_profile(spec: str) -> EngineProfile:
    """``FILE`` (holding one server's profile) or ``FILE:NAME`` -> that profile."""
    path, name = (spec, None) if Path(spec).exists() or ":" not in spec else spec.rsplit(":", 1)
    data = read_json(path, "profile")
    profiles = data.get("profiles") if isinstance(data, dict) else None
    if not isinstance(profiles, dict) or not profiles:
        raise ConfigError(f"profile: {path} holds no profiles (write one with `krakenlm loadtest --profile --out`)")
    if name is None and len(profiles) > 1:
        raise ConfigError(f"profile: {path} holds {sorted(profiles)}: name one as {path}:NAME")
    chosen = name if name is not None else next(iter(profiles))
    if chosen not in profiles:
        raise ConfigError(f"profile: {path} holds {sorted(profiles)}, not {chosen!r}")
    return EngineProfile.from_dict(profiles[chosen])
