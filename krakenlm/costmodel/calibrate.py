"""Calibration: fit a hardware spec's efficiency factors to measured benchmark points.

Record format (one JSON object per measurement; a list of them, or {"records": [...]}):

    arch        "gpt" | "parallel" | "kraken"  (checked against the config)
    preset      name from krakenlm.presets, or
    config      a ModelConfig dict (one of the two is required)
    tp          number of ranks (chips)
    batch       sequences
    prompt_len  prompt tokens (decode: the context before the measured steps)
    dtype       "bf16" | "fp16" | "fp32" | "int8"
    phase       "prefill" (seconds = the whole prefill forward, i.e. TTFT without sampling) or
                "decode" (seconds = mean seconds of one decode step)
    link_gbps   link bandwidth in Gbit/s the run was shaped to, or null for the spec's own (loopback)
    seconds     measured wall-clock seconds
  optional:
    generate    decode steps the mean was taken over (context = prompt_len + generate/2); default 0
    layout      e.g. "1d-ws" or "2d-ws/attn-batch"; default "kraken" for Kraken models, else "1d-ws"
                (Megatron tensor parallelism, what the krakenlm runtime does)

The fit is Levenberg-Marquardt on log(predicted) - log(measured) over the log of each fitted field,
so every point weighs by its relative error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from krakenlm.config import ModelConfig
from krakenlm.costmodel.estimator import Layout, Workload, phase_estimate
from krakenlm.costmodel.hardware import Hardware
from krakenlm.costmodel.layouts import KRAKEN_LAYOUT
from krakenlm.errors import ConfigError
from krakenlm.presets import get_preset

FIT_FIELDS = ("matmul_eff", "memory_eff", "comm_eff", "alpha", "layer_overhead_s")
REQUIRED = ("arch", "tp", "batch", "prompt_len", "dtype", "phase", "link_gbps", "seconds")


@dataclass(frozen=True)
class Point:
    """A parsed benchmark record: everything the estimator needs, plus the measurement."""

    config: ModelConfig
    workload: Workload
    phase: str
    layout: Layout
    link_bw: float | None  # bytes/s, None = spec's
    seconds: float
    label: str


@dataclass(frozen=True)
class Calibration:
    """The fitted spec and how well it explains the measurements."""

    hardware: Hardware
    fitted: dict[str, float]
    rows: list[dict[str, Any]]  # label, measured, predicted_before, predicted_after, error_pct
    mdape_before: float  # median absolute percentage error, %
    mdape_after: float

    def table(self) -> str:
        lines = [f"{'point':<48} {'measured':>11} {'before':>11} {'after':>11} {'err %':>7}"]
        for r in self.rows:
            lines.append(f"{r['label']:<48} {r['measured']:>11.4g} {r['predicted_before']:>11.4g} "
                         f"{r['predicted_after']:>11.4g} {r['error_pct']:>7.1f}")
        lines.append(f"median |error|: {self.mdape_before:.1f}% before, {self.mdape_after:.1f}% after; "
                     + ", ".join(f"{k}={v:.4g}" for k, v in self.fitted.items()))
        return "\n".join(lines)


def parse_record(rec: dict[str, Any]) -> Point:
    """Validate one record (format in the module docstring) into a Point."""
    if not isinstance(rec, dict):
        raise ConfigError(f"calibration record must be a JSON object, got {type(rec).__name__}")
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise ConfigError(f"calibration record: missing key(s) {missing} in {rec}")
    if "preset" in rec:
        config = get_preset(rec["preset"])
    elif "config" in rec:
        config = ModelConfig.from_dict(rec["config"])
    else:
        raise ConfigError(f"calibration record: needs 'preset' or 'config': {rec}")
    if config.arch != rec["arch"]:
        raise ConfigError(f"calibration record: arch {rec['arch']!r} does not match the config's {config.arch!r}")
    if rec["phase"] not in ("prefill", "decode"):
        raise ConfigError(f"calibration record: phase must be 'prefill' or 'decode', got {rec['phase']!r}")
    seconds = rec["seconds"]
    if not isinstance(seconds, (int, float)) or seconds <= 0:
        raise ConfigError(f"calibration record: seconds must be positive, got {seconds!r}")
    gbps = rec["link_gbps"]
    if gbps is not None and (not isinstance(gbps, (int, float)) or gbps <= 0):
        raise ConfigError(f"calibration record: link_gbps must be positive or null, got {gbps!r}")
    tp = rec["tp"]
    default = KRAKEN_LAYOUT if config.arch == "kraken" else "1d-ws"
    ffn, _, attn = str(rec.get("layout", default)).partition("/")
    layout = Layout(ffn, attn.removeprefix("attn-") or "heads", tp)
    workload = Workload(batch=rec["batch"], prompt=rec["prompt_len"], generate=rec.get("generate", 0),
                        dtype=rec["dtype"])
    name = rec.get("preset") or config.name or config.arch
    label = f"{name} tp{tp} b{rec['batch']} L{rec['prompt_len']} {rec['phase']}" + (
        f" {gbps:g}Gb/s" if gbps else "")
    return Point(config, workload, rec["phase"], layout, None if gbps is None else gbps * 1e9 / 8, float(seconds),
                 label)


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Records from a JSON file: a list, {"records": [...]}, or JSON lines."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"calibration: cannot read records {path}: {err.strerror}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ConfigError(f"calibration: {path} is neither JSON nor JSON lines: {err}") from err
    if isinstance(data, dict):
        data = data.get("records", [data])
    return data


def predict_point(point: Point, hw: Hardware) -> float:
    """Predicted seconds for one point (the link bandwidth overridden when the run was shaped)."""
    if point.link_bw is not None:
        hw = hw.with_factors(link_bw=point.link_bw)
    return phase_estimate(point.config, hw, point.workload, point.phase, point.layout).time_s


def calibrate(hw: Hardware, records: list[dict[str, Any]],
              fields: tuple[str, ...] = ("matmul_eff", "memory_eff", "comm_eff"),
              iterations: int = 200) -> Calibration:
    """Fit ``fields`` of ``hw`` so predictions match ``records`` (least squares in log space).

    Fields absent from the data's bottlenecks (e.g. comm_eff with no communication-bound point)
    stay where they started. Returns the fitted spec, per-point predicted vs measured, and the
    median absolute percentage error before and after.
    """
    bad = [f for f in fields if f not in FIT_FIELDS]
    if bad or not fields:
        raise ConfigError(f"calibration: fields must be a non-empty subset of {FIT_FIELDS}, got {list(fields)}")
    points = [parse_record(r) for r in records]
    if not points:
        raise ConfigError("calibration: no records to fit")
    measured = np.log([p.seconds for p in points])
    floor = {"alpha": 1e-7, "layer_overhead_s": 1e-7}
    theta = np.clip(np.log([max(getattr(hw, f), floor.get(f, 1e-6)) for f in fields]), -25.0, 0.0)

    def spec(th: np.ndarray) -> Hardware:
        # Efficiencies cannot exceed 1 and latencies stay below a second: bounds keep an
        # unidentifiable field (one no point is bound by) from running away.
        return hw.with_factors(**{f: float(math.exp(min(max(v, -25.0), 0.0))) for f, v in zip(fields, th, strict=True)})

    def residual(th: np.ndarray) -> np.ndarray:
        s = spec(th)
        return np.log([predict_point(p, s) for p in points]) - measured

    r = residual(theta)
    cost, lam = float(r @ r), 1e-3
    for _ in range(iterations):
        jac = np.empty((len(points), len(fields)))
        for j in range(len(fields)):
            step = np.zeros(len(fields))
            step[j] = 1e-5
            jac[:, j] = (r - residual(theta - step)) / 1e-5  # backward: theta may sit on the upper bound
        jtj = jac.T @ jac
        grad = jac.T @ r
        improved = False
        while lam < 1e10:
            delta = np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-12), -grad)
            cand = np.clip(theta + delta, -25.0, 0.0)
            r_new = residual(cand)
            c_new = float(r_new @ r_new)
            if c_new < cost:
                theta, r, improved = cand, r_new, True
                lam = max(lam / 3, 1e-12)
                done = cost - c_new < 1e-14
                cost = c_new
                break
            lam *= 4
        if not improved or done:
            break
    fitted_hw = spec(theta)
    before = [predict_point(p, hw) for p in points]
    after = [predict_point(p, fitted_hw) for p in points]
    rows = [{"label": p.label, "measured": p.seconds, "predicted_before": b, "predicted_after": a,
             "error_pct": 100 * (a - p.seconds) / p.seconds} for p, b, a in zip(points, before, after, strict=True)]
    return Calibration(
        hardware=fitted_hw, fitted={f: getattr(fitted_hw, f) for f in fields}, rows=rows,
        mdape_before=float(np.median([abs(r["predicted_before"] - r["measured"]) / r["measured"] * 100 for r in rows])),
        mdape_after=float(np.median([abs(r["error_pct"]) for r in rows])))
