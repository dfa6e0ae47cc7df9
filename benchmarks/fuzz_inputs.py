"""The long input fuzz (issue 15): many seeded cases per family through tests/fuzz.py, printing for each
family how many were tried, ended in a clear typed error, gave a valid result, or anything else (a
traceback, a hang past the per-case timeout, a non-finite result, a message naming no field or file).

    .venv/bin/python benchmarks/fuzz_inputs.py [--seed 1] [--config 3000] [--checkpoint 3000] [--cli 1000]

Exit code 1 if any case is "anything else"; those cases are listed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz import CASE_TIMEOUT_S, run_fuzz  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--config", type=int, default=3000)
    parser.add_argument("--checkpoint", type=int, default=3000)
    parser.add_argument("--cli", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=CASE_TIMEOUT_S, help="seconds per case before it is a hang")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    out = sys.__stdout__  # CLI cases redirect sys.stdout while they run
    others: list[str] = []

    def record(case, outcome, detail):
        if outcome == "other":
            others.append(f"[{case.family}] {case.description[:300]} -> {detail}")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="krakenlm-fuzz-") as root:
        tally = run_fuzz(Path(root), args.seed, {"config": args.config, "checkpoint": args.checkpoint,
                                                 "cli": args.cli}, args.timeout, record)
    seconds = time.perf_counter() - start
    print(f"{'family':<12} {'tried':>7} {'clear error':>12} {'valid':>7} {'anything else':>14}", file=out)
    for family, counts in tally.items():
        print(f"{family:<12} {sum(counts.values()):>7} {counts['clear error']:>12} {counts['valid']:>7} "
              f"{counts['other']:>14}", file=out)
    total = {k: sum(c[k] for c in tally.values()) for k in ("clear error", "valid", "other")}
    print(f"{'all':<12} {sum(total.values()):>7} {total['clear error']:>12} {total['valid']:>7} {total['other']:>14}"
          f"   (seed {args.seed}, {seconds:.0f} s)", file=out)
    print(json.dumps({"seed": args.seed, "seconds": round(seconds, 1), "tally": tally}), file=out)
    for line in others:
        print(line, file=out)
    return 1 if others else 0


if __name__ == "__main__":
    sys.exit(main())
