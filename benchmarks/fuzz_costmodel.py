"""The long fuzz of the cost model's inputs (hardware specs; predict / plan / size / simulate arguments):
the generator of tests/test_costmodel_fuzz.py run for many more cases. Prints the counts (tried / clear
error / valid / anything else) as JSON, and the first cases of "anything else" (a traceback, an unclear
or multi-line error, a non-finite number) to fix.

    python benchmarks/fuzz_costmodel.py [--cases 3000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_costmodel_fuzz import fuzz  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=5, help="'anything else' cases to print in full")
    args = parser.parse_args()
    start = time.perf_counter()
    outcomes = fuzz(args.cases, args.seed)
    counts = {"tried": len(outcomes), "clear_error": sum(o.kind == "error" for o in outcomes),
              "valid": sum(o.kind == "valid" for o in outcomes),
              "anything_else": sum(o.kind == "other" for o in outcomes)}
    print(json.dumps(counts | {"seed": args.seed, "seconds": round(time.perf_counter() - start, 1),
                               "python": platform.python_version()}))
    for o in [o for o in outcomes if o.kind == "other"][: args.show]:
        print("\n$ krakenlm " + " ".join(o.argv) + "\n" + o.detail, file=sys.stderr)
    return 1 if counts["anything_else"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
