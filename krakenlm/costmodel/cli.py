"""`krakenlm predict`, `plan`, `simulate` and `calibrate`: argument parsing and printing for the cost model.

The main CLI (krakenlm/cli.py) calls the ``add_*_parser`` functions; handlers return an exit code
and raise a KrakenError for bad input (the main CLI prints it as one line).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

from krakenlm.batching.profile import load_profile
from krakenlm.batching.report import parse_slo_targets
from krakenlm.batching.scheduler import BatchingPolicy
from krakenlm.batching.workload import ARRIVALS, Lengths, LoadSpec
from krakenlm.config import ModelConfig
from krakenlm.costmodel.calibrate import (
    FIT_FIELDS,
    FITTABLE,
    calibrate,
    evaluate,
    leave_one_out,
    load_records,
    markdown,
    mdape,
)
from krakenlm.costmodel.estimator import (
    LM_HEAD,
    Estimate,
    PhaseEstimate,
    Workload,
    estimate,
    format_bytes,
    weights_per_chip,
)
from krakenlm.costmodel.hardware import DTYPES, Hardware, load_hardware
from krakenlm.costmodel.layout_choice import check_layout, choose
from krakenlm.costmodel.pipeline import Pipeline
from krakenlm.costmodel.planner import OBJECTIVES, plan
from krakenlm.costmodel.simulate import CostModelTimes, HostOverhead, fit_host_overhead, plan_slo, simulate
from krakenlm.errors import ConfigError
from krakenlm.layout import Layout
from krakenlm.presets import get_preset
from krakenlm.validation import check_int, check_output_file

GIB = 2 ** 30


def _source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", "--preset", dest="model", help="preset name (see `krakenlm presets`)")
    src.add_argument("--config", help="ModelConfig JSON file")
    p.add_argument("--hardware", default="a100-40gb-nvswitch",
                   help="bundled spec (tpu-v4, a100-40gb-nvswitch, a100-80gb-nvswitch, h100-sxm, h200, cpu-gloo), "
                        "cpu-gloo@here (the spec calibrated on this machine) or a JSON spec path")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="weight type (int8 = weight-only)")
    p.add_argument("--overlap", default="none",
                   help="none: max(compute, memory) + comm; full: max of all three; chunked:K (standard TP's "
                        "row-parallel output in K token chunks, each all-reduce under the next chunk) or "
                        "collective-matmul (looped all-gather / reduce-scatter matmuls): system-overlapped "
                        "standard TP, gpt/parallel on 1d-ws")


def _common(p: argparse.ArgumentParser) -> None:
    _source(p)
    p.add_argument("--chips", type=int, default=1, help="chips in all (TP x PP); for plan, the most chips to use")
    p.add_argument("--batch", default="1", help="sequences per batch, or PREFILL,DECODE (e.g. 1,32)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--generate", type=int, default=0, help="tokens to generate per sequence")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `predict`: one estimate with a per-phase breakdown."""
    p = subparsers.add_parser("predict", help="predict TTFT, decode latency, MFU and memory (analytical)")
    _common(p)
    p.add_argument("--layout", default="auto",
                   help="auto (fastest per phase), kraken, or FFN[/attn-heads|/attn-batch] with FFN one of "
                        "1d-ws, 2d-ws, wg-x, wg-xy, wg-xyz; 'PREFILL,DECODE' sets each phase")
    p.add_argument("--lm-head", choices=LM_HEAD, default="sharded",
                   help="LM head split over the vocabulary (usual TP) or whole on every chip (the krakenlm runtime)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (chips / pp chips each)")
    p.add_argument("--microbatches", default="auto",
                   help="pipeline micro-batches: auto (fastest), M, or PREFILL,DECODE (each a number or auto)")
    p.set_defaults(func=_cmd_predict)


def _arrival_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, help="requests per second (poisson / constant arrivals; inf: all at once)")
    p.add_argument("--arrivals", default="poisson",
                   help=f"{' or '.join(ARRIVALS)}, or a trace file: JSON list / lines of "
                        "{\"arrival\": s, \"prompt_len\": n, \"output_len\": n}")
    p.add_argument("--requests", type=int, default=200, help="requests to simulate (poisson / constant)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times and lengths (krakenlm loadtest's "
                                                     "--seed: the same load)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before new ones are refused")


def add_plan_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `plan`: search TP x PP x Kraken degree x batch limit x layout (or an SLO at a rate)."""
    p = subparsers.add_parser("plan", help="search TP, PP, Kraken degree, batch and layouts for a target")
    _common(p)
    p.add_argument("--target-latency", type=float, help="seconds for the whole request (TTFT + decode)")
    p.add_argument("--objective", choices=OBJECTIVES, default="cost",
                   help="cost: lowest chip-seconds per token; latency: lowest total latency; throughput: "
                        "most tokens/s over the chip budget (replicas included)")
    p.add_argument("--batches", help="comma-separated batch limits to try (default: --batch; with PREFILL,DECODE "
                                     "in --batch they set the decode batch)")
    p.add_argument("--kraken-degrees", help="comma-separated Kraken degrees to try (kraken models)")
    p.add_argument("--pp", help="comma-separated pipeline stage counts to try (default: every one that divides)")
    p.add_argument("--memory-limit", type=float, help="GiB per chip a deployment may use (default: the HBM)")
    p.add_argument("--slo", help="percentile targets, e.g. 'p99_ttft<=200ms,p50_tpot<=50ms': simulate the load "
                                 "(--rate, --arrivals) and pick the fewest chips meeting them")
    _arrival_args(p)
    p.add_argument("--top", type=int, default=5, help="rows of the ranking to print")
    p.set_defaults(func=_cmd_plan)


def add_simulate_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `simulate`: the serving simulator (scheduler + cost model step times)."""
    p = subparsers.add_parser("simulate", help="simulate serving at a request rate: TTFT / TPOT / e2e percentiles")
    _source(p)
    p.add_argument("--chips", type=int, default=1, help="chips in all (TP x PP)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--lm-head", choices=LM_HEAD, default="sharded", help="LM head split or whole on every chip")
    _arrival_args(p)
    p.add_argument("--prompt", "--prompt-len", dest="prompt", default="128",
                   help="prompt tokens: N or LOW-HIGH (uniform)")
    p.add_argument("--generate", "--output-len", dest="generate", default="64",
                   help="output tokens: N or LOW-HIGH (uniform)")
    p.add_argument("--max-batch", type=int, default=8, help="running sequences (KV-cache rows)")
    p.add_argument("--max-tokens", type=int,
                   help="KV tokens reserved by running requests (default: max-batch x the longest request)")
    p.add_argument("--max-prefills-per-step", type=int, default=0, help="newcomers per step (0 = as many as fit)")
    p.add_argument("--goodput-slo", default="{}",
                   help='per-request SLO for goodput, JSON: {"ttft_s": 0.2, "tpot_s": 0.05}')
    p.add_argument("--host-overhead", default="{}",
                   help='measured engine host time the cost model leaves out, JSON seconds: {"prefill_s": 0.07, '
                        '"step_s": 0.014, "row_s": 0.003} (per prefill, per decode step, per running row)')
    p.add_argument("--profile", help="FILE[:NAME]: fit the host overhead to a server's profile measured by "
                                     "`krakenlm loadtest --profile --out FILE` (instead of --host-overhead)")
    p.add_argument("--engine-shapes", action="store_true",
                   help="price each decode step at krakenlm's eager engine shape (rows up to the highest in use, "
                        "bucketed keys) instead of the running requests")
    p.add_argument("--out", help="also write the report JSON here")
    p.set_defaults(func=_cmd_simulate)


def _config(args: argparse.Namespace) -> ModelConfig:
    return get_preset(args.model) if args.model is not None else ModelConfig.from_json(args.config)


def _ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values:
        raise ConfigError(f"{what}: expected comma-separated integers, got {text!r}")
    return values


def _pair(text: str, what: str, auto: bool = False) -> tuple[int, int | None]:
    """``"N"`` -> (N, None); ``"A,B"`` -> (A, B); ``auto`` allowed as 0 when ``auto``."""
    parts = [v.strip() for v in str(text).split(",")]
    try:
        values = [0 if auto and v == "auto" else int(v) for v in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise ConfigError(f"{what}: expected N or PREFILL,DECODE{' (numbers or auto)' if auto else ''}, got {text!r}")
    return values[0], values[1] if len(values) == 2 else None


def _workload(args: argparse.Namespace) -> Workload:
    batch, decode_batch = _pair(args.batch, "--batch")
    return Workload(batch=batch, prompt=args.prompt, generate=args.generate, dtype=args.dtype,
                    decode_batch=decode_batch)


def _phase_row(p: PhaseEstimate) -> str:
    return (f"{p.phase:<8} {p.layout:<20} {p.time_s * 1e3:>11.3f} {p.compute_s * 1e3:>10.3f} "
            f"{p.memory_s * 1e3:>10.3f} {p.exposed_comm_s * 1e3:>10.3f} {p.hidden_comm_s * 1e3:>10.3f} {p.mfu:>6.1%} "
            f"{p.bound:>8}")


def format_estimate(est: Estimate) -> str:
    """The readable breakdown table printed by `predict`."""
    wl = est.workload
    batch = (f"batch {wl.batch}" if wl.decode_batch is None
             else f"batch {wl.batch} (prefill) / {wl.decode_batch} (decode)")
    lines = [f"{est.model} on {est.chips} x {est.hardware} (TP {est.tp} x PP {est.stages}): {batch}, prompt "
             f"{wl.prompt}, generate {wl.generate}, {wl.dtype} weights",
             f"{'phase':<8} {'layout':<20} {'time ms':>11} {'compute':>10} {'memory':>10} {'comm*':>10} "
             f"{'hidden':>10} {'MFU':>6} {'bound':>8}",
             _phase_row(est.prefill)]
    if est.decode:
        lines.append(_phase_row(est.decode) + "   (one step)")
    lines.append("(*comm = exposed communication, not hidden under compute/memory, with what overlapping itself "
                 "costs; hidden = communication that ran under them)")
    if est.stages > 1:
        lines += [f"pipeline {p.phase}: {p.microbatches} micro-batch(es), bubble {p.bubble_s * 1e3:.3f} ms, "
                  f"stage-to-stage sends {p.p2p_s * 1e3:.3f} ms per micro-batch"
                  for p in (est.prefill, est.decode) if p is not None]
    lines += [f"TTFT {est.ttft_s * 1e3:.3f} ms | per token {est.per_token_s * 1e3:.3f} ms | "
              f"total {est.total_s * 1e3:.3f} ms",
              f"whole request: MFU {est.mfu:.1%} | {est.chip_seconds_per_token:.3g} chip-s/token | "
              f"{est.requests_per_s:.3g} requests/s per deployment",
              f"memory per chip {format_bytes(est.memory_per_chip_bytes)} (weights "
              f"{format_bytes(est.weights_per_chip_bytes)}, KV prefill {format_bytes(est.kv_prefill_bytes)}, "
              f"decode {format_bytes(est.kv_decode_bytes)}) | max context {est.max_context} tokens"]
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


def _cmd_predict(args: argparse.Namespace) -> int:
    config, hw = _config(args), load_hardware(args.hardware)
    layout = None if args.layout == "auto" else args.layout
    if layout and "," in layout:
        pre, dec = layout.split(",", 1)
        layout = (None if pre == "auto" else pre, None if dec == "auto" else dec)
    pre_m, dec_m = _pair(args.microbatches, "--microbatches", auto=True)
    pipe = Pipeline(stages=args.pp, prefill_microbatches=pre_m, decode_microbatches=pre_m if dec_m is None else dec_m)
    est = estimate(config, hw, _workload(args), args.chips, layout=layout, overlap=args.overlap,
                   lm_head=args.lm_head, pipeline=pipe)
    print(json.dumps(est.to_dict(), indent=2) if args.json else format_estimate(est))
    return 0


def _load(args: argparse.Namespace, prompt: Lengths, output: Lengths) -> LoadSpec:
    """The load: a trace file, or ``--requests`` poisson/constant arrivals at ``--rate`` (krakenlm.batching.workload,
    the load generator's own)."""
    if args.arrivals in ARRIVALS and args.rate is None:
        raise ConfigError(f"rate: --rate is required with --arrivals {args.arrivals}")
    return LoadSpec(math.inf if args.rate is None else args.rate, args.requests, prompt, output, args.seed,
                    args.arrivals)


def _cmd_plan(args: argparse.Namespace) -> int:
    check_int(args.top, "top")
    config, hw = _config(args), load_hardware(args.hardware)
    memory_limit = None if args.memory_limit is None else args.memory_limit * GIB
    if args.slo is not None:
        return _plan_slo(args, config, hw, memory_limit)
    result = plan(config, hw, _workload(args), args.chips, target_latency=args.target_latency,
                  objective=args.objective, batches=_ints(args.batches, "--batches"),
                  kraken_degrees=_ints(args.kraken_degrees, "--kraken-degrees"), overlap=args.overlap,
                  stages=_ints(args.pp, "--pp"), memory_limit=memory_limit)
    if args.json:
        print(json.dumps({"best": {"config": result.best.config.to_dict(), "estimate": result.best.estimate.to_dict(),
                                   "replicas": result.best.replicas, "tokens_per_s": result.best.tokens_per_s},
                          "ranked": [{"label": c.label, "total_s": c.estimate.total_s,
                                      "chip_seconds_per_token": c.estimate.chip_seconds_per_token,
                                      "tokens_per_s": c.tokens_per_s, "replicas": c.replicas}
                                     for c in result.ranked[: args.top]],
                          "rejected": result.rejected, "explanation": result.explanation}, indent=2))
        return 0
    print(result.explanation)
    print()
    print(format_estimate(result.best.estimate))
    print()
    print(run_command(args, result.best.config, result.best.estimate))
    print()
    print(f"{'rank':>4} {'total ms':>11} {'chip-s/token':>13} {'tokens/s':>11}  candidate")
    for i, c in enumerate(result.ranked[: args.top], 1):
        print(f"{i:>4} {c.estimate.total_s * 1e3:>11.3f} {c.estimate.chip_seconds_per_token:>13.4g} "
              f"{c.tokens_per_s:>11.4g}  {c.label}")
    return 0


def run_command(args: argparse.Namespace, config: ModelConfig, est: Estimate) -> str:
    """The `krakenlm generate` line that runs a plan's choice (or why it cannot, and what runs instead)."""
    if est.stages > 1:
        return f"run it: krakenlm runs tensor parallelism only; this plan pipelines over {est.stages} stages"
    wl = est.workload
    phases = [est.prefill.layout] + ([est.decode.layout] if est.decode and est.decode.layout != est.prefill.layout
                                     else [])
    layout, note = ",".join(phases), ""
    try:
        check_layout(config, Layout.parse(layout), est.tp)
    except ConfigError as err:
        runnable = str(choose(config, est.tp, wl, load_hardware(args.hardware)))
        note = f"\n  (the planned {layout} does not run here: {err}; this runs {runnable}, the fastest that does)"
        layout = runnable
    source = f"--preset {args.model}" if args.model is not None else f"--config {args.config}"
    if config.name != _config(args).name or config != _config(args):
        note += f"\n  (the plan's model is {config.name or 'a resized variant'}: save its config and pass --config)"
    dtype = "--dtype bf16 --quantize int8" if wl.dtype == "int8" else f"--dtype {wl.dtype}"
    batch = wl.phase_batch("decode")
    return (f"run it: krakenlm generate {source} --tp {est.tp} --layout {layout} {dtype} --max-new-tokens "
            f"{wl.generate} " + " ".join(["--prompt TEXT"] * min(batch, 2)) + (f" ... ({batch} prompts)" if batch > 2
                                                                                else "") + note)


def _plan_slo(args: argparse.Namespace, config: ModelConfig, hw: Hardware, memory_limit: float | None) -> int:
    """`plan --slo`: the fewest chips whose simulated load meets the targets."""
    targets = parse_slo_targets(args.slo)
    wl = _workload(args)
    if args.arrivals in ARRIVALS and not wl.generate:
        raise ConfigError("generate: --slo plans need --generate >= 1 (output tokens per request)")
    spec = _load(args, Lengths(wl.prompt, wl.prompt), Lengths(max(wl.generate, 1), max(wl.generate, 1)))
    result = plan_slo(config, hw, spec.generate(), args.chips, targets, rate=spec.offered_rate, dtype=wl.dtype,
                      batches=_ints(args.batches, "--batches"), kraken_degrees=_ints(args.kraken_degrees,
                                                                                     "--kraken-degrees"),
                      stages=_ints(args.pp, "--pp"), overlap=args.overlap, max_queue=args.max_queue,
                      memory_limit=memory_limit)
    best = result.best
    if args.json:
        print(json.dumps({"best": {"label": best.label, "chips": best.chips, "stages": best.stages,
                                   "max_batch": best.max_batch, "config": best.config.to_dict(),
                                   "report": best.report},
                          "tried": [{"label": c.label, "met": c.met, **{str(t): t.value(c.report) for t in targets}}
                                    for c in result.tried],
                          "explanation": result.explanation}, indent=2))
        return 0
    print(result.explanation)
    print()
    print(f"{'met':>4} " + " ".join(f"{str(t):>22}" for t in targets) + "  deployment")
    for c in result.tried:
        values = " ".join(f"{'-' if t.value(c.report) is None else f'{t.value(c.report) * 1e3:.2f} ms':>22}"
                          for t in targets)
        print(f"{'yes' if c.met else 'no':>4} {values}  {c.label}")
    return 0


def _json_object(text: str, flag: str, example: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{flag}: not JSON ({err}); e.g. '{example}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag}: must be a JSON object, got {text!r}")
    return value


def _host_overhead(args: argparse.Namespace, config: ModelConfig, hw: Hardware) -> HostOverhead:
    """--host-overhead as given, or fitted to --profile's server for this model and hardware."""
    overhead = _json_object(args.host_overhead, "--host-overhead", '{"step_s": 0.01}')
    if args.profile is None:
        try:
            return HostOverhead(**overhead)
        except TypeError:
            raise ConfigError(f"--host-overhead: keys are prefill_s, step_s, row_s, got {sorted(overhead)}") from None
    if overhead:
        raise ConfigError("simulate: give --host-overhead or --profile, not both")
    profile = load_profile(args.profile)
    bare = CostModelTimes(config, hw, args.chips, args.pp, args.dtype, args.overlap, args.lm_head)
    host = fit_host_overhead(bare, profile, args.max_batch, config.block_size, args.engine_shapes)
    fitted = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in asdict(host).items())
    print(f"host overhead fitted to {args.profile}: {fitted}", file=sys.stderr)
    return host


def _cmd_simulate(args: argparse.Namespace) -> int:
    config, hw = _config(args), load_hardware(args.hardware)
    if args.out:
        check_output_file(args.out, "--out")
    prompt, output = Lengths.parse(args.prompt, "--prompt"), Lengths.parse(args.generate, "--generate")
    spec = _load(args, prompt, output)
    load = spec.generate()
    slo = _json_object(args.goodput_slo, "--goodput-slo", '{"ttft_s": 0.2}')
    host = _host_overhead(args, config, hw)
    longest = max(a.prompt_len + a.output_len for a in load)
    max_tokens = args.max_batch * longest if args.max_tokens is None else args.max_tokens  # 0 is refused, not a default
    policy = BatchingPolicy(max_batch=args.max_batch, max_tokens=max_tokens,
                            max_queue=args.max_queue, max_prefills_per_step=args.max_prefills_per_step)
    times = CostModelTimes(config, hw, args.chips, args.pp, args.dtype, args.overlap, args.lm_head, overhead=host)
    weights = weights_per_chip(config, times.tp, args.dtype, args.pp)
    if weights > hw.memory_bytes:  # predict notes it; a simulated service of a model that cannot load is refused
        raise ConfigError(f"chips: {config.name or config.arch}'s {args.dtype} weights need {format_bytes(weights)} "
                          f"per chip on {args.chips} x {hw.name}, which has {format_bytes(hw.memory_bytes)}; "
                          "add --chips or --pp, or use --dtype int8")
    sim = simulate(load, policy, config.block_size, times, rate=spec.offered_rate, slo=slo,
                   engine_shapes=args.engine_shapes)
    out = sim.report | {"simulation": {"model": config.name or config.arch, "hardware": hw.name, "chips": args.chips,
                                       "stages": args.pp, "dtype": args.dtype, "policy": asdict(policy),
                                       "host_overhead": asdict(host), "engine_shapes": args.engine_shapes,
                                       "steps": sim.steps, "mean_decode_batch": sim.mean_decode_batch,
                                       "max_waiting": sim.max_waiting}}
    text = json.dumps(out, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def add_calibrate_parser(subparsers: argparse._SubParsersAction) -> None:
    """`krakenlm calibrate`: fit a hardware spec's efficiency factors to `krakenlm bench` records."""
    p = subparsers.add_parser("calibrate", help="fit a hardware spec to measured benchmark records")
    p.add_argument("--hardware", default="cpu-gloo-nominal", help="preset name or JSON spec to start from")
    p.add_argument("--records", required=True, nargs="+", help="bench.json files (or record lists) to fit")
    p.add_argument("--fields", default=",".join(FIT_FIELDS), help=f"comma-separated subset of {FITTABLE}")
    p.add_argument("--shared-eff", action="store_true",
                   help="one matmul/attention/memory efficiency for all dtypes (default: one per dtype)")
    p.add_argument("--validate", nargs="+", default=[], help="records to score the fitted spec on (held out)")
    p.add_argument("--loo", action="store_true", help="also report leave-one-out (each point refitted without it)")
    p.add_argument("--keep-contaminated", action="store_true",
                   help="keep records of bench cells that had no clean round (dropped by default)")
    p.add_argument("--markdown", action="store_true", help="print markdown tables (ms) instead of the text table")
    p.add_argument("--save", help="write the fitted spec as JSON here (named after the file)")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    def records(paths: list[str]) -> list[dict]:
        out = [r for path in paths for r in load_records(path, clean_only=not args.keep_contaminated)]
        if paths and not out:
            raise ConfigError(f"calibration: no usable records in {', '.join(paths)} "
                              "(records of cells without a clean round are dropped unless --keep-contaminated)")
        return out

    if args.save:
        check_output_file(args.save, "--save")  # before the fit, so it is not lost
    fit_records, hw = records(args.records), load_hardware(args.hardware)
    options = {"fields": tuple(args.fields.split(",")), "per_dtype": not args.shared_eff}
    fit = calibrate(hw, fit_records, **options)
    loo = leave_one_out(hw, fit_records, **options) if args.loo else None
    held = evaluate(fit.hardware, records(args.validate)) if args.validate else None
    if args.markdown:
        print(markdown(fit.rows, loo, "leave-one-out"))
        print(f"\nFitted: {fit.factors()}")
        if held:
            print("\nHeld out (" + ", ".join(args.validate) + "):\n\n" + markdown(held))
    else:
        print(fit.table())
        if loo:
            print(f"leave-one-out median |error|: {mdape(loo):.1f}%")
        if held:
            print(f"held-out median |error| on {len(held)} records: {mdape(held):.1f}%")
    if args.save:
        note = (f" Fitted by `krakenlm calibrate` from {hw.name} on {', '.join(args.records)} ({len(fit_records)} "
                f"records): median |error| {fit.mdape_after:.1f}%"
                + (f", leave-one-out {mdape(loo):.1f}%" if loo else "")
                + (f", held out on {', '.join(args.validate)} {mdape(held):.1f}%" if held else "") + ".")
        fit.hardware.with_factors(name=Path(args.save).stem, description=hw.description + note).save(args.save)
    return 0
