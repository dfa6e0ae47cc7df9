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

from krakenlm.config import dataclass_fields
from krakenlm.errors import ConfigError
from krakenlm.machine import machine_spec

SPEC_DIR = Path(__file__).with_name("hardware")
TOPOLOGIES = ("ring", "switch", "torus")
AXIS_BANDWIDTH = ("full", "per_axis")
DTYPES = ("bf16", "fp16", "fp32", "int8")
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "int8": 1}
PER_DTYPE = ("matmul_eff", "attention_eff", "memory_eff")  # factors that may be one number or {dtype: number}


def compute_dtype(dtype: str) -> str:
    """The dtype the matmuls run in: int8 weights are dequantised to bf16 (weight-only quantisation)."""
    return "bf16" if dtype == "int8" else dtype


@dataclass(frozen=True)
class Hardware:
    """One accelerator ("chip") and the fabric between chips.

    ``alpha`` is the latency of one collective step (see collectives.py for how many steps each
    topology takes). The ``*_eff`` factors scale the peak rates to achievable ones and are what
    ``calibrate`` fits: ``matmul_eff`` for weight matmuls, ``attention_eff`` for the attention-score
    matmuls (QK^T, AV) relative to that, ``memory_eff`` for HBM, ``comm_eff`` for links.
    ``matmul_eff``, ``attention_eff`` and ``memory_eff`` may be a ``{dtype: factor}`` mapping with an
    entry per ``peak_flops`` dtype, because a CPU's bf16 and fp32 kernels can differ by more than
    the peak ratio says. ``layer_overhead_s`` is a fixed cost per layer per forward (kernel launches).
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
    matmul_eff: float | dict[str, float] = 1.0
    attention_eff: float | dict[str, float] = 1.0
    memory_eff: float | dict[str, float] = 1.0
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
        for key in ("memory_bytes", "memory_bw", "link_bw", "comm_eff"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"hardware {self.name}: {key} must be a positive number, got {value!r}")
        for key in PER_DTYPE:
            value = getattr(self, key)
            if isinstance(value, dict):
                object.__setattr__(self, key, dict(value))
                if set(value) != set(self.peak_flops):
                    raise ConfigError(f"hardware {self.name}: per-dtype {key} needs exactly the peak_flops dtypes "
                                      f"{sorted(self.peak_flops)}, got {sorted(value)}")
                values = list(value.values())
            else:
                values = [value]
            if any(not isinstance(v, (int, float)) or v <= 0 for v in values):
                raise ConfigError(f"hardware {self.name}: {key} must be a positive number or a mapping "
                                  f"dtype -> positive number, got {value!r}")
        for key in ("alpha", "layer_overhead_s"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"hardware {self.name}: {key} must be a number >= 0, got {value!r}")
        if "bf16" not in self.peak_flops or any(v <= 0 for v in self.peak_flops.values()):
            raise ConfigError(f"hardware {self.name}: peak_flops needs a positive 'bf16' entry, got {self.peak_flops}")

    def peak(self, dtype: str) -> float:
        """Peak matmul FLOP/s for weights of ``dtype``; int8 weights are dequantised to bf16 (weight-only)."""
        compute = compute_dtype(dtype)
        if compute not in self.peak_flops:
            raise ConfigError(f"hardware {self.name}: no peak_flops for dtype {compute!r}; "
                              f"known: {sorted(self.peak_flops)}")
        return self.peak_flops[compute]

    def eff(self, key: str, dtype: str) -> float:
        """Efficiency factor ``key`` (one of PER_DTYPE) for weights of ``dtype``."""
        value, compute = getattr(self, key), compute_dtype(dtype)
        if not isinstance(value, dict):
            return value
        if compute not in value:
            raise ConfigError(f"hardware {self.name}: no {key} for dtype {compute!r}; known: {sorted(value)}")
        return value[compute]

    def flop_rate(self, dtype: str) -> float:
        """Achievable weight-matmul FLOP/s: peak x matmul_eff."""
        return self.peak(dtype) * self.eff("matmul_eff", dtype)

    def attention_rate(self, dtype: str) -> float:
        """Achievable FLOP/s of the attention-score matmuls (QK^T, AV): flop_rate x attention_eff."""
        return self.flop_rate(dtype) * self.eff("attention_eff", dtype)

    def memory_rate(self, dtype: str) -> float:
        """Achievable HBM bytes/s when streaming ``dtype`` weights: memory_bw x memory_eff."""
        return self.memory_bw * self.eff("memory_eff", dtype)

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
        return cls(**dataclass_fields(cls, data, "hardware"))

    def save(self, path: str | Path) -> None:
        """Write the spec as JSON (e.g. after calibration) so it loads by path."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def hardware_names() -> list[str]:
    """Names of the bundled specs."""
    return sorted(p.stem for p in SPEC_DIR.glob("*.json"))


def load_hardware(name_or_path: str | Path) -> Hardware:
    """A bundled spec by name (``tpu-v4``) or any spec JSON file by path. ``cpu-gloo`` is the spec
    calibrated on this machine when there is one (``krakenlm roofline --calibrate``, the demo)."""
    path = Path(name_or_path)
    if str(name_or_path) == "cpu-gloo" and (calibrated := machine_spec()) is not None:
        return Hardware.from_dict(calibrated)
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
