"""The serving simulator against krakenlm's own server: p50 TTFT and p50 TPOT, simulated vs measured, at
three request rates x two architectures (standard TP and Kraken, 2 ranks, 124M shapes, fp32 on CPU).

Both sides get the same load (krakenlm.serve.workload.LoadSpec: Poisson arrivals, seeded, prompt and
output lengths drawn uniformly). The simulator steps the server's scheduler with the CPU spec calibrated
from bench records (``cpu-gloo``, fitted to docs/results/bench-124m-t512.json), priced in the runtime's
own layout (Megatron 1D / Kraken, LM head whole on every rank). Three simulations per cell:

* cost model only: the running requests at their mean context, no host time;
* + host overhead (krakenlm.costmodel.simulate.HostOverhead: per prefill, per decode step, per row),
  measured first on the same servers from bursts of requests (1 request alone, 8 at once), never from
  the validation loads;
* + engine shapes: each decode step priced at the shape the eager engine computes (every row up to the
  highest one in use, keys up to the bucketed longest context; krakenlm.serve.scheduler.decode_shape).

    flock -x /tmp/krakenlm-timing.lock .venv/bin/python benchmarks/serve_sim_validation.py
    .venv/bin/python benchmarks/serve_sim_validation.py --measured docs/results/serve-sim-validation.json

(``--measured`` re-simulates a saved run's measurements without starting servers.)
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
from krakenlm.serve.scheduler import BatchingPolicy, decode_shape
from krakenlm.serve.workload import Lengths, LoadSpec

TP, MAX_BATCH, BURST = 2, 8, 8
VARIANTS = ("model", "overhead", "engine")  # the three simulations of the module docstring


def model_times(preset: str, hardware: str, overhead: HostOverhead | None = None) -> CostModelTimes:
    """The cost model's step times for the server's deployment: TP ranks, fp32, the runtime's layout."""
    config = get_preset(preset)
    ffn = KRAKEN_LAYOUT if config.arch == "kraken" else "1d-ws"
    return CostModelTimes(config, load_hardware(hardware), TP, dtype="fp32", lm_head="replicated",
                          layout=Layout(ffn, "heads", TP, "replicated"), overhead=overhead or HostOverhead())


def measure_bursts(targets: list[Target], prompt: int, output: int, reps: int = 5) -> dict[str, dict]:
    """Per server, the servers in turn so that drift of the shared machine hits them alike: after a warm-up
    request, a lone request ``reps`` times (median TTFT and ITL) and BURST requests at once twice (median ITL:
    a decode step of BURST rows)."""
    fixed = Lengths(prompt, prompt), Lengths(output, output)
    for t in targets:
        run_load(t, LoadSpec(math.inf, 1, *fixed, seed=100))
    alone = [{t.name: run_load(t, LoadSpec(math.inf, 1, *fixed, seed=s)) for t in targets} for s in range(reps)]
    burst = [{t.name: run_load(t, LoadSpec(math.inf, BURST, *fixed, seed=reps + s)) for t in targets}
             for s in range(2)]
    return {t.name: {"prompt": prompt, "output": output,
                     "ttft_alone_s": statistics.median(a[t.name]["ttft_s"]["p50"] for a in alone),
                     "itl_alone_s": statistics.median(a[t.name]["itl_s"]["p50"] for a in alone),
                     "itl_burst_s": statistics.median(b[t.name]["itl_s"]["p50"] for b in burst)} for t in targets}


def fit_overhead(times: CostModelTimes, seen: dict, engine_shapes: bool) -> HostOverhead:
    """HostOverhead from burst measurements: TTFT alone - predicted prefill; ITL alone - predicted decode of
    one row; the excess of the burst's ITL over that, per extra row (priced at the engine's shapes or not)."""
    block, context = times.config.block_size, seen["prompt"] + seen["output"] // 2

    def decode(rows: int) -> float:
        if not engine_shapes:
            return times.decode([context] * rows)
        width, keys = decode_shape(list(range(rows)), [context - 1] * rows, MAX_BATCH, block)
        return times.decode([keys] * width)

    extra1, extra_b = seen["itl_alone_s"] - decode(1), seen["itl_burst_s"] - decode(BURST)
    row = max(0.0, (extra_b - extra1) / (BURST - 1))
    return HostOverhead(prefill_s=max(0.0, seen["ttft_alone_s"] - times.prefill(seen["prompt"])),
                        step_s=max(0.0, extra1 - row), row_s=row)


def error(sim: float, measured: float) -> float:
    return 100.0 * (sim - measured) / measured


def cells(name: str, preset: str, specs: list[LoadSpec], measured: list[dict], hardware: str,
          seen: dict) -> tuple[list[dict], dict[str, HostOverhead]]:
    """Each variant's simulated vs the measured p50 TTFT / TPOT for every load, and the overheads used."""
    block = get_preset(preset).block_size
    policy = BatchingPolicy(MAX_BATCH, MAX_BATCH * block)
    bare = model_times(preset, hardware)
    overheads = {"model": HostOverhead(), "overhead": fit_overhead(bare, seen, False),
                 "engine": fit_overhead(bare, seen, True)}
    out = []
    for spec, meas in zip(specs, measured, strict=True):
        reports = {v: simulate(spec.generate(), policy, block, model_times(preset, hardware, overheads[v]),
                               spec.offered_rate, engine_shapes=v == "engine").report for v in VARIANTS}
        for metric in ("ttft_s", "tpot_s"):
            m = meas[metric]["p50"]
            row = {"arch": name, "rate": spec.rate, "metric": f"p50 {metric[:-2].upper()}", "measured_s": m}
            for v in VARIANTS:
                row[f"{v}_s"], row[f"{v}_error_pct"] = reports[v][metric]["p50"], error(reports[v][metric]["p50"], m)
            out.append(row)
    return out, overheads


def markdown(rows: list[dict]) -> str:
    lines = ["| model | rate req/s | metric | measured ms | cost model only ms | error | + host overhead ms | error "
             "| + engine shapes ms | error |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        sims = " | ".join(f"{1e3 * r[f'{v}_s']:.1f} | {r[f'{v}_error_pct']:+.1f}%" for v in VARIANTS)
        lines.append(f"| {r['arch']} | {r['rate']:g} | {r['metric']} | {1e3 * r['measured_s']:.1f} | {sims} |")
    medians = " | ".join(f" | {statistics.median(abs(r[f'{v}_error_pct']) for r in rows):.1f}%" for v in VARIANTS)
    lines.append(f"| median \\|error\\| | | | | {medians} |")
    return "\n".join(lines)


def run_servers(presets: dict[str, str], specs: list[LoadSpec], prompt: Lengths, output: Lengths) -> tuple[dict, list]:
    """Both servers side by side: the burst measurements, then the validation loads (servers in turn)."""
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(ServerProcess(["--preset", preset, "--tp", str(TP), "--device", "cpu",
                                                            "--max-batch", str(MAX_BATCH)]))
                   for name, preset in presets.items()}
        targets = [Target(name, server.url) for name, server in servers.items()]
        bursts = measure_bursts(targets, (prompt.low + prompt.high) // 2, (output.low + output.high) // 2)
        return bursts, run_loads(targets, specs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="0.25,0.5,1", help="request rates, requests/s")
    parser.add_argument("--requests", type=int, default=20, help="requests per rate")
    parser.add_argument("--prompt-len", default="64-192", help="validation prompts: N or LOW-HIGH")
    parser.add_argument("--output-len", default="16-48", help="validation outputs: N or LOW-HIGH")
    parser.add_argument("--hardware", default="cpu-gloo")
    parser.add_argument("--gpt", default="gpt2-124m")
    parser.add_argument("--kraken", default="kraken-125m-2way")
    parser.add_argument("--measured", help="re-simulate this saved run (its args and measurements); no servers")
    parser.add_argument("--out", default="docs/results/serve-sim-validation.json")
    args = parser.parse_args()

    saved = json.loads(Path(args.measured).read_text()) if args.measured else None
    if saved:
        for key in ("rates", "requests", "prompt_len", "output_len", "gpt", "kraken"):
            setattr(args, key, saved["args"][key])
    prompt, output = Lengths.parse(args.prompt_len, "--prompt-len"), Lengths.parse(args.output_len, "--output-len")
    specs = [LoadSpec(float(r), args.requests, prompt, output, seed=0) for r in args.rates.split(",")]
    presets = {"gpt": args.gpt, "kraken": args.kraken}
    bursts, reports = (saved["bursts"], saved["reports"]) if saved else run_servers(presets, specs, prompt, output)
    rows, overheads = [], {}
    for name, preset in presets.items():
        got, overheads[name] = cells(name, preset, specs, [r for r in reports if r["server"] == name],
                                     args.hardware, bursts[name])
        rows += got
    medians = {v: statistics.median(abs(r[f"{v}_error_pct"]) for r in rows) for v in VARIANTS}
    env = saved["environment"] if saved else environment()
    print(f"{env['cpu']}: {TP} ranks, fp32, max batch {MAX_BATCH}, {args.requests} Poisson requests per rate, "
          f"prompt {prompt}, output {output}, seed 0; spec {args.hardware}")
    for name, seen in bursts.items():
        print(f"{name} bursts: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in seen.items() if k.endswith("_s"))
              + "; fitted: " + "; ".join(f"{v} " + ", ".join(f"{k} {1e3 * x:.2f} ms" for k, x in vars(o).items())
                                         for v, o in overheads[name].items() if v != "model"))
    print(markdown(rows))
    print("median |error|: " + ", ".join(f"{v} {m:.1f}%" for v, m in medians.items()) + f" ({len(rows)} cells)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "environment": env, "args": vars(args) | {"measured": None}, "median_abs_error_pct": medians,
        "bursts": bursts, "host_overhead": {n: {v: vars(o) for v, o in ov.items()} for n, ov in overheads.items()},
        "cells": rows, "reports": reports}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
