"""The serving simulator against krakenlm's own server: p50 TTFT and p50 TPOT, simulated vs measured, at
three request rates x two architectures (standard TP and Kraken, 2 ranks, 124M shapes, fp32 on CPU).
The rates are fractions (default 0.3, 0.5, 0.7) of the slower server's capacity measured by the profile
below: past capacity a run has no steady state and its percentiles measure how long the run lasts.

Both sides get the same load (krakenlm.batching.workload.LoadSpec: Poisson arrivals, seeded, prompt and
output lengths drawn uniformly). The simulator steps the server's scheduler with the CPU spec calibrated
from bench records (``cpu-gloo`` refitted by ``krakenlm calibrate``'s fit to a short bench run taken
first, at the servers' shapes: prefill of 128 tokens, decode at batch 1 and 8; ``--bundled-spec`` uses
the shipped fit), priced in the runtime's own layout (Megatron 1D / Kraken, LM head whole on every
rank). Four simulations per cell:

* cost model only: the running requests at their mean context, no host time;
* + host overhead (krakenlm.costmodel.simulate.HostOverhead: per prefill, per decode step, per row),
  fitted to a profile measured first on the same servers (a lone request at three prompt lengths; w
  requests at once for each decode width the engine computes, w = 1, 2, 4, 8, and a least-squares line
  through them), never to the validation loads;
* + engine shapes: each decode step priced at the shape the eager engine computes (every row up to the
  highest one in use, keys up to the bucketed longest context; krakenlm.batching.scheduler.decode_shape);
* profile: no cost model; the step times read off the profile itself (krakenlm.costmodel.simulate.
  ProfileTimes, at the engine's shapes), as profiling-based simulators such as Vidur do.

    flock -x /tmp/krakenlm-timing.lock .venv/bin/python benchmarks/serve_sim_validation.py
    .venv/bin/python benchmarks/serve_sim_validation.py --measured docs/results/serve-sim-validation.json

(``--measured`` re-simulates a saved run's measurements without starting servers.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path

from krakenlm.batching.profile import EngineProfile
from krakenlm.batching.scheduler import BatchingPolicy
from krakenlm.batching.workload import Lengths, LoadSpec
from krakenlm.bench.results import environment, records
from krakenlm.bench.sweep import Options, run_sweep
from krakenlm.costmodel.calibrate import calibrate
from krakenlm.costmodel.estimator import Layout
from krakenlm.costmodel.hardware import Hardware, load_hardware
from krakenlm.costmodel.simulate import (
    CostModelTimes,
    HostOverhead,
    ProfileTimes,
    StepTimes,
    fit_host_overhead,
    simulate,
)
from krakenlm.layout import KRAKEN_LAYOUT
from krakenlm.presets import get_preset
from krakenlm.serve.loadtest import Target, run_loads
from krakenlm.serve.process import ServerProcess
from krakenlm.serve.profiler import measure_profiles

TP, MAX_BATCH = 2, 8
VARIANTS = ("model", "overhead", "engine", "profile")  # the four simulations of the module docstring


def fresh_spec(hardware: str) -> tuple[Hardware, dict]:
    """``hardware`` calibrated (krakenlm calibrate's fit) to bench records taken now at the servers' shapes
    (124M, 2 ranks, fp32, prefill of 128 tokens, decode at batch 1 and MAX_BATCH): the machine's speed
    drifts by up to 2x between runs of the day, so a spec fitted on another run predicts another machine."""
    opts = Options(shapes=["124m"], prompts=[128], batches=[1, MAX_BATCH], dtypes=["fp32"], tps=[TP], links=[None],
                   rounds=3, max_rounds=6, decode_steps=8, peer=False, single=False, breakdown=False,
                   roofline=False, idle_wait_s=10.0)
    recs = records(run_sweep(opts, progress=lambda message: None)["cells"], opts.decode_steps)
    fit = calibrate(load_hardware(hardware), recs)
    return fit.hardware, {"records": recs, "fitted": fit.fitted, "mdape_before_pct": fit.mdape_before,
                          "mdape_after_pct": fit.mdape_after}


def model_times(preset: str, hw: Hardware, overhead: HostOverhead | None = None) -> CostModelTimes:
    """The cost model's step times for the server's deployment: TP ranks, fp32, the runtime's layout."""
    config = get_preset(preset)
    ffn = KRAKEN_LAYOUT if config.arch == "kraken" else "1d-ws"
    return CostModelTimes(config, hw, TP, dtype="fp32", lm_head="replicated",
                          layout=Layout(ffn, "heads", TP, "replicated"), overhead=overhead or HostOverhead())


def error(sim: float, measured: float) -> float:
    return 100.0 * (sim - measured) / measured


def cells(name: str, preset: str, specs: list[LoadSpec], measured: list[dict], hw: Hardware,
          seen: EngineProfile) -> tuple[list[dict], dict[str, HostOverhead]]:
    """Each variant's simulated vs the measured p50 TTFT / TPOT for every load, and the overheads used."""
    block = get_preset(preset).block_size
    policy = BatchingPolicy(MAX_BATCH, MAX_BATCH * block)
    bare = model_times(preset, hw)
    overheads = {"model": HostOverhead(), "overhead": fit_host_overhead(bare, seen, MAX_BATCH, block),
                 "engine": fit_host_overhead(bare, seen, MAX_BATCH, block, engine_shapes=True)}
    times: dict[str, StepTimes] = {v: model_times(preset, hw, o) for v, o in overheads.items()}
    times["profile"] = ProfileTimes(seen)
    out = []
    for spec, meas in zip(specs, measured, strict=True):
        reports = {v: simulate(spec.generate(), policy, block, times[v], spec.offered_rate,
                               engine_shapes=v in ("engine", "profile")).report for v in VARIANTS}
        for metric in ("ttft_s", "tpot_s"):
            m = meas[metric]["p50"]
            row = {"arch": name, "rate": spec.rate, "metric": f"p50 {metric[:-2].upper()}", "measured_s": m}
            for v in VARIANTS:
                row[f"{v}_s"], row[f"{v}_error_pct"] = reports[v][metric]["p50"], error(reports[v][metric]["p50"], m)
            out.append(row)
    return out, overheads


def markdown(rows: list[dict]) -> str:
    lines = ["| model | rate req/s | metric | measured ms | cost model only ms | error | + host overhead ms | error "
             "| + engine shapes ms | error | profile ms | error |", "|---|---:|---|---:" + "|---:" * 8 + "|"]
    for r in rows:
        sims = " | ".join(f"{1e3 * r[f'{v}_s']:.1f} | {r[f'{v}_error_pct']:+.1f}%" for v in VARIANTS)
        lines.append(f"| {r['arch']} | {r['rate']:g} | {r['metric']} | {1e3 * r['measured_s']:.1f} | {sims} |")
    medians = " | ".join(f" | {statistics.median(abs(r[f'{v}_error_pct']) for r in rows):.1f}%" for v in VARIANTS)
    lines.append(f"| median \\|error\\| | | | | {medians} |")
    return "\n".join(lines)


def rates_for(profiles: dict[str, EngineProfile], loads: list[float]) -> list[float]:
    """Request rates at these fractions of the slower server's capacity: a rate past it has no steady
    state (the queue grows for as long as the run lasts), so its percentiles measure the run's length."""
    slowest = min(seen.capacity_rps for seen in profiles.values())
    return [round(f * slowest, 3) for f in loads]


def run_servers(presets: dict[str, str], args: argparse.Namespace, prompt: Lengths,
                output: Lengths) -> tuple[dict, list[float], list]:
    """Both servers side by side: the profile, then the validation loads (servers in turn)."""
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(ServerProcess(["--preset", preset, "--tp", str(TP), "--device", "cpu",
                                                            "--dtype", "fp32",  # what the cost model prices
                                                            "--max-batch", str(MAX_BATCH)]))
                   for name, preset in presets.items()}
        targets = [Target(name, server.url) for name, server in servers.items()]
        profiles = measure_profiles(targets, prompt, output)
        rates = [float(r) for r in args.rates.split(",")] if args.rates else rates_for(profiles, args.loads)
        specs = [LoadSpec(r, args.requests, prompt, output, seed=0) for r in rates]
        return profiles, rates, run_loads(targets, specs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=lambda text: [float(x) for x in text.split(",")], default=[0.3, 0.5, 0.7],
                        help="request rates as fractions of the slower server's measured capacity")
    parser.add_argument("--rates", help="request rates, requests/s (instead of --loads)")
    parser.add_argument("--requests", type=int, default=30, help="requests per rate")
    parser.add_argument("--prompt-len", default="64-192", help="validation prompts: N or LOW-HIGH")
    parser.add_argument("--output-len", default="16-48", help="validation outputs: N or LOW-HIGH")
    parser.add_argument("--hardware", default="cpu-gloo", help="the spec, calibrated to bench records taken first")
    parser.add_argument("--bundled-spec", action="store_true", help="use --hardware as it is (no fresh bench)")
    parser.add_argument("--gpt", default="gpt2-124m")
    parser.add_argument("--kraken", default="kraken-125m-2way")
    parser.add_argument("--measured", help="re-simulate this saved run (its args and measurements); no servers")
    parser.add_argument("--out", default="docs/results/serve-sim-validation.json")
    args = parser.parse_args()

    saved = json.loads(Path(args.measured).read_text()) if args.measured else None
    if saved:
        for key in ("requests", "prompt_len", "output_len", "gpt", "kraken"):
            setattr(args, key, saved["args"][key])
    prompt, output = Lengths.parse(args.prompt_len, "--prompt-len"), Lengths.parse(args.output_len, "--output-len")
    presets = {"gpt": args.gpt, "kraken": args.kraken}
    if saved:
        hw, calibration = Hardware.from_dict(saved["spec"]), saved["calibration"]
    elif args.bundled_spec:
        hw, calibration = load_hardware(args.hardware), None
    else:
        hw, calibration = fresh_spec(args.hardware)
    profiles, rates, reports = (({n: EngineProfile.from_dict(p) for n, p in saved["profiles"].items()},
                                 saved["rates"], saved["reports"]) if saved
                                else run_servers(presets, args, prompt, output))
    specs = [LoadSpec(r, args.requests, prompt, output, seed=0) for r in rates]
    rows, overheads = [], {}
    for name, preset in presets.items():
        got, overheads[name] = cells(name, preset, specs, [r for r in reports if r["server"] == name],
                                     hw, profiles[name])
        rows += got
    medians = {v: statistics.median(abs(r[f"{v}_error_pct"]) for r in rows) for v in VARIANTS}
    env = saved["environment"] if saved else environment()
    report(env, args, rates, profiles, overheads, rows, medians)
    if calibration:
        print(f"spec {hw.name} refitted to {len(calibration['records'])} bench records taken first: median |error| "
              f"{calibration['mdape_before_pct']:.1f}% -> {calibration['mdape_after_pct']:.1f}%, "
              + ", ".join(f"{k} {v:.3g}" for k, v in calibration["fitted"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "environment": env, "args": vars(args) | {"measured": None}, "rates": rates, "spec": hw.to_dict(),
        "calibration": calibration,
        "median_abs_error_pct": medians, "profiles": {n: p.to_dict() for n, p in profiles.items()},
        "host_overhead": {n: {v: vars(o) for v, o in ov.items()} for n, ov in overheads.items()},
        "cells": rows, "reports": reports}, indent=2))
    print(f"wrote {args.out}")


def report(env: dict, args: argparse.Namespace, rates: list[float], profiles: dict, overheads: dict,
           rows: list[dict], medians: dict) -> None:
    print(f"{env['cpu']}: {TP} ranks, fp32, max batch {MAX_BATCH}, {args.requests} Poisson requests per rate "
          f"({', '.join(f'{r:g}' for r in rates)} req/s), prompt {args.prompt_len}, output {args.output_len}, "
          f"seed 0; spec {args.hardware}")
    for name, seen in profiles.items():
        print(f"{name}: capacity {seen.capacity_rps:.2f} req/s; TTFT alone "
              + ", ".join(f"{p}: {1e3 * t:.0f} ms" for p, t in zip(seen.prompts, seen.ttft_alone_s, strict=True))
              + "; ITL at widths " + ", ".join(f"{w}: {1e3 * t:.0f}"
                                               for w, t in zip(seen.widths, seen.itl_s, strict=True)) + " ms; fitted: "
              + "; ".join(f"{v} " + ", ".join(f"{k} {1e3 * x:.2f} ms" for k, x in vars(o).items())
                          for v, o in overheads[name].items() if v != "model"))
    print(markdown(rows))
    print("median |error|: " + ", ".join(f"{v} {m:.1f}%" for v, m in medians.items()) + f" ({len(rows)} cells)")


if __name__ == "__main__":
    main()
