"""Ladder vs Kraken vs standard: measured paired ratios from `krakenlm bench` files beside the cost
model's prediction of the same ratio, as a markdown table (docs/benchmarks.md, ladder section).

    python benchmarks/ladder_table.py docs/results/bench-ladder-*.json [--hardware cpu-gloo]

Measured: the median of per-round paired ratios of one cell (one run, interleaved). Predicted: the
estimator on each variant's own config at the cell's link (the spec's bandwidth on loopback), LM
head replicated as the runtime computes it; a no-comm ceiling is the same estimate with free
collectives (alpha 0, unbounded link), what the bench's no-comm ranks measure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from krakenlm.bench.predicted import predict_variant
from krakenlm.costmodel.hardware import Hardware, load_hardware

RATIOS = ("ladder/gpt", "kraken/gpt", "ladder/kraken", "gpt/no-comm", "kraken/no-comm", "ladder/no-comm",
          "ladder/blocking", "kraken/blocking")
ARCHS = ("gpt", "kraken", "ladder")


def _predictions(cell: dict[str, Any], phase: str, hw: Hardware, steps: int) -> dict[str, float | None]:
    """Predicted seconds per variant label (gpt, kraken, ladder and their no-comm ceilings)."""
    out = {label: predict_variant(cell, label, hw, phase, steps) for arch in ARCHS
           for label in (arch, f"{arch}/no-comm")}
    out["ladder/blocking"], out["kraken/blocking"] = out["gpt"], None  # ladder awaited at once = gpt's schedule
    return out


def cells(path: Path, hw: Hardware) -> dict[str, dict[tuple[str, str], str]]:
    """Per link: {(phase, ratio): "measured median (min-max) / predicted"} for one bench file."""
    data = json.loads(path.read_text())
    out: dict[str, dict[tuple[str, str], str]] = {}
    for cell in data["cells"]:
        link = "loopback" if cell["link_gbps"] is None else f"{cell['link_gbps']:g} Gbit/s"
        column = out.setdefault(f"{link} {cell['dtype']}", {})
        for phase in ("prefill", "decode"):
            pred = _predictions(cell, phase, hw, data["options"]["decode_steps"])
            for name in RATIOS:
                measured = cell["ratios"][phase].get(name)
                if measured is None:
                    continue
                num, den = name.split("/", 1)
                den = name if den in ("no-comm", "blocking") else den
                p = "-" if pred.get(num) is None or pred.get(den) is None else f"{pred[num] / pred[den]:.3f}"
                column[phase, name] = (f"{measured['median']:.3f} ({measured['min']:.2f}-{measured['max']:.2f}) "
                                       f"| {p}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--hardware", default="cpu-gloo")
    args = parser.parse_args()
    hw = load_hardware(args.hardware)
    columns = {k: v for path in args.files for k, v in cells(path, hw).items()}
    print("| phase | ratio | " + " | ".join(f"{c} measured (min-max) | predicted" for c in columns) + " |")
    print("|---|---|" + "---|---|" * len(columns))
    for phase in ("prefill", "decode"):
        for name in RATIOS:
            if any((phase, name) in col for col in columns.values()):
                print(f"| {phase} | {name} | " + " | ".join(col.get((phase, name), "- | -")
                                                          for col in columns.values()) + " |")


if __name__ == "__main__":
    main()
