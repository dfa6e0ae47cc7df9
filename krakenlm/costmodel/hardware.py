"""Hardware specs as data: peak rates, memory, interconnect (one fabric, or nodes joined by a
network) and the calibratable efficiency factors.

Specs live in JSON files next to this module (``hardware/<name>.json``) so a calibration can write a
new file instead of editing code. Units: FLOP/s, bytes, bytes/s, seconds. Every field is checked at
construction for its type and range, so a spec with a list for a rate, a NaN, an efficiency above 1
or an infinite bandwidth is refused with the field's name instead of producing nonsense later.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from krakenlm.config import dataclass_fields
from krakenlm.errors import ConfigError
from krakenlm.jsonio import read_json
from krakenlm.machine import machine_spec
from krakenlm.validation import check_output_file, is_finite_number, shown

SPEC_DIR = Path(__file__).with_name("hardware")
CALIBRATED = "cpu-gloo@here"  # the spec calibrated on the running machine (krakenlm.bench.spec)
TOPOLOGIES = ("ring", "switch", "torus")
NODE_TOPOLOGIES = ("ring", "switch")  # how the inter-node network is traversed (see collectives.py)
AXIS_BANDWIDTH = ("full", "per_axis")
DTYPES = ("bf16", "fp16", "fp32", "int8")
PEAK_DTYPES = ("bf16", "fp16", "fp32", "tf32")  # dtypes a spec may give a peak for
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "int8": 1}
PER_DTYPE = ("matmul_eff", "attention_eff", "memory_eff")  # factors that may be one number or {dtype: number}
# Plausible ranges: wide enough for a CPU core and a future accelerator, narrow enough to catch a
# unit mistake (GB/s written as a bare number) and to keep every derived time finite.
RATE_RANGE = (1e3, 1e18)
LATENCY_MAX = 1.0  # seconds per collective step / per layer


def compute_dtype(dtype: str) -> str:
    """The dtype the matmuls run in: int8 weights are dequantised to bf16 (weight-only quantisation)."""
    return "bf16" if dtype == "int8" else dtype


def _check_number(spec: str, key: str, value: Any, lo: float, hi: float, lo_open: bool = True) -> None:
    """``value`` must be a finite number in (lo, hi] (or [lo, hi] with ``lo_open=False``)."""
    ok = is_finite_number(value) and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bound = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ConfigError(f"hardware {spec}: {key} must be a finite number in {bound}, got {shown(value)}")


@dataclass(frozen=True)
class Hardware:
    """One accelerator ("chip"), the fabric between chips and, for clusters, the network between nodes.

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

    Clusters: ``chips_per_node`` > 0 groups chips into nodes of that many; ``link_bw``, ``alpha``,
    ``topology`` and ``comm_eff`` then describe the fabric inside a node (NVLink/NVSwitch) and the
    ``inter_node_*`` fields the network between nodes (InfiniBand): bandwidth per chip per direction
    (one NIC per chip), latency per step, ``ring`` (m-1 steps over m nodes) or ``switch`` (1 step),
    and its efficiency. ``chips_per_node=0`` is one fabric for any chip count (the TPU torus, a CPU).

    System-overlapped standard TP (overlap.py), one pair of factors per mode. ``chunked:K`` (async
    all-reduces): ``overlap_slowdown`` is the fraction of a concurrent transfer's duration that compute
    loses (0: transfers on their own engines; 1: nothing hidden, a CPU core doing gloo's copies) and
    ``overlap_step_s`` the fixed cost of each extra chunk. ``collective-matmul`` (point-to-point ring
    hops): ``ring_slowdown`` and ``ring_step_s`` the same for each hop, and ``ring_hop_eff`` a hop's
    bandwidth as a fraction of the link's achievable one (``link_bw * comm_eff``, or the network's
    across nodes): a send/recv pair need not stream as well as the collective the link was fitted on.
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
    chips_per_node: int = 0
    inter_node_bw: float = 0.0
    inter_node_alpha: float = 0.0
    inter_node_topology: str = "ring"
    inter_node_eff: float = 1.0
    overlap_slowdown: float = 0.0
    overlap_step_s: float = 0.0
    ring_slowdown: float = 0.0
    ring_step_s: float = 0.0
    ring_hop_eff: float = 1.0
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"hardware: name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.description, str):
            raise ConfigError(f"hardware {self.name}: description must be a string, got {self.description!r}")
        self._check_peaks()
        self._check_fabric()
        for key in ("memory_bytes", "memory_bw", "link_bw"):
            _check_number(self.name, key, getattr(self, key), *RATE_RANGE)
        for key in ("alpha", "layer_overhead_s", "overlap_step_s", "ring_step_s"):
            _check_number(self.name, key, getattr(self, key), 0.0, LATENCY_MAX, lo_open=False)
        for key in ("comm_eff", "ring_hop_eff"):
            _check_number(self.name, key, getattr(self, key), 0.0, 1.0)
        for key in ("overlap_slowdown", "ring_slowdown"):
            _check_number(self.name, key, getattr(self, key), 0.0, 1.0, lo_open=False)
        for key in PER_DTYPE:
            self._check_factor(key)
        self._check_nodes()

    def _check_peaks(self) -> None:
        peaks = self.peak_flops
        if not isinstance(peaks, dict) or "bf16" not in peaks or not set(peaks) <= set(PEAK_DTYPES):
            raise ConfigError(f"hardware {self.name}: peak_flops must be a mapping dtype -> FLOP/s with a 'bf16' "
                              f"entry and dtypes from {PEAK_DTYPES}, got {peaks!r}")
        object.__setattr__(self, "peak_flops", dict(peaks))
        for dtype, value in peaks.items():
            _check_number(self.name, f"peak_flops[{dtype}]", value, *RATE_RANGE)

    def _check_fabric(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ConfigError(f"hardware {self.name}: topology must be one of {TOPOLOGIES}, got {self.topology!r}")
        if self.axis_bandwidth not in AXIS_BANDWIDTH:
            raise ConfigError(f"hardware {self.name}: axis_bandwidth must be one of {AXIS_BANDWIDTH}, "
                              f"got {self.axis_bandwidth!r}")
        axes = self.torus_axes
        if not isinstance(axes, (list, tuple)) or not all(
                isinstance(a, int) and not isinstance(a, bool) and 1 <= a <= 4096 for a in axes):
            raise ConfigError(f"hardware {self.name}: torus_axes must be a list of integers in [1, 4096], got {axes!r}")
        object.__setattr__(self, "torus_axes", tuple(axes))
        if self.topology == "torus" and not self.torus_axes:
            raise ConfigError(f"hardware {self.name}: a torus needs torus_axes, e.g. [4, 4, 4]")
        if not isinstance(self.ring_factor, bool):
            raise ConfigError(f"hardware {self.name}: ring_factor must be true or false, got {self.ring_factor!r}")

    def _check_factor(self, key: str) -> None:
        value = getattr(self, key)
        if isinstance(value, dict):
            object.__setattr__(self, key, dict(value))
            if set(value) != set(self.peak_flops):
                raise ConfigError(f"hardware {self.name}: per-dtype {key} needs exactly the peak_flops dtypes "
                                  f"{sorted(self.peak_flops)}, got {sorted(value)}")
            for dtype, v in value.items():
                _check_number(self.name, f"{key}[{dtype}]", v, 0.0, 1.0)
        elif not is_finite_number(value) or not 0 < value <= 1:
            raise ConfigError(f"hardware {self.name}: {key} must be a number in (0, 1] or a mapping "
                              f"dtype -> number in (0, 1], got {shown(value)}")

    def _check_nodes(self) -> None:
        c = self.chips_per_node
        if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c <= 4096:
            raise ConfigError(f"hardware {self.name}: chips_per_node must be an integer in [0, 4096] "
                              f"(0 = one fabric for all chips), got {c!r}")
        if self.inter_node_topology not in NODE_TOPOLOGIES:
            raise ConfigError(f"hardware {self.name}: inter_node_topology must be one of {NODE_TOPOLOGIES}, "
                              f"got {self.inter_node_topology!r}")
        _check_number(self.name, "inter_node_alpha", self.inter_node_alpha, 0.0, LATENCY_MAX, lo_open=False)
        _check_number(self.name, "inter_node_eff", self.inter_node_eff, 0.0, 1.0)
        if c == 0:
            _check_number(self.name, "inter_node_bw", self.inter_node_bw, 0.0, RATE_RANGE[1], lo_open=False)
            return
        _check_number(self.name, f"inter_node_bw (the network between nodes of chips_per_node={c})",
                      self.inter_node_bw, *RATE_RANGE)
        if self.topology == "torus":
            raise ConfigError(f"hardware {self.name}: chips_per_node applies to ring/switch fabrics; a torus is "
                              f"one fabric (set chips_per_node to 0)")

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

    def overlap_factors(self, mode: str) -> tuple[float, float]:
        """(slowdown, seconds per extra step) of a system overlap mode: ``chunked``'s async all-reduces or
        ``collective-matmul``'s ring hops."""
        if mode == "collective-matmul":
            return self.ring_slowdown, self.ring_step_s
        return self.overlap_slowdown, self.overlap_step_s

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
        check_output_file(path, "save").write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def hardware_names() -> list[str]:
    """Names of the bundled specs."""
    return sorted(p.stem for p in SPEC_DIR.glob("*.json"))


def load_hardware(name_or_path: str | Path) -> Hardware:
    """A bundled spec by name (``tpu-v4``, ``cpu-gloo``: always the file), any spec JSON file by path, or
    ``cpu-gloo@here``: the spec calibrated on this machine (``krakenlm roofline --calibrate``, the demo),
    used only where a caller names it, so a name means the same spec on every machine and in every order."""
    path = Path(name_or_path)
    if str(name_or_path) == CALIBRATED:
        calibrated = machine_spec()
        if calibrated is None:
            raise ConfigError(f"hardware: {CALIBRATED} is the spec calibrated on this machine, and there is none "
                              f"yet: run `krakenlm roofline --preset gpt2-124m --tp 2 --calibrate` (or the demo)")
        return Hardware.from_dict(calibrated)
    if path.suffix != ".json":
        path = SPEC_DIR / f"{name_or_path}.json"
        if not path.exists():
            raise ConfigError(f"hardware: unknown hardware {str(name_or_path)!r}; "
                              f"available: {', '.join(hardware_names())} or a path to a JSON spec")
    data = read_json(path, "hardware spec", max_bytes=1 << 20, constants=True)  # from_dict names a non-finite field
    if not isinstance(data, dict):
        raise ConfigError(f"hardware: {path} must hold a JSON object")
    return Hardware.from_dict(data)
