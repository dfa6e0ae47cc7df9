"""The serving simulator against krakenlm's own server: p50 TTFT and p50 TPOT, simulated vs measured, at
three request rates x two architectures (standard TP and Kraken, 2 ranks, 124M shapes, fp32 on CPU).

Both sides get the same load (krakenlm.serve.workload.LoadSpec: Poisson arrivals, seeded, prompt and
output lengths drawn uniformly). The simulator steps the server's scheduler with the CPU spec calibrated
from bench records (``cpu-gloo``, fitted to docs/results/bench-124m-t512.json), priced in the runtime's
own layout (Megatron 1D / Kraken, LM head whole on every rank). The host overhead the cost model leaves out
(HTTP, sampling, streaming; krakenlm.costmodel.simulate.HostOverhead) is measured first on the same
servers from bursts of requests (1 request alone, 8 at once), never from the validation loads; the table
shows the simulation with and without it.

    flock -x /tmp/krakenlm-timing.lock .venv/bin/python benchmarks/serve_sim_validation.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
from pathlib import Path

from krakenlm.bench.results import environment
from krakenlm.costmodel.estimator import Layout
from krakenlm.costmodel.hardware import load_hardware
from krakenlm.costmodel.layouts import KRAKEN_LAYOUT
from krakenlm.costmodel.simulate import CostModelTimes, HostOverhead, simulate
from krakenlm.presets import get_preset
from krakenlm.serve.loadtest import Target, run_load, run_loads
from krakenlm.serve.process import ServerProcess
from krakenlm.serve.scheduler import BatchingPolicy
from krakenlm.serve.workload import Lengths, LoadSpec

TP, MAX_BATCH, BURST = 2, 8, 8


def model_times(preset: str, hardware: str, overhead: HostOverhead | None = None) -> CostModelTimes:
    """The cost model's step times for the server's deployment: TP ranks, fp32, the runtime's layout."""
    config = get_preset(preset)
    ffn = KRAKEN_LAYOUT if config.arch == "kraken" else "1d-ws"
    return CostModelTimes(config, load_hardware(hardware), TP, dtype="fp32", lm_head="replicated",
                          layout=Layout(ffn, "heads", TP, "replicated"), overhead=overhead or HostOverhead())


def measure_overheads(targets: list[Target], times: dict[str, CostModelTimes], prompt: int, output: int,
                      reps: int = 5) -> dict[str, tuple[HostOverhead, dict]]:
    """Host overhead from bursts, the servers in turn so that drift of the shared machine hits them alike:
    after a warm-up request, a lone request ``reps`` times (median TTFT - predicted prefill, median ITL -
    predicted decode at batch 1) and BURST requests at once twice (the median ITL of a burst is a decode
    step at batch BURST; the excess over batch 1 is the per-row term)."""
    fixed = Lengths(prompt, prompt), Lengths(output, output)
    for t in targets:
        run_load(t, LoadSpec(math.inf, 1, *fixed, seed=100))
    alone = {s: [run_load(t, LoadSpec(math.inf, 1, *fixed, seed=s)) for t in targets] for s in range(reps)}
    burst = {s: {t.name: run_load(t, LoadSpec(math.inf, BURST, *fixed, seed=reps + s)) for t in targets}
             for s in range(2)}
    out, context = {}, prompt + output // 2
    for i, t in enumerate(targets):
        lone = [alone[s][i] for s in range(reps)]
        ttft1 = statistics.median(r["ttft_s"]["p50"] for r in lone)
        itl1 = statistics.median(r["itl_s"]["p50"] for r in lone)
        itl_b = statistics.median(burst[s][t.name]["itl_s"]["p50"] for s in range(2))
        model = times[t.name]
        extra1, extra_b = itl1 - model.decode([context]), itl_b - model.decode([context] * BURST)
        row = max(0.0, (extra_b - extra1) / (BURST - 1))
        overhead = HostOverhead(prefill_s=max(0.0, ttft1 - model.prefill(prompt)), step_s=max(0.0, extra1 - row),
                                row_s=row)
        out[t.name] = overhead, {"ttft_alone_s": ttft1, "itl_alone_s": itl1, f"itl_burst{BURST}_s": itl_b,
                                 "predicted_prefill_s": model.prefill(prompt),
                                 "predicted_decode1_s": model.decode([context]),
                                 f"predicted_decode{BURST}_s": model.decode([context] * BURST)}
    return out


def error(sim: float, measured: float) -> float:
    return 100.0 * (sim - measured) / measured


def cells(name: str, preset: str, specs: list[LoadSpec], measured: list[dict], hardware: str,
          overhead: HostOverhead) -> list[dict]:
    """Simulated (with and without the host overhead) vs measured p50 TTFT / TPOT for every load."""
    policy = BatchingPolicy(MAX_BATCH, MAX_BATCH * get_preset(preset).block_size)
    block = get_preset(preset).block_size
    out = []
    for spec, meas in zip(specs, measured, strict=True):
        plain = simulate(spec.generate(), policy, block, model_times(preset, hardware), spec.offered_rate).report
        full = simulate(spec.generate(), policy, block, model_times(preset, hardware, overhead),
                        spec.offered_rate).report
        for metric in ("ttft_s", "tpot_s"):
            m, s, s0 = meas[metric]["p50"], full[metric]["p50"], plain[metric]["p50"]
            out.append({"arch": name, "rate": spec.rate, "metric": f"p50 {metric[:-2].upper()}", "measured_s": m,
                        "simulated_s": s, "error_pct": error(s, m), "model_only_s": s0,
                        "model_only_error_pct": error(s0, m)})
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| model | rate req/s | metric | measured ms | simulated ms | error | cost model only ms | error |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['rate']:g} | {r['metric']} | {1e3 * r['measured_s']:.1f} | "
                     f"{1e3 * r['simulated_s']:.1f} | {r['error_pct']:+.1f}% | {1e3 * r['model_only_s']:.1f} | "
                     f"{r['model_only_error_pct']:+.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="0.25,0.5,1", help="request rates, requests/s")
    parser.add_argument("--requests", type=int, default=20, help="requests per rate")
    parser.add_argument("--prompt-len", default="64-192", help="validation prompts: N or LOW-HIGH")
    parser.add_argument("--output-len", default="16-48", help="validation outputs: N or LOW-HIGH")
    parser.add_argument("--hardware", default="cpu-gloo")
    parser.add_argument("--gpt", default="gpt2-124m")
    parser.add_argument("--kraken", default="kraken-125m-2way")
    parser.add_argument("--out", default="docs/results/serve-sim-validation.json")
    args = parser.parse_args()

    prompt, output = Lengths.parse(args.prompt_len, "--prompt-len"), Lengths.parse(args.output_len, "--output-len")
    specs = [LoadSpec(float(r), args.requests, prompt, output, seed=0) for r in args.rates.split(",")]
    presets = {"gpt": args.gpt, "kraken": args.kraken}
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(ServerProcess(["--preset", preset, "--tp", str(TP), "--device", "cpu",
                                                            "--max-batch", str(MAX_BATCH)]))
                   for name, preset in presets.items()}
        targets = [Target(name, server.url) for name, server in servers.items()]
        mid_p, mid_o = (prompt.low + prompt.high) // 2, (output.low + output.high) // 2
        fits = measure_overheads(targets, {n: model_times(p, args.hardware) for n, p in presets.items()}, mid_p, mid_o)
        reports = run_loads(targets, specs)
    rows = []
    for name, preset in presets.items():
        measured = [r for r in reports if r["server"] == name]
        rows += cells(name, preset, specs, measured, args.hardware, fits[name][0])
    median = statistics.median(abs(r["error_pct"]) for r in rows)
    median0 = statistics.median(abs(r["model_only_error_pct"]) for r in rows)
    env = environment()
    print(f"{env['cpu']}: {TP} ranks, fp32, max batch {MAX_BATCH}, {args.requests} Poisson requests per rate, "
          f"prompt {prompt}, output {output}, seed 0; spec {args.hardware}")
    for name, (overhead, seen) in fits.items():
        print(f"host overhead {name}: prefill {1e3 * overhead.prefill_s:.1f} ms, step {1e3 * overhead.step_s:.1f} ms, "
              f"row {1e3 * overhead.row_s:.2f} ms  (" + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in seen.items())
              + ")")
    print(markdown(rows))
    print(f"median |error|: {median:.1f}% with the host overhead, {median0:.1f}% cost model only ({len(rows)} cells)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "environment": env, "args": vars(args), "median_abs_error_pct": median,
        "median_abs_error_model_only_pct": median0,
        "host_overhead": {n: {"fit": vars(o), "burst": seen} for n, (o, seen) in fits.items()},
        "cells": rows, "reports": reports}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
