"""`krakenlm predict`, `plan` and `calibrate`: argument parsing and printing for the cost model.

The main CLI (krakenlm/cli.py) calls the ``add_*_parser`` functions; handlers return an exit code
and raise ConfigError for bad input (the main CLI prints it as one line).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from krakenlm.config import ModelConfig
from krakenlm.costmodel.calibrate import FIT_FIELDS, calibrate, evaluate, leave_one_out, load_records, markdown, mdape
from krakenlm.costmodel.estimator import LM_HEAD, OVERLAP, Estimate, PhaseEstimate, Workload, estimate
from krakenlm.costmodel.hardware import DTYPES, load_hardware
from krakenlm.costmodel.planner import OBJECTIVES, plan
from krakenlm.errors import ConfigError
from krakenlm.presets import get_preset


def _common(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", "--preset", dest="model", help="preset name (see `krakenlm presets`)")
    src.add_argument("--config", help="ModelConfig JSON file")
    p.add_argument("--hardware", default="a100-40gb-nvswitch",
                   help="bundled spec (tpu-v4, a100-40gb-nvswitch, h100-sxm, h200, cpu-gloo) or a JSON spec path")
    p.add_argument("--chips", type=int, default=1, help="chips (TP degree); for plan, the most chips to use")
    p.add_argument("--batch", type=int, default=1, help="sequences per batch")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--generate", type=int, default=0, help="tokens to generate per sequence")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="weight type (int8 = weight-only)")
    p.add_argument("--overlap", choices=OVERLAP, default="none",
                   help="none: max(compute, memory) + comm; full: max of all three")
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
    p.set_defaults(func=_cmd_predict)


def add_plan_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `plan`: search chips x Kraken degree x batch x layout."""
    p = subparsers.add_parser("plan", help="search layouts, TP degree, Kraken degree and batch for a target")
    _common(p)
    p.add_argument("--target-latency", type=float, help="seconds for the whole request (TTFT + decode)")
    p.add_argument("--objective", choices=OBJECTIVES, default="cost",
                   help="cost: lowest chip-seconds per token; latency: lowest total latency")
    p.add_argument("--batches", help="comma-separated batch sizes to try (default: --batch)")
    p.add_argument("--kraken-degrees", help="comma-separated Kraken degrees to try (kraken models)")
    p.add_argument("--top", type=int, default=5, help="rows of the ranking to print")
    p.set_defaults(func=_cmd_plan)


def _config(args: argparse.Namespace) -> ModelConfig:
    return get_preset(args.model) if args.model else ModelConfig.from_json(args.config)


def _workload(args: argparse.Namespace) -> Workload:
    return Workload(batch=args.batch, prompt=args.prompt, generate=args.generate, dtype=args.dtype)


def _ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated integers, got {text!r}") from None


def _phase_row(p: PhaseEstimate) -> str:
    return (f"{p.phase:<8} {p.layout:<20} {p.time_s * 1e3:>11.3f} {p.compute_s * 1e3:>10.3f} "
            f"{p.memory_s * 1e3:>10.3f} {p.exposed_comm_s * 1e3:>10.3f} {p.mfu:>6.1%} {p.bound:>8}")


def format_estimate(est: Estimate) -> str:
    """The readable breakdown table printed by `predict`."""
    wl = est.workload
    lines = [f"{est.model} on {est.chips} x {est.hardware}: batch {wl.batch}, prompt {wl.prompt}, "
             f"generate {wl.generate}, {wl.dtype} weights",
             f"{'phase':<8} {'layout':<20} {'time ms':>11} {'compute':>10} {'memory':>10} {'comm*':>10} "
             f"{'MFU':>6} {'bound':>8}",
             _phase_row(est.prefill)]
    if est.decode:
        lines.append(_phase_row(est.decode) + "   (one step)")
    lines += ["(*comm = exposed communication, not hidden under compute/memory)",
              f"TTFT {est.ttft_s * 1e3:.3f} ms | per token {est.per_token_s * 1e3:.3f} ms | "
              f"total {est.total_s * 1e3:.3f} ms | {est.chip_seconds_per_token:.3g} chip-s/token",
              f"memory per chip {est.memory_per_chip_bytes / 2**30:.2f} GiB (weights "
              f"{est.weights_per_chip_bytes / 2**30:.2f}, KV {est.kv_per_chip_bytes / 2**30:.2f}) | "
              f"max context {est.max_context} tokens"]
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


def _cmd_predict(args: argparse.Namespace) -> int:
    config, hw = _config(args), load_hardware(args.hardware)
    layout = None if args.layout == "auto" else args.layout
    if layout and "," in layout:
        pre, dec = layout.split(",", 1)
        layout = (None if pre == "auto" else pre, None if dec == "auto" else dec)
    est = estimate(config, hw, _workload(args), args.chips, layout=layout, overlap=args.overlap,
                   lm_head=args.lm_head)
    print(json.dumps(est.to_dict(), indent=2) if args.json else format_estimate(est))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    config, hw = _config(args), load_hardware(args.hardware)
    result = plan(config, hw, _workload(args), args.chips, target_latency=args.target_latency,
                  objective=args.objective, batches=_ints(args.batches, "--batches"),
                  kraken_degrees=_ints(args.kraken_degrees, "--kraken-degrees"), overlap=args.overlap)
    if args.json:
        print(json.dumps({"best": {"config": result.best.config.to_dict(), "estimate": result.best.estimate.to_dict()},
                          "ranked": [{"label": c.label, "total_s": c.estimate.total_s,
                                      "chip_seconds_per_token": c.estimate.chip_seconds_per_token}
                                     for c in result.ranked[: args.top]],
                          "rejected": result.rejected, "explanation": result.explanation}, indent=2))
        return 0
    print(result.explanation)
    print()
    print(format_estimate(result.best.estimate))
    print()
    print(f"{'rank':>4} {'total ms':>11} {'chip-s/token':>13}  candidate")
    for i, c in enumerate(result.ranked[: args.top], 1):
        print(f"{i:>4} {c.estimate.total_s * 1e3:>11.3f} {c.estimate.chip_seconds_per_token:>13.4g}  {c.label}")
    return 0


def add_calibrate_parser(subparsers: argparse._SubParsersAction) -> None:
    """`krakenlm calibrate`: fit a hardware spec's efficiency factors to `krakenlm bench` records."""
    p = subparsers.add_parser("calibrate", help="fit a hardware spec to measured benchmark records")
    p.add_argument("--hardware", default="cpu-gloo-nominal", help="preset name or JSON spec to start from")
    p.add_argument("--records", required=True, nargs="+", help="bench.json files (or record lists) to fit")
    p.add_argument("--fields", default=",".join(FIT_FIELDS), help=f"comma-separated subset of {FIT_FIELDS}")
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
