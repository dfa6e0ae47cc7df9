"""Merge several `krakenlm bench` runs (slices of one grid, e.g. one session's commands) into one result.

Each cell keeps its run's environment and command line; the same cell in two runs is refused. Writes
STEM.json / STEM.csv and the speedup grid (model size x prompt length) as STEM-speedup.png, and prints
the headline table.

    python benchmarks/merge_bench.py --out docs/results --stem bench-grid run1/bench.json run2/bench.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from krakenlm.bench import plots, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="bench.json files, in order")
    parser.add_argument("--out", type=Path, required=True, help="directory for the merged files")
    parser.add_argument("--stem", default="bench-merged")
    args = parser.parse_args()
    merged = results.merge([json.loads(p.read_text()) for p in args.inputs])
    paths = results.write(merged, args.out, stem=args.stem)
    paths.append(plots.speedup_grid(merged, args.out / f"{args.stem}-speedup.png"))
    print(results.table(merged))
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
