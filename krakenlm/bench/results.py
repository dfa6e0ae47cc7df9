"""Results on disk: one JSON (environment, grid, cells, cost-model calibration records) and a CSV.

The JSON's ``records`` list is exactly the cost model's calibration format, so
``krakenlm.costmodel.calibrate.load_records`` reads a results file as it is. Only real
configurations become records (no-comm ceilings, blocking-exchange runs and the DTensor peer are
measurements of something the cost model does not describe).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from krakenlm.bench.sweep import Options
from krakenlm.costmodel.overlap import chunks_used, parse_overlap

RECORD_VARIANTS = ("gpt", "parallel", "kraken", "ladder", "gpt/single", "kraken/single")


def environment() -> dict[str, Any]:
    """Versions, CPU and commit: what a number came from."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": cpu, "cpu_count": os.cpu_count(),
            "threads_per_rank": 1, "git_commit": commit, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def records(cells: list[dict[str, Any]], decode_steps: int) -> list[dict[str, Any]]:
    """Calibration records (krakenlm.costmodel.calibrate format) for every real configuration."""
    out = []
    for cell in cells:
        for label, v in cell["variants"].items():
            quantized = v.get("quantize") == "int8"
            if label not in RECORD_VARIANTS and not v.get("layout") and not quantized and not v.get("overlap"):
                continue
            if quantized and cell["dtype"] != "bf16":
                continue  # the cost model's int8 computes in bf16
            out += [rec for phase in ("prefill", "decode")
                    if (rec := variant_record(cell, label, phase, decode_steps)) is not None]
    return out


def variant_record(cell: dict[str, Any], label: str, phase: str, decode_steps: int) -> dict[str, Any] | None:
    """The calibration record of the cell's variant ``label`` in ``phase`` (``seconds``: its median), None
    where that phase was not timed. No-comm and blocking variants get their model's record too: what
    they measure is the caller's to say."""
    v = cell["variants"][label]
    if phase not in v:
        return None
    quantized = v.get("quantize") == "int8"
    rec = {"arch": v["arch"], "tp": v["tp"], "batch": cell["batch"], "prompt_len": cell["prompt_len"],
           "dtype": "int8" if quantized else cell["dtype"], "phase": phase,
           "link_gbps": None if v["tp"] == 1 else cell["link_gbps"], "seconds": v[phase]["median"]}
    if v.get("lm_head") == "sharded":  # the ranks split the head's vocabulary (older results: replicated)
        rec["lm_head"] = "sharded"
    if v.get("layout"):
        parts = v["layout"].split(",")
        rec["layout"] = parts[0] if phase == "prefill" else parts[-1]
    if label not in RECORD_VARIANTS:
        rec["variant"] = label
    if v.get("overlap"):
        tokens = cell["batch"] * (cell["prompt_len"] if phase == "prefill" else 1)
        rec["overlap"] = record_overlap(v["overlap"], tokens)
    rec |= {"preset": v["preset"]} if v["preset"] else {"config": v["config"]}
    if phase == "decode":
        rec["generate"] = decode_steps  # context: prompt_len + steps/2 on average
    return rec


def record_overlap(mode: str, tokens: int) -> str:
    """The mode a forward of ``tokens`` tokens ran: chunked:K with the chunks actually used (the runtime never
    makes more chunks than tokens), as the cost model prices it."""
    overlap = parse_overlap(mode)
    return f"chunked:{chunks_used(overlap, tokens)}" if overlap.mode == "chunked" else str(overlap)


def summary(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Contamination over the whole run: how many rounds were dropped and other processes' CPU time."""
    rounds = [c["rounds"] for c in cells]
    return {"rounds_kept": sum(r["kept"] for r in rounds), "rounds_dropped": sum(r["dropped"] for r in rounds),
            "other_cpu_s": sum(sum(r["other_cpu_s"]) for r in rounds),
            "round_wall_s": sum(sum(r["wall_s"]) for r in rounds),
            "cells_all_rounds_contaminated": sum(bool(c.get("all_rounds_contaminated")) for c in cells)}


def build(opts: Options, sweep: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    return {"environment": environment(), "argv": argv, "options": asdict(opts), "skipped": sweep["skipped"],
            "failed": sweep["failed"], "interrupted": sweep["interrupted"],
            "contamination": summary(sweep["cells"]), "cells": sweep["cells"],
            "records": records(sweep["cells"], opts.decode_steps)}


def _cell_key(cell: dict[str, Any]) -> tuple[Any, ...]:
    return cell["link_gbps"], cell["tp"], cell["shape"], cell["prompt_len"], cell["batch"], cell["dtype"]


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several bench runs (e.g. one session's commands, each a slice of the grid): every
    cell keeps its own run's environment (CPU, versions, commit) and command line under ``run``; the
    records are rebuilt per run. The same cell measured twice is refused: pick one before merging."""
    runs, cells, recs = [], [], []
    for i, part in enumerate(parts):
        runs.append({k: part[k] for k in ("environment", "argv", "options", "skipped", "contamination")})
        mine = [c | {"run": i, "environment": part["environment"], "argv": part["argv"]} for c in part["cells"]]
        cells += mine
        recs += records(mine, part["options"]["decode_steps"])
    keys = [_cell_key(c) for c in cells]
    dupes = sorted({k for k in keys if keys.count(k) > 1}, key=str)
    if dupes:
        raise ValueError(f"merge: cells measured in more than one run: {dupes}")
    cpus = sorted({r["environment"]["cpu"] for r in runs})
    return {"environment": {"merged_runs": len(runs), "cpu": cpus[0] if len(cpus) == 1 else cpus},
            "runs": runs, "contamination": summary(cells), "cells": cells, "records": recs}


def write(result: dict[str, Any], out_dir: Path, stem: str = "bench") -> list[Path]:
    """bench.json (everything) and bench.csv (one row per cell, variant and phase)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    json_path.write_text(json.dumps(result, indent=1))
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["link_gbps", "tp", "shape", "prompt_len", "batch", "dtype", "variant", "phase", "median_s",
                    "min_s", "max_s", "rounds", "per_layer_s", "full_depth_estimate_s"])
        for c in result["cells"]:
            for label, v in c["variants"].items():
                for phase in ("prefill", "decode"):
                    if phase in v:
                        s = v[phase]
                        w.writerow([c["link_gbps"] or "loopback", c["tp"], c["shape"], c["prompt_len"], c["batch"],
                                    c["dtype"], label, phase, s["median"], s["min"], s["max"], s["n"],
                                    v[f"{phase}_per_layer_s"], v[f"{phase}_full_depth_estimate_s"]])
    return [json_path, csv_path]


def ratio(cell: dict[str, Any], name: str, phase: str = "prefill") -> float | None:
    """A cell's median paired ratio ``name`` (e.g. "kraken/gpt") in ``phase``, if measured."""
    r = cell["ratios"].get(phase, {}).get(name)
    return r["median"] if r else None


def mfu(cell: dict[str, Any], arch: str) -> float | None:
    """The no-comm prefill's MFU of ``arch`` against the GEMM peak measured at its shapes, if probed."""
    return cell.get("roofline", {}).get(arch, {}).get("mfu")


def per_flop(cell: dict[str, Any]) -> float | None:
    """Kraken's no-comm time over standard's, divided by their FLOP ratio (1.0: equally efficient compute)."""
    r, flops = ratio(cell, "kraken-nc/gpt-nc"), cell.get("flop_ratio", {}).get("kraken/gpt")
    return r / flops if r and flops else None


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _where(c: dict[str, Any]) -> list[str]:
    return [f"{c['link_gbps']:g} Gb/s" if c["link_gbps"] else "loopback", c["shape"], str(c["prompt_len"]),
            str(c["batch"]), c["dtype"], f"{c['tp']}{' (oversubscribed)' if c.get('oversubscribed') else ''}"]


def _share(stats: dict[str, Any] | None) -> str:
    return f"{stats['median']:.0%}" if stats else "-"


def table(result: dict[str, Any]) -> str:
    """Headline paired ratios per cell (medians over clean rounds) and each prefill's MFU against the GEMM
    throughput measured at its own shapes, as a Markdown table."""
    cols = ["kraken/gpt", "kraken/parallel", "kraken/no-comm", "gpt/dtensor", "kraken-single/gpt-single"]
    head = (["link", "shape", "T", "B", "dtype", "tp"] + [f"TTFT {c}" for c in cols]
            + ["no-comm kraken/gpt per FLOP", "MFU gpt / kraken (no-comm)", "hidden", "decode kraken/gpt",
               "rounds kept/dropped"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in result["cells"]:
        row = _where(c) + [_fmt(ratio(c, k)) for k in cols]
        row += [_fmt(per_flop(c)), f"{_fmt(mfu(c, 'gpt'), '.0%')} / {_fmt(mfu(c, 'kraken'), '.0%')}"]
        row += [_share(c["hidden_fraction"]["in_place"]), _fmt(ratio(c, "kraken/gpt", "decode")),
                f"{c['rounds']['kept']}/{c['rounds']['dropped']}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def ladder_table(result: dict[str, Any]) -> str:
    """Ladder Residual beside Kraken and the standard model: paired TTFT and decode ratios, each
    overlapping design against its no-comm ceiling, and the share of the blocking variant's exposed
    AllReduce time that overlapping hid (in place, from the paired rounds)."""
    cols = ["ladder/gpt", "kraken/gpt", "ladder/kraken", "gpt/no-comm", "kraken/no-comm", "ladder/no-comm",
            "ladder/blocking"]
    head = ["link", "shape", "T", "B", "dtype", "tp"] + [f"TTFT {c}" for c in cols] + [
        "hidden kraken", "hidden ladder", "decode ladder/gpt", "decode ladder/kraken"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in result["cells"]:
        if "ladder" not in c["variants"]:
            continue
        hidden = c["hidden_fraction"]
        row = _where(c) + [_fmt(ratio(c, k)) for k in cols]
        row += [_share(hidden["in_place"]), _share(hidden.get("ladder", {}).get("in_place")),
                _fmt(ratio(c, "ladder/gpt", "decode")), _fmt(ratio(c, "ladder/kraken", "decode"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def overlap_table(result: dict[str, Any]) -> str:
    """Standard TP overlapped by the runtime, per cell and mode: paired TTFT against the blocking model and
    against Kraken, and the share of the blocking model's exposed AllReduce time the mode hid (in place,
    from the paired rounds; and the timeline's share of the overlapped transfers' time)."""
    head = ["link", "shape", "T", "B", "dtype", "tp", "variant", "TTFT vs blocking", "TTFT kraken/variant",
            "hidden in place", "hidden timeline", "decode vs blocking"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in result["cells"]:
        for label, v in c["variants"].items():
            if not v.get("overlap"):
                continue
            arch, mode = v["arch"], v["overlap"]
            hidden = c["hidden_fraction"].get(label, {})
            timeline = hidden.get("timeline")
            row = _where(c) + [label, _fmt(ratio(c, f"{arch}-{mode}/{arch}")), _fmt(ratio(c, f"kraken/{arch}-{mode}")),
                               _share(hidden.get("in_place")), "-" if timeline is None else f"{timeline:.0%}",
                               _fmt(ratio(c, f"{arch}-{mode}/{arch}", "decode"))]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
