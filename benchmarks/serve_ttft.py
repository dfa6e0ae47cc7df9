"""Served TTFT at low load vs the engine's own TTFT for the same prompt: what the server adds (HTTP,
JSON, the scheduler, the engine thread, the SSE chunk) on top of the prefill.

One server (`krakenlm serve`, 2 ranks) and one in-process engine (Engine.launch, 2 ranks) hold the same
model. Rounds alternate: the engine's prefill of the prompt (Engine.generate, 1 token: its
prefill_seconds) and one streamed request to the idle server (arrival to first chunk, measured by the
client); the other side idles meanwhile. Prints the medians and the median of paired ratios.

    flock -x /tmp/krakenlm-timing.lock python benchmarks/serve_ttft.py [--preset gpt2-124m] [--tp 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from krakenlm.batching.workload import Lengths, LoadSpec
from krakenlm.bench.results import environment
from krakenlm.engine import Engine, EngineOptions
from krakenlm.serve.loadtest import Target, prompt_ids, run_load
from krakenlm.serve.process import ServerProcess
from krakenlm.source import ModelSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default="docs/results/serve-ttft.json")
    args = parser.parse_args()

    spec = LoadSpec(rate=float("inf"), requests=1, prompt=Lengths(args.prompt_len, args.prompt_len),
                    output=Lengths(1, 1), seed=0)
    prompt = prompt_ids(spec.generate(), 50257, spec.seed)[0]
    engine_s, served_s = [], []
    with ServerProcess(["--preset", args.preset, "--tp", str(args.tp), "--device", "cpu"]) as server, \
            Engine.launch(ModelSource(preset=args.preset), EngineOptions(tp=args.tp, device="cpu")) as engine:
        target = Target(args.preset, server.url)
        engine.generate([prompt], 1)  # warm-up, both sides
        run_load(target, spec)
        for _ in range(args.rounds):
            engine_s.append(engine.generate([prompt], 1).prefill_seconds)
            served_s.append(run_load(target, spec)["ttft_s"]["p50"])
    ratios = [s / e for s, e in zip(served_s, engine_s, strict=True)]
    result = {"environment": environment(), "preset": args.preset, "tp": args.tp, "prompt_len": args.prompt_len,
              "rounds": args.rounds, "engine_ttft_s": engine_s, "served_ttft_s": served_s,
              "engine_ttft_median_s": statistics.median(engine_s), "served_ttft_median_s": statistics.median(served_s),
              "served_over_engine_median": statistics.median(ratios)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{result['environment']['cpu']}: {args.preset}, tp={args.tp}, prompt {args.prompt_len} tokens, "
          f"{args.rounds} rounds")
    print(f"engine TTFT median {result['engine_ttft_median_s'] * 1e3:.1f} ms, served TTFT median "
          f"{result['served_ttft_median_s'] * 1e3:.1f} ms, served/engine (median of paired ratios) "
          f"{result['served_over_engine_median']:.3f}")


if __name__ == "__main__":
    main()
