"""Iteration-level batching vs one request at a time, on 2 ranks under load: throughput and p99 TTFT.

Two servers of the same model run side by side: `--max-batch 8` (newcomers join the running decode
batch at step boundaries, prefilled together) and `--max-batch 1` (each request runs alone, the others
queue); `--prefill-chunk N` adds a third, `--max-batch 8` prefilling at most N prompt tokens a step.
The same load (Poisson arrivals at each rate, and a burst: rate inf) goes to each in turn, rate by
rate, so machine drift hits all alike. Prints krakenlm loadtest's side-by-side table and the paired ratios.

    flock -x /tmp/krakenlm-timing.lock python benchmarks/serve_batching.py [--preset gpt2-124m] [--prefill-chunk 64]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path

from krakenlm.batching.workload import Lengths, LoadSpec
from krakenlm.bench.results import environment
from krakenlm.serve.loadtest import Target, run_loads, table
from krakenlm.serve.process import ServerProcess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--rates", default="2,inf", help="requests/s, comma-separated")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=0, help="also serve batch 8 with this prefill chunk")
    parser.add_argument("--out", default="docs/results/serve-batching.json")
    args = parser.parse_args()

    common = ["--preset", args.preset, "--tp", str(args.tp), "--device", "cpu"]
    prompt, output = Lengths(args.prompt_len, args.prompt_len), Lengths(args.output_len, args.output_len)
    specs = [LoadSpec(float(r), args.requests, prompt, output) for r in args.rates.split(",")]
    chunked_name = f"batch 8, chunk {args.prefill_chunk}"
    servers = {"batch 8": ["--max-batch", "8"], "batch 1": ["--max-batch", "1"]}
    if args.prefill_chunk:
        servers[chunked_name] = ["--max-batch", "8", "--prefill-chunk", str(args.prefill_chunk)]
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(ServerProcess([*common, *flags])).url for name, flags in servers.items()}
        reports = run_loads([Target(name, url) for name, url in urls.items()], specs)
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
        if args.prefill_chunk:
            chunked = next(r for r in reports if r["server"] == chunked_name and r["offered_rate"] == rate)
            ratios[-1] |= {f"chunked_over_batch8_{k}_p50": chunked[f"{k}_s"]["p50"] / b8[f"{k}_s"]["p50"]
                           for k in ("ttft", "tpot")}
        print(f"rate {rate}: throughput x{ratios[-1]['throughput_batch8_over_batch1']:.2f} with batching, "
              f"p99 TTFT x{ratios[-1]['p99_ttft_batch8_over_batch1']:.2f}")
        if args.prefill_chunk:
            print(f"  chunked / whole prefill, p50: TTFT x{ratios[-1]['chunked_over_batch8_ttft_p50']:.2f}, "
                  f"TPOT x{ratios[-1]['chunked_over_batch8_tpot_p50']:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment(), "args": vars(args), "ratios": ratios,
                               "reports": reports}, indent=2))


if __name__ == "__main__":
    main()
