"""Predicted vs measured paired ratios of a `krakenlm bench` result, per cell (krakenlm/bench/predicted.py),
with a held-out column: each cell (or each link's cells) predicted by a spec refitted without it.

    python benchmarks/ratio_check.py docs/results/bench-overlap-xeon167.json --hardware SPEC.json \\
        --overlap-only --held-out cell --fields overlap_slowdown,overlap_step_s

Prints a markdown table (``--json``: the rows) and how many ratios are within 10%.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from krakenlm.bench.predicted import cell_name, held_out_rows, link_name, markdown, ratio_rows, within
from krakenlm.costmodel.calibrate import OVERLAP_FIELDS
from krakenlm.costmodel.hardware import load_hardware

GROUPS = {"cell": cell_name, "link": link_name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="bench.json of `krakenlm bench` (or a merge)")
    parser.add_argument("--hardware", default="cpu-gloo", help="preset name or JSON spec (the in-sample fit)")
    parser.add_argument("--phase", default="prefill", choices=("prefill", "decode"))
    parser.add_argument("--overlap-only", action="store_true", help="only the ratios with a system overlap variant")
    parser.add_argument("--held-out", choices=tuple(GROUPS), help="refit --fields without each cell / each link")
    parser.add_argument("--fields", default=",".join(OVERLAP_FIELDS), help="fields the held-out fits refit")
    parser.add_argument("--json", action="store_true", help="rows as JSON instead of a markdown table")
    args = parser.parse_args()
    result, hw = json.loads(args.result.read_text()), load_hardware(args.hardware)
    steps = result.get("options", {}).get("decode_steps", 0)
    rows = [r for c in result["cells"] for r in ratio_rows(c, hw, args.phase, steps, args.overlap_only)]
    held = None
    if args.held_out:
        held = held_out_rows(result, hw, tuple(args.fields.split(",")), GROUPS[args.held_out], args.phase,
                             args.overlap_only)
    if args.json:
        print(json.dumps({"rows": rows, "held_out": held}, indent=1))
        return
    print(markdown(rows, held))
    print(f"\n{hw.name} as given: {within(rows)}"
          + (f"; held out by {args.held_out} (refitting {args.fields}): {within(held)}" if held else ""))


if __name__ == "__main__":
    main()
