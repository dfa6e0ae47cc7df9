"""`krakenlm bench`: the latency sweep (TTFT and time per output token) over a grid given as options."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from krakenlm.errors import ConfigError
from krakenlm.validation import check_float, check_int, check_output_dir

QUICK = dict(shapes=["tiny"], prompts=[32], batches=[1], dtypes=["fp32"], tps=[2], links=[None], rounds=2,
             max_rounds=3, decode_steps=2, idle_wait_s=2.0, max_other_cores=100.0)


def _list(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}: {text!r}") from err
    return parse


def _links(text: str) -> list[float | None]:
    """'loopback,1,10' -> [None, 1.0, 10.0] (Gbit/s)."""
    out: list[float | None] = []
    for item in filter(None, text.split(",")):
        if item in ("loopback", "lo"):
            out.append(None)
            continue
        try:
            out.append(float(item))
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"link must be 'loopback' or Gbit/s, got {item!r}") from err
    return out


def _checkpoints(text: str) -> dict[str, str]:
    """'gpt=runs/a/latest,kraken=runs/b/latest' -> {"gpt": ..., "kraken": ...}."""
    out = {}
    for item in filter(None, text.split(",")):
        arch, sep, path = item.partition("=")
        if not sep or arch not in ("gpt", "parallel", "kraken", "ladder") or not path:
            raise argparse.ArgumentTypeError(f"expected gpt=DIR, parallel=DIR, kraken=DIR or ladder=DIR, got {item!r}")
        out[arch] = path
    return out


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="TTFT / per-token latency sweep: gpt vs parallel vs Kraken vs ladder, "
                                     "TP over gloo")
    p.add_argument("--shapes", type=_list(str), help="tiny, 124m, 1.3b, 6.7b, 13b, 65b, 175b; 'NAME:K' keeps K layers "
                   "(default 124m,1.3b:2)")
    p.add_argument("--checkpoints", type=_checkpoints, help="time trained models instead of a shape: "
                   "gpt=DIR,kraken=DIR (a Kraken N-way needs --tp N)")
    p.add_argument("--pad-heads", type=int, help="zero-pad heads to this multiple (exact; e.g. 64)")
    p.add_argument("--device", help="cpu, cuda or auto (default auto: CUDA when there is one)")
    p.add_argument("--compile", action="store_true", default=None, help="also time torch.compile'd decode steps")
    p.add_argument("--prompts", type=_list(int), help="prompt lengths (default 128,512,2048)")
    p.add_argument("--batches", type=_list(int), help="batch sizes (default 1,8)")
    p.add_argument("--dtypes", type=_list(str), help="fp32,bf16 (default both)")
    p.add_argument("--tp", dest="tps", type=_list(int), help="TP degrees = ranks (default 2; >2 is flagged: "
                   "oversubscribed on a 2-core machine)")
    p.add_argument("--links", type=_links, help="loopback and/or Gbit/s of tbf-shaped veth links "
                   "(default loopback,0.5,1,2.5,10)")
    p.add_argument("--rounds", type=int, help="clean rounds per cell (default 7)")
    p.add_argument("--max-rounds", type=int, help="give up on clean rounds after this many (default 21)")
    p.add_argument("--decode-steps", type=int, help="decode steps timed per sample (default 16; 0 = no decode)")
    p.add_argument("--no-peer", dest="peer", action="store_false", default=None, help="skip the DTensor peer")
    p.add_argument("--no-single", dest="single", action="store_false", default=None,
                   help="skip the single-device models")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false", default=None)
    p.add_argument("--no-roofline", dest="roofline", action="store_false", default=None,
                   help="skip the GEMM-throughput probe (MFU per category) at each model's shapes")
    p.add_argument("--attention", help="causal attention kernel: auto (default: measured fastest here), sdpa, "
                   "blocked[:rows]")
    p.add_argument("--max-other-cores", type=float, help="drop a round when other processes used more cores on "
                   "average (default 0.25)")
    p.add_argument("--idle-wait", dest="idle_wait_s", type=float, help="max seconds to wait for idle before a round")
    p.add_argument("--layouts", type=lambda text: [x for x in text.split(";") if x],
                   help="partitioning layouts as extra variants of gpt and parallel, separated by ';' (e.g. "
                        "'2d-ws/attn-batch;wg-xy/attn-batch,2d-ws/attn-batch'); cells whose batch the ranks do not "
                        "divide skip weight-gathered prefills")
    p.add_argument("--overlap", dest="overlaps", type=_list(str),
                   help="system overlap modes of standard TP as extra variants of gpt and parallel, e.g. "
                        "'chunked:4,collective-matmul' (labels gpt/chunked:4 ...; each with its hidden fraction)")
    p.add_argument("--int8", action="store_true", default=None, help="also time int8 weights (gpt, TP and one device)")
    p.add_argument("--quick", action="store_true", help="tiny models, 2 rounds, loopback: a smoke run for tests")
    p.add_argument("--timeout", dest="timeout_s", type=float,
                   help="seconds per cell (default 900): a rank waiting longer on another, or a launch running "
                        "longer than this per cell, fails that launch; finished cells are kept")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for bench.json/.csv and plots")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.set_defaults(func=_cmd_bench)


def _check_options(opts: Any) -> None:
    """Every option checked here, once, before any rank starts (a bad value must not fail on every rank)."""
    counts = (("--prompts", opts.prompts), ("--batches", opts.batches), ("--tp", opts.tps))
    for flag, values in (("--shapes", opts.shapes), ("--dtypes", opts.dtypes), ("--links", opts.links), *counts):
        if not values:  # an empty list made a sweep of no cells, which then failed as if ranks had hung
            raise ConfigError(f"bench: {flag}: give at least one value")
    for flag, values in counts:
        for value in values:  # TP 1 has no exchange to time (its single-device baselines run in every cell)
            check_int(value, f"bench: {flag}", minimum=2 if flag == "--tp" else 1)
    check_int(opts.rounds, "bench: --rounds")
    check_int(opts.max_rounds, "bench: --max-rounds", minimum=opts.rounds)
    check_int(opts.decode_steps, "bench: --decode-steps", minimum=0)
    check_int(opts.pad_heads, "bench: --pad-heads", optional=True)
    check_float(opts.max_other_cores, "bench: --max-other-cores", minimum=0)
    check_float(opts.idle_wait_s, "bench: --idle-wait", minimum=0)
    check_float(opts.timeout_s, "bench: --timeout", minimum=0, exclusive=True)
    for link in opts.links:
        check_float(link, "bench: --links (Gbit/s)", minimum=0, exclusive=True, optional=True)


def _cmd_bench(args: argparse.Namespace) -> int:
    from krakenlm.bench import results
    from krakenlm.bench.sweep import Options, run_sweep
    from krakenlm.dtypes import DTYPES
    from krakenlm.model.attention import check_kernel

    opts = replace(Options(), **QUICK) if args.quick else Options()
    given = {k: getattr(args, k) for k in ("shapes", "prompts", "batches", "dtypes", "tps", "links", "rounds",
                                            "max_rounds", "decode_steps", "peer", "single", "breakdown",
                                            "max_other_cores", "idle_wait_s", "checkpoints", "pad_heads", "device",
                                            "compile", "layouts", "overlaps", "int8", "roofline", "attention",
                                            "timeout_s")
             if getattr(args, k) is not None}
    if args.checkpoints:
        given["shapes"] = ["checkpoints"]
    opts = replace(opts, **given)
    bad = [d for d in opts.dtypes if d not in DTYPES and d != "auto"]
    if bad:
        raise ConfigError(f"bench: --dtypes {bad}: choose from {sorted(DTYPES)} or auto")
    _check_options(opts)
    check_kernel(opts.attention)
    check_output_dir(args.out, "bench: --out")  # before the sweep, so its results are not lost
    if any(tp > 2 for tp in opts.tps):
        print("bench: note: tp > 2 oversubscribes a 2-core machine; those cells are not timing claims",
              file=sys.stderr)
    sweep = run_sweep(opts, progress=lambda m: print(m, file=sys.stderr, flush=True), partial=True)
    result = results.build(opts, sweep, sys.argv)
    paths = results.write(result, args.out)
    if args.plots and result["cells"]:
        from krakenlm.bench import plots

        paths += plots.write_all(result, args.out)
    print(results.table(result))
    if any("ladder" in c["variants"] for c in result["cells"]):
        print(results.ladder_table(result))
    if opts.overlaps:
        print(results.overlap_table(result))
    for path in paths:
        print(f"wrote {path}")
    for failure in result["failed"]:
        print(f"bench: not every cell was measured: {failure['reason']}", file=sys.stderr)
    if result["interrupted"]:
        return 130
    return 1 if result["failed"] else 0


def add_roofline_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("roofline", help="this machine's GEMM throughput at a model's shapes: the ceiling its "
                       "prefill is held to (MFU), per dtype; --calibrate also fits this machine's "
                       "cost-model spec (cpu-gloo@here)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="named configuration (see `krakenlm presets`)")
    src.add_argument("--config", help="ModelConfig JSON file")
    p.add_argument("--tp", type=int, default=1, help="the shapes of rank 0 of this many ranks")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtypes", type=_list(str), default=["bf16", "fp32"])
    p.add_argument("--threads", type=int, default=1, help="compute threads (the benchmark runs one per rank)")
    p.add_argument("--calibrate", action="store_true", help="also probe attention, per-layer overhead and a "
                   "loopback all-reduce, and save it as this machine's `--hardware cpu-gloo@here`")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_roofline)


def _cmd_roofline(args: argparse.Namespace) -> int:
    import json

    import torch

    from krakenlm.config import ModelConfig
    from krakenlm.dtypes import parse_dtype
    from krakenlm.parallel.plan import ParallelPlan
    from krakenlm.presets import get_preset
    from krakenlm.resources import require_memory
    from krakenlm.roofline import forward_shape, probe

    config = get_preset(args.preset) if args.preset is not None else ModelConfig.from_json(args.config)
    check_int(args.threads, "threads", maximum=os.cpu_count() or 1)  # a thread per core at most: 1000 exhaust memory
    check_int(args.prompt, "prompt")
    check_int(args.batch, "batch")
    if not args.dtypes:  # nothing to measure: the report had no roofline to print (UnboundLocalError)
        raise ConfigError("dtypes: give at least one, e.g. --dtypes bf16,fp32")
    for name in args.dtypes:
        parse_dtype(name)
    # the probe holds one layer's weights in fp32 (and its shapes are read off a 1-layer model): refuse a layer
    # that cannot fit before building even that on the meta device (n_embd 1e9 overflowed its storage size)
    require_memory(4 * config.layer_params(), f"one layer of {config.name or config.arch} (the GEMM probe)")
    torch.set_num_threads(args.threads)
    shard = ParallelPlan(config, args.tp).shard(0)
    shape = forward_shape(config, shard, batch=args.batch, prompt=args.prompt)
    flops = shape.flops()
    report: dict[str, Any] = {"flops": flops, "dtypes": {}}
    roofs = {name: probe(shape, name) for name in args.dtypes}
    for name, roof in roofs.items():
        report["dtypes"][name] = roof.to_dict() | {"floor_s": sum(flops.values()) / roof.gemm_flops_per_s}
    if args.calibrate:
        from krakenlm.bench.spec import calibrate_machine

        report["spec"] = calibrate_machine(config, args.tp, args.prompt, args.batch, tuple(args.dtypes)).to_dict()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{config.name or config.arch}, rank 0 of {args.tp}, batch {args.batch} x {args.prompt} tokens, "
          f"{args.threads} thread(s), {roofs[args.dtypes[0]].processor}")
    print("FLOPs per forward: " + ", ".join(f"{k} {v / 1e9:.2f} G" for k, v in flops.items()))
    for name, r in report["dtypes"].items():
        gemms = ", ".join(f"{g} {rate / 1e9:.0f}" for g, rate in r["per_gemm"].items())
        print(f"{name}: GEMM peak at these shapes {r['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s ({gemms}); "
              f"memory {r['memory_bytes_per_s'] / 1e9:.1f} GB/s; prefill floor {r['floor_s'] * 1e3:.1f} ms")
    if args.calibrate:
        spec = report["spec"]
        print(f"calibrated spec saved as cpu-gloo@here: attention_eff {spec['attention_eff']}, link "
              f"{spec['link_bw'] / 1e9:.2f} GB/s, alpha {spec['alpha'] * 1e6:.0f} us, layer overhead "
              f"{spec['layer_overhead_s'] * 1e3:.2f} ms")
    return 0
