"""Hardware specs as data: peak rates, memory, interconnect and the calibratable efficiency factors.

Specs live in JSON files next to this module (``hardware/<name>.json``) so a calibration can write a
new file instead of editing code. Units: FLOP/s, bytes, bytes/s, seconds.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from krakenlm.errors import ConfigError

SPEC_DIR = Path(__file__).with_name("hardware")
TOPOLOGIES = ("ring", "switch", "torus")
AXIS_BANDWIDTH = ("full", "per_axis")
DTYPES = ("bf16", "fp16", "fp32", "int8")
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "int8": 1}


@dataclass(frozen=True)
class Hardware:
    """One accelerator ("chip") and the fabric between chips.

    ``alpha`` is the latency of one collective step (see collectives.py for how many steps each
    topology takes). The three ``*_eff`` factors scale the peak rates to achievable ones and are what
    ``calibrate`` fits; ``layer_overhead_s`` is a fixed cost per layer per forward (kernel launches).
    ``axis_bandwidth="full"`` gives every collective the whole per-chip link bandwidth (the paper's
    simplification); ``"per_axis"`` gives a collective over a subset of torus axes only its share.
    ``ring_factor`` keeps the (K-1)/K factor of ring-style collectives (the paper drops it).
    """

    name: str
    peak_flops: dict[str, float]
    memory_bytes: float
    memory_bw: float
    link_bw: float
    alpha: float
    topology: str
    torus_axes: tuple[int, ...] = ()
    axis_bandwidth: str = "full"
    ring_factor: bool = True
    matmul_eff: float = 1.0
    memory_eff: float = 1.0
    comm_eff: float = 1.0
    layer_overhead_s: float = 0.0
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "torus_axes", tuple(self.torus_axes))
        object.__setattr__(self, "peak_flops", dict(self.peak_flops))
        if self.topology not in TOPOLOGIES:
            raise ConfigError(f"hardware {self.name}: topology must be one of {TOPOLOGIES}, got {self.topology!r}")
        if self.axis_bandwidth not in AXIS_BANDWIDTH:
            raise ConfigError(f"hardware {self.name}: axis_bandwidth must be one of {AXIS_BANDWIDTH}, "
                              f"got {self.axis_bandwidth!r}")
        if self.topology == "torus" and (not self.torus_axes or any(a < 1 for a in self.torus_axes)):
            raise ConfigError(f"hardware {self.name}: a torus needs positive torus_axes, got {self.torus_axes!r}")
        for key in ("memory_bytes", "memory_bw", "link_bw", "matmul_eff", "memory_eff", "comm_eff"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"hardware {self.name}: {key} must be a positive number, got {value!r}")
        for key in ("alpha", "layer_overhead_s"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"hardware {self.name}: {key} must be a number >= 0, got {value!r}")
        if "bf16" not in self.peak_flops or any(v <= 0 for v in self.peak_flops.values()):
            raise ConfigError(f"hardware {self.name}: peak_flops needs a positive 'bf16' entry, got {self.peak_flops}")

    def peak(self, dtype: str) -> float:
        """Peak matmul FLOP/s for weights of ``dtype``; int8 weights are dequantised to bf16 (weight-only)."""
        compute = "bf16" if dtype == "int8" else dtype
        if compute not in self.peak_flops:
            raise ConfigError(f"hardware {self.name}: no peak_flops for dtype {compute!r}; "
                              f"known: {sorted(self.peak_flops)}")
        return self.peak_flops[compute]

    def with_factors(self, **changes: Any) -> Hardware:
        """A copy with some fields changed (used by calibration and what-if studies)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as stored in hardware/*.json."""
        data = dataclasses.asdict(self)
        data["torus_axes"] = list(self.torus_axes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hardware:
        """Parse a spec, naming unknown or missing fields instead of failing on a TypeError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"hardware: unknown field(s) {unknown}; known fields: {sorted(known)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in data)
        if missing:
            raise ConfigError(f"hardware: missing field(s) {missing}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the spec as JSON (e.g. after calibration) so it loads by path."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def hardware_names() -> list[str]:
    """Names of the bundled specs."""
    return sorted(p.stem for p in SPEC_DIR.glob("*.json"))


def load_hardware(name_or_path: str | Path) -> Hardware:
    """A bundled spec by name (``tpu-v4``) or any spec JSON file by path."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = SPEC_DIR / f"{name_or_path}.json"
        if not path.exists():
            raise ConfigError(f"hardware: unknown hardware {str(name_or_path)!r}; "
                              f"available: {', '.join(hardware_names())} or a path to a JSON spec")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"hardware: cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"hardware: {path} must hold a JSON object")
    return Hardware.from_dict(data)
