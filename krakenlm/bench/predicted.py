"""The cost model beside a `krakenlm bench` result: each paired ratio a cell measured, next to the same ratio
predicted from the same variants on a hardware spec, and held out (refitted without the cell, or its link).

Measured: the median of the cell's per-round paired ratios (one run, interleaved). Predicted: the estimator
on each variant's calibration record (``results.variant_record``: its config, the cell's link, the overlap
mode with the chunks it actually used); a no-comm ceiling is the same model with free collectives (alpha 0,
an unbounded link), what the bench's no-comm ranks measure. Ratios over a variant the estimator does not
describe (blocking Kraken or Ladder, the DTensor peer, compiled, single-device or int8 runs) are left out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from krakenlm.bench.results import records, variant_record
from krakenlm.bench.sweep import ratio_pairs
from krakenlm.costmodel.calibrate import calibrate, parse_record, predict_point
from krakenlm.costmodel.hardware import Hardware

Cell = dict[str, Any]
ARCHS = ("gpt", "parallel", "kraken", "ladder")
WITHIN = 10.0  # issue 25's target: predicted ratios within 10% of the measured ones


def link_name(cell: Cell) -> str:
    return "loopback" if cell["link_gbps"] is None else f"{cell['link_gbps']:g} Gbit/s"


def cell_name(cell: Cell) -> str:
    return f"{link_name(cell)} {cell['shape']} T={cell['prompt_len']} B={cell['batch']} {cell['dtype']}"


def predict_variant(cell: Cell, label: str, hw: Hardware, phase: str = "prefill",
                    decode_steps: int = 0) -> float | None:
    """Predicted seconds of the cell's variant ``label`` in ``phase``; None where it was not timed or the
    estimator does not describe it."""
    v = cell["variants"].get(label)
    arch, _, mode = label.partition("/")
    if v is None or arch not in ARCHS or v.get("quantize") or not (
            mode in ("", "no-comm") or v.get("overlap") or v.get("layout")):
        return None
    rec = variant_record(cell, label, phase, decode_steps)
    if rec is None:
        return None
    point = parse_record(rec)
    if mode == "no-comm":
        return predict_point(dataclasses.replace(point, link_bw=None), hw.with_factors(alpha=0.0, link_bw=1e18))
    return predict_point(point, hw)


def ratio_rows(cell: Cell, hw: Hardware, phase: str = "prefill", decode_steps: int = 0,
               overlap_only: bool = False) -> list[dict[str, Any]]:
    """One row per paired ratio the cell measured and the estimator can predict: measured median, min, max,
    predicted, error % (predicted over measured, minus 1). ``overlap_only``: the ratios with a system
    overlap variant (``gpt-chunked:4/gpt``, ``kraken/gpt-chunked:4``, ...)."""
    systems = {label: v["arch"] for label, v in cell["variants"].items() if v.get("overlap")}
    rows = []
    for name, num, den in ratio_pairs(systems):
        measured = cell["ratios"].get(phase, {}).get(name)
        if measured is None or (overlap_only and num not in systems and den not in systems):
            continue
        p_num, p_den = (predict_variant(cell, x, hw, phase, decode_steps) for x in (num, den))
        if p_num is None or p_den is None:
            continue
        predicted = p_num / p_den
        rows.append({"cell": cell_name(cell), "ratio": name, "measured": measured["median"],
                     "min": measured["min"], "max": measured["max"], "predicted": predicted,
                     "error_pct": 100 * (predicted / measured["median"] - 1)})
    return rows


def held_out_rows(result: dict[str, Any], hw: Hardware, fields: tuple[str, ...], group: Callable[[Cell], str],
                  phase: str = "prefill", overlap_only: bool = False) -> list[dict[str, Any]]:
    """``ratio_rows`` of each group of cells (``group``: cell -> its group, e.g. ``cell_name`` or
    ``link_name``) on ``hw`` with ``fields`` refitted to the records of every other group's cells (cells
    without a clean round never train); each row names its fit under ``fitted``."""
    steps = result.get("options", {}).get("decode_steps", 0)
    cells = result["cells"]
    rows = []
    for name in dict.fromkeys(group(c) for c in cells):
        train = records([c for c in cells if group(c) != name and not c.get("all_rounds_contaminated")], steps)
        fit = calibrate(hw, train, fields=fields)
        rows += [r | {"fitted": fit.factors()} for c in cells if group(c) == name
                 for r in ratio_rows(c, fit.hardware, phase, steps, overlap_only)]
    return rows


def markdown(rows: list[dict[str, Any]], held_out: list[dict[str, Any]] | None = None) -> str:
    """Rows as a markdown table, each with its held-out prediction beside it when given (same cells and
    ratios), and whether the error is within WITHIN %."""
    held = {(h["cell"], h["ratio"]): h for h in held_out or []}
    head = "| cell | ratio | measured (min-max) | predicted | error |"
    rule = "|---|---|---|---:|---:|"
    if held_out is not None:
        head, rule = head + " held out | held-out error |", rule + "---:|---:|"
    lines = [head + f" within {WITHIN:g}% |", rule + "---|"]
    for r in rows:
        line = (f"| {r['cell']} | {r['ratio']} | {r['measured']:.3f} ({r['min']:.2f}-{r['max']:.2f}) | "
                f"{r['predicted']:.3f} | {r['error_pct']:+.1f}% |")
        errors = [r["error_pct"]]
        if held_out is not None:
            h = held.get((r["cell"], r["ratio"]))
            line += f" {h['predicted']:.3f} | {h['error_pct']:+.1f}% |" if h else " - | - |"
            errors = [h["error_pct"]] if h else []
        lines.append(line + (" yes |" if errors and abs(errors[0]) <= WITHIN else " no |"))
    return "\n".join(lines)


def within(rows: list[dict[str, Any]]) -> str:
    """'k of n within 10%' for rows with ``error_pct``."""
    return f"{sum(abs(r['error_pct']) <= WITHIN for r in rows)} of {len(rows)} within {WITHIN:g}%"
