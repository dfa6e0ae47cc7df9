"""Calibration: fit a hardware spec's efficiency factors to measured benchmark points.

Record format (one JSON object per measurement; a list of them, or {"records": [...]}):

    arch        "gpt" | "parallel" | "kraken" | "ladder"  (checked against the config)
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
    lm_head     "replicated" (default: the whole LM head on every rank, as the krakenlm runtime computed it
                before it split the head; records without the field came from then) or "sharded" (split
                over the vocabulary, as Megatron, the TPU system and the krakenlm runtime now do for up to
                64 rows; the bench writes it)
    overlap     how the run overlapped standard TP's all-reduces (gpt / parallel on 1d-ws): "none"
                (default, blocking), "chunked:K" (row-parallel output in K token chunks, each chunk's
                all-reduce async under the next) or "collective-matmul" (looped all-gather /
                reduce-scatter matmuls); what `krakenlm bench` writes for such variants. Without it, a
                ``variant`` label ARCH/MODE naming one of these modes (``gpt/chunked:4``) says the same.
                Records with these modes are what ``overlap_slowdown`` and ``overlap_step_s`` are fitted to.

The fit is Levenberg-Marquardt on log(predicted) - log(measured) over the log of each fitted field,
so every point weighs by its relative error. ``matmul_eff``, ``attention_eff`` and ``memory_eff``
are fitted once per dtype when the records hold several (bf16 and fp32 kernels are different code).
Held-out error: ``leave_one_out`` refits without each point in turn; ``evaluate`` scores a fitted spec
on other records.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from krakenlm.config import ModelConfig
from krakenlm.costmodel.estimator import LM_HEAD, Layout, Workload, phase_estimate
from krakenlm.costmodel.hardware import PER_DTYPE, Hardware, compute_dtype
from krakenlm.costmodel.overlap import NO_OVERLAP, SYSTEM_MODES, Overlap, parse_overlap
from krakenlm.errors import ConfigError
from krakenlm.jsonio import read_json_or_lines
from krakenlm.layout import KRAKEN_LAYOUT
from krakenlm.presets import get_preset

FIT_FIELDS = ("matmul_eff", "attention_eff", "memory_eff", "comm_eff", "alpha", "layer_overhead_s", "link_bw")
# bound only by records of system overlap modes: chunked's (the first two) and collective-matmul's
OVERLAP_FIELDS = ("overlap_slowdown", "overlap_step_s", "ring_slowdown", "ring_step_s", "ring_hop_eff")
FITTABLE = FIT_FIELDS + OVERLAP_FIELDS
# Bounds of log(field): efficiencies cannot exceed 1 and latencies stay below a second, so a field no
# point is bound by cannot run away; link_bw (a loopback's bandwidth is not known beforehand) 1 MB/s-10 TB/s.
_LOG_BOUNDS = {"link_bw": (math.log(1e6), math.log(1e13))}
_DEFAULT_BOUNDS = (-25.0, 0.0)
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
    overlap: Overlap = NO_OVERLAP


@dataclass(frozen=True)
class Calibration:
    """The fitted spec and how well it explains the measurements it was fitted to."""

    hardware: Hardware
    fitted: dict[str, float]  # "matmul_eff" or, fitted per dtype, "matmul_eff[bf16]" -> value
    rows: list[dict[str, Any]]  # label, measured, predicted_before, predicted (after the fit), error_pct
    mdape_before: float  # median absolute percentage error, %
    mdape_after: float

    def factors(self) -> str:
        """The fitted values on one line."""
        return ", ".join(f"{k}={v:.4g}" for k, v in self.fitted.items())

    def table(self) -> str:
        """Plain-text per-point table (seconds) for the terminal, with the fitted values."""
        lines = [f"{'point':<52} {'measured':>11} {'before':>11} {'after':>11} {'err %':>7}"]
        for r in self.rows:
            lines.append(f"{r['label']:<52} {r['measured']:>11.4g} {r['predicted_before']:>11.4g} "
                         f"{r['predicted']:>11.4g} {r['error_pct']:>7.1f}")
        lines.append(f"median |error|: {self.mdape_before:.1f}% before, {self.mdape_after:.1f}% after; "
                     + self.factors())
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
    head = rec.get("lm_head", "replicated")
    if head not in LM_HEAD:
        raise ConfigError(f"calibration record: lm_head must be one of {LM_HEAD}, got {head!r}")
    tp = rec["tp"]
    default = KRAKEN_LAYOUT if config.arch == "kraken" else "1d-ws"
    ffn, _, attn = str(rec.get("layout", default)).partition("/")
    layout = Layout(ffn, attn.removeprefix("attn-") or "heads", tp, head)
    workload = Workload(batch=rec["batch"], prompt=rec["prompt_len"], generate=rec.get("generate", 0),
                        dtype=rec["dtype"])
    overlap = _record_overlap(rec)
    name = rec.get("preset") or config.name or config.arch
    label = f"{name} tp{tp} b{rec['batch']} L{rec['prompt_len']} {rec['dtype']} {rec['phase']}" + (
        f" {gbps:g}Gb/s" if gbps else "") + (f" {overlap}" if overlap.system else "")
    return Point(config, workload, rec["phase"], layout, None if gbps is None else gbps * 1e9 / 8, float(seconds),
                 label, overlap)


def _record_overlap(rec: dict[str, Any]) -> Overlap:
    """The record's ``overlap``, else the mode its bench ``variant`` label names (ARCH/MODE), else none."""
    if "overlap" in rec:
        return parse_overlap(rec["overlap"])
    mode = str(rec.get("variant", "")).rpartition("/")[2]
    return parse_overlap(mode) if mode.split(":")[0] in SYSTEM_MODES else NO_OVERLAP


def load_records(path: str | Path, clean_only: bool = False) -> list[dict[str, Any]]:
    """Records from a JSON file: a list, {"records": [...]}, or JSON lines.

    ``clean_only`` drops the records of a `krakenlm bench` file's cells flagged
    ``all_rounds_contaminated`` (no round ran without other processes' load, so the time measures
    them as much as the model).
    """
    data = read_json_or_lines(path, "records")
    records = data.get("records", [data]) if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise ConfigError(f"calibration: {path} must hold a list of records, {{\"records\": [...]}} or JSON lines, "
                          f"got {type(records).__name__}")
    if clean_only and isinstance(data, dict):
        dirty = _contaminated(data, path)
        records = [r for r in records
                   if not isinstance(r, dict) or (r.get("dtype"), r.get("phase"), r.get("seconds")) not in dirty]
    return records


def _contaminated(bench: dict[str, Any], path: str | Path) -> set[tuple[Any, str, Any]]:
    """(dtype, phase, median) of the cells of a `krakenlm bench` file that had no clean round: a record carries
    its cell's median, so that identifies the cell it came from."""
    try:
        return {(cell["dtype"], phase, v[phase]["median"]) for cell in bench.get("cells", [])
                if cell.get("all_rounds_contaminated") for v in cell["variants"].values()
                for phase in ("prefill", "decode") if phase in v}
    except (KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"calibration: {path}: malformed bench 'cells' ({type(err).__name__}: {err})") from None


def predict_point(point: Point, hw: Hardware) -> float:
    """Predicted seconds for one point (the link bandwidth overridden when the run was shaped)."""
    if point.link_bw is not None:
        hw = hw.with_factors(link_bw=point.link_bw)
    return phase_estimate(point.config, hw, point.workload, point.phase, point.layout, point.overlap).time_s


def _parameters(hw: Hardware, fields: tuple[str, ...], points: list[Point],
                per_dtype: bool) -> list[tuple[str, str | None]]:
    """(field, dtype or None) for every fitted number: a PER_DTYPE field once per measured dtype when
    ``per_dtype`` and the records hold several dtypes (or the spec already has a per-dtype mapping)."""
    dtypes = sorted({compute_dtype(p.workload.dtype) for p in points})
    out: list[tuple[str, str | None]] = []
    for f in fields:
        split = f in PER_DTYPE and (isinstance(getattr(hw, f), dict) or (per_dtype and len(dtypes) > 1))
        out += [(f, d) for d in dtypes] if split else [(f, None)]
    return out


def _with_values(hw: Hardware, params: list[tuple[str, str | None]], values: list[float]) -> Hardware:
    changes: dict[str, Any] = {}
    for (f, d), v in zip(params, values, strict=True):
        if d is None:
            changes[f] = v
        else:
            changes.setdefault(f, {k: hw.eff(f, k) for k in hw.peak_flops})[d] = v
    return hw.with_factors(**changes)


def mdape(rows: list[dict[str, Any]]) -> float:
    """Median absolute percentage error of rows with ``error_pct``."""
    return float(np.median([abs(r["error_pct"]) for r in rows]))


def markdown(rows: list[dict[str, Any]], held_out: list[dict[str, Any]] | None = None,
             held_out_label: str = "held-out") -> str:
    """Predicted vs measured per point as a markdown table (ms), with each point's held-out prediction
    (e.g. ``leave_one_out``, same order) beside it when given, and the median |error| of each column."""
    head = "| point | measured ms | predicted ms | error |"
    rule = "|---|---:|---:|---:|"
    if held_out is not None:
        head += f" {held_out_label} ms | {held_out_label} error |"
        rule += "---:|---:|"
    lines = [head, rule]
    for i, r in enumerate(rows):
        line = f"| {r['label']} | {r['measured'] * 1e3:.1f} | {r['predicted'] * 1e3:.1f} | {r['error_pct']:+.1f}% |"
        if held_out is not None:
            h = held_out[i]
            line += f" {h['predicted'] * 1e3:.1f} | {h['error_pct']:+.1f}% |"
        lines.append(line)
    summary = f"| median \\|error\\| | | | {mdape(rows):.1f}% |"
    lines.append(summary + (f" | {mdape(held_out):.1f}% |" if held_out is not None else ""))
    return "\n".join(lines)


def evaluate(hw: Hardware, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Score ``hw`` on records it was not fitted to: label, measured, predicted, error_pct per point."""
    rows = []
    for p in (parse_record(r) for r in records):
        pred = predict_point(p, hw)
        rows.append({"label": p.label, "measured": p.seconds, "predicted": pred,
                     "error_pct": 100 * (pred - p.seconds) / p.seconds})
    return rows


def _least_squares(residual: Callable[[np.ndarray], np.ndarray], theta: np.ndarray, lo: np.ndarray,
                   hi: np.ndarray, iterations: int) -> np.ndarray:
    """Levenberg-Marquardt within the box [lo, hi]: few parameters, cheap residuals, no scipy needed."""
    r = residual(theta)
    cost, lam = float(r @ r), 1e-3
    for _ in range(iterations):
        jac = np.empty((len(r), len(theta)))
        for j in range(len(theta)):
            step = np.zeros(len(theta))
            step[j] = 1e-5
            jac[:, j] = (r - residual(theta - step)) / 1e-5  # backward: theta may sit on the upper bound
        jtj = jac.T @ jac
        grad = jac.T @ r
        improved = done = False
        while lam < 1e10:
            delta = np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-12), -grad)
            cand = np.clip(theta + delta, lo, hi)
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
    return theta


# A system overlap's time is piecewise linear in overlap_slowdown (each segment is max(x, c + s x)), with
# local minima a single descent can stop in: its fit also starts from these values and keeps the best.
_SLOWDOWN_STARTS = (0.05, 0.25, 0.5, 0.9)


def _starts(theta: np.ndarray, params: list[tuple[str, str | None]]) -> list[np.ndarray]:
    """``theta`` and, when overlap_slowdown is fitted, copies of it with that field at each of _SLOWDOWN_STARTS."""
    out = [theta]
    for i, (f, _) in enumerate(params):
        if f in ("overlap_slowdown", "ring_slowdown"):
            out += [np.where(np.arange(len(theta)) == i, np.log(v), theta) for v in _SLOWDOWN_STARTS]
    return out


def calibrate(hw: Hardware, records: list[dict[str, Any]],
              fields: tuple[str, ...] = ("matmul_eff", "memory_eff", "comm_eff"), per_dtype: bool = True,
              iterations: int = 200) -> Calibration:
    """Fit ``fields`` of ``hw`` so predictions match ``records`` (least squares in log space).

    Fields absent from the data's bottlenecks (e.g. comm_eff with no communication-bound point)
    stay where they started. Returns the fitted spec, per-point predicted vs measured, and the
    median absolute percentage error before and after.
    """
    bad = [f for f in fields if f not in FITTABLE]
    if bad or not fields:
        raise ConfigError(f"calibration: fields must be a non-empty subset of {FITTABLE}, got {list(fields)}")
    points = [parse_record(r) for r in records]
    if not points:
        raise ConfigError("calibration: no records to fit")
    params = _parameters(hw, fields, points, per_dtype)
    measured = np.log([p.seconds for p in points])
    floor = {"alpha": 1e-7, "layer_overhead_s": 1e-7, "overlap_step_s": 1e-7, "ring_step_s": 1e-7}
    lo, hi = np.array([_LOG_BOUNDS.get(f, _DEFAULT_BOUNDS) for f, _ in params]).T
    start = [getattr(hw, f) if d is None else hw.eff(f, d) for f, d in params]
    theta = np.clip(np.log([max(v, floor.get(f, 1e-6)) for (f, _), v in zip(params, start, strict=True)]), lo, hi)

    def spec(th: np.ndarray) -> Hardware:
        return _with_values(hw, params, [float(v) for v in np.exp(np.clip(th, lo, hi))])

    def residual(th: np.ndarray) -> np.ndarray:
        s = spec(th)
        return np.log([predict_point(p, s) for p in points]) - measured

    theta = min((_least_squares(residual, t, lo, hi, iterations) for t in _starts(theta, params)),
                key=lambda t: float(residual(t) @ residual(t)))
    fitted_hw = spec(theta)
    before = [predict_point(p, hw) for p in points]
    after = [predict_point(p, fitted_hw) for p in points]
    rows = [{"label": p.label, "measured": p.seconds, "predicted_before": b, "predicted": a,
             "error_pct": 100 * (a - p.seconds) / p.seconds} for p, b, a in zip(points, before, after, strict=True)]
    fitted = {f if d is None else f"{f}[{d}]": (getattr(fitted_hw, f) if d is None else fitted_hw.eff(f, d))
              for f, d in params}
    return Calibration(
        hardware=fitted_hw, fitted=fitted, rows=rows,
        mdape_before=float(np.median([abs(r["predicted_before"] - r["measured"]) / r["measured"] * 100 for r in rows])),
        mdape_after=mdape(rows))


def leave_one_out(hw: Hardware, records: list[dict[str, Any]], **fit_options: Any) -> list[dict[str, Any]]:
    """Each point predicted by a spec fitted to all the others (held-out error without a second data set);
    ``fit_options`` go to ``calibrate``."""
    rows = []
    for i, rec in enumerate(records):
        fit = calibrate(hw, records[:i] + records[i + 1:], **fit_options)
        rows += evaluate(fit.hardware, [rec])
    return rows
