"""Iteration-level batching vs one request at a time, on 2 ranks under load: throughput and p99 TTFT.

Two servers of the same model run side by side: `--max-batch 8` (newcomers join the running decode
batch at step boundaries) and `--max-batch 1` (each request runs alone, the others queue). The same
load (Poisson arrivals at each rate, and a burst: rate inf) goes to each in turn, rate by rate, so
machine drift hits both alike. Prints krakenlm loadtest's side-by-side table and the paired ratios.

    flock -x /tmp/krakenlm-timing.lock python benchmarks/serve_batching.py [--preset gpt2-124m]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from krakenlm.bench.results import environment
from krakenlm.serve.loadtest import LoadSpec, Target, run_loads, table
from krakenlm.serve.process import ServerProcess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--rates", default="2,inf", help="requests/s, comma-separated")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--out", default="docs/results/serve-batching.json")
    args = parser.parse_args()

    common = ["--preset", args.preset, "--tp", str(args.tp), "--device", "cpu"]
    specs = [LoadSpec(float(r), args.requests, args.prompt_len, args.output_len) for r in args.rates.split(",")]
    with ServerProcess([*common, "--max-batch", "8"]) as batched, ServerProcess([*common, "--max-batch", "1"]) as one:
        reports = run_loads([Target("batch 8", batched.url), Target("batch 1", one.url)], specs)
    print(f"{environment()['cpu']}: {args.preset}, tp={args.tp}, {args.requests} requests per rate, prompt "
          f"{args.prompt_len}, output {args.output_len}")
    print(table(reports))
    ratios = []
    for spec in specs:
        rate = "inf" if math.isinf(spec.rate) else spec.rate
        b8, b1 = (next(r for r in reports if r["server"] == s and r["offered_rate"] == rate)
                  for s in ("batch 8", "batch 1"))
        ratios.append({"rate": rate, "throughput_batch8_over_batch1": b8["throughput_rps"] / b1["throughput_rps"],
                       "p99_ttft_batch8_over_batch1": b8["ttft_s"]["p99"] / b1["ttft_s"]["p99"]})
        print(f"rate {rate}: throughput x{ratios[-1]['throughput_batch8_over_batch1']:.2f} with batching, "
              f"p99 TTFT x{ratios[-1]['p99_ttft_batch8_over_batch1']:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment(), "args": vars(args), "ratios": ratios,
                               "reports": reports}, indent=2))


if __name__ == "__main__":
    main()
