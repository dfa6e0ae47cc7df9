"""The long input fuzz (issues 15 and 26): seeded cases over model configs, checkpoint files, sampling, the
engine, every verb's arguments, the files verbs read (FIFOs, /dev/zero, deep nesting, huge or non-finite
values, wrong types) and HTTP request bodies (tests/fuzz.py, tests/fuzz_verbs.py). Prints per family how
many were tried, ended in a clear typed error, gave a valid result, or anything else: a traceback, no
answer within the per-case bound (--timeout, 60 s), a non-finite result, a message naming no field or
file, a file created or changed outside the case's named output path, or a 5xx or a 200 where the
server must refuse.

    python benchmarks/fuzz_inputs.py --cases 1000 [--seed 1]          # split over every family by weight
    python benchmarks/fuzz_inputs.py --config 3000 --server 200 ...     # or counts per family

Exit code 1 if any case is "anything else"; those cases are listed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz import CASE_TIMEOUT_S, run_fuzz  # noqa: E402
from tests.fuzz_verbs import ALL_FAMILIES, WEIGHTS, stop_servers  # noqa: E402


def counts_for(total: int) -> dict[str, int]:
    """`total` cases split over every family by WEIGHTS (each family at least one)."""
    weight = sum(WEIGHTS.values())
    counts = {family: max(1, int(total * WEIGHTS[family] / weight)) for family in ALL_FAMILIES}
    counts["files"] += max(0, total - sum(counts.values()))  # the rounding's remainder
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cases", type=int, default=1000, help="cases in all, split by weight (default 1000)")
    for family in ALL_FAMILIES:
        parser.add_argument(f"--{family}", type=int, help="cases of this family (overrides its --cases share)")
    parser.add_argument("--timeout", type=float, default=CASE_TIMEOUT_S, help="seconds per case before it is a hang")
    args = parser.parse_args()
    counts = counts_for(args.cases)
    given = {f: getattr(args, f.replace("-", "_")) for f in ALL_FAMILIES}
    if any(v is not None for v in given.values()):
        counts = {f: n for f, n in given.items() if n}
    warnings.simplefilter("ignore")
    out = sys.__stdout__  # CLI cases redirect sys.stdout while they run
    lines: list[str] = []

    def record(case, outcome, detail):
        if outcome == "other":
            lines.append(f"[{case.family}] {case.description[:300]} -> {detail}")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="krakenlm-fuzz-") as root:
        try:
            tally = run_fuzz(Path(root), args.seed, counts, args.timeout, record, ALL_FAMILIES)
        finally:
            stop_servers()
    seconds = time.perf_counter() - start
    header = f"{'family':<12} {'tried':>7} {'clear error':>12} {'valid':>7} {'anything else':>14}"
    print(header, file=out)
    for family, c in [*tally.items(), ("all", {k: sum(c[k] for c in tally.values()) for k in next(iter(
            tally.values()))})]:
        print(f"{family:<12} {sum(c.values()):>7} {c['clear error']:>12} {c['valid']:>7} {c['other']:>14}",
              file=out)
    print(f"(seed {args.seed}, {seconds:.0f} s, per-case bound {args.timeout:g} s)", file=out)
    print(json.dumps({"seed": args.seed, "seconds": round(seconds, 1), "tally": tally}), file=out)
    for line in lines:
        print(line, file=out)
    return 1 if lines else 0


if __name__ == "__main__":
    code = main()
    sys.__stdout__.flush()
    os._exit(code)  # a case that hung still runs in a daemon thread: do not let it abort the interpreter's exit
