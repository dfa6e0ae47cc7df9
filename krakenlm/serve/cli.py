"""`krakenlm serve` and `krakenlm loadtest`: argument parsing and printing."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from krakenlm.batching.workload import ARRIVALS, Lengths
from krakenlm.cli_args import add_engine_args, add_model_args, engine_options, model_source
from krakenlm.errors import ConfigError
from krakenlm.validation import check_output_file


def _cmd_serve(args: argparse.Namespace) -> int:
    from krakenlm.serve.server import ServeConfig, serve

    config = ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch, max_tokens=args.max_tokens,
                         max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, api_key=args.api_key,
                         max_body_bytes=args.max_body_bytes,
                         drain_timeout=args.drain_timeout, tokenizer=args.tokenizer, read_timeout=args.read_timeout,
                         model_name=args.model_name or args.checkpoint or args.preset or args.config)
    return serve(model_source(vars(args)), engine_options(vars(args)), config)


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible streaming server (iteration-level batching, any --tp)")
    add_model_args(p)
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; the chosen one is printed)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV-cache rows)")
    p.add_argument("--max-tokens", type=int, help="KV tokens reserved by running requests (default: every row full)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before new ones get 429")
    p.add_argument("--prefill-chunk", type=int, default=0, help="prompt tokens prefilled per step, so running requests "
                   "keep decoding during a long prefill (default 0: whole prompts)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds SIGTERM waits for in-flight requests; those still running then end with a 503 error")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a client has to send a request's headers, and then its body")
    p.add_argument("--tokenizer", choices=["gpt2", "bytes"], help="default: by vocabulary size")
    p.add_argument("--model-name", help="the model id clients send and /v1/models lists (default: the --preset "
                   "name, or the --checkpoint or --config path as given)")
    p.set_defaults(func=_cmd_serve)


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated requests/s or inf, got {text!r}") from None
    if not rates:
        raise argparse.ArgumentTypeError("expected at least one rate")
    return rates


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from krakenlm.batching.workload import LoadSpec
    from krakenlm.serve.loadtest import Target, parse_targets, plot, run_loads, table

    if (args.url is None) == (args.compare is None):
        raise ConfigError("loadtest: give exactly one of --url or --compare")
    try:
        slo = json.loads(args.slo)
    except json.JSONDecodeError as err:
        raise ConfigError(f"slo: not JSON ({err}); e.g. '{{\"ttft_s\": 0.5, \"tpot_s\": 0.05}}'") from None
    if not isinstance(slo, dict):
        raise ConfigError(f"slo: must be a JSON object, got {args.slo!r}")
    for path, flag in ((args.out, "out"), (args.plot, "plot")):
        if path is not None:
            check_output_file(path, flag)  # before the load, so its reports are not lost
    targets = parse_targets(args.compare, args.api_key) if args.compare else [Target("server", args.url.rstrip("/"),
                                                                                      args.api_key)]
    prompt, output = Lengths.parse(args.prompt_len, "--prompt-len"), Lengths.parse(args.output_len, "--output-len")
    if args.profile:
        return _profile(targets, prompt, output, args.profile_reps, args.out)
    rates = args.rate[:1] if args.arrivals not in ARRIVALS else args.rate  # a trace has its own times
    specs = [LoadSpec(rate, args.requests, prompt, output, args.seed, args.arrivals) for rate in rates]
    reports = run_loads(targets, specs, slo, args.timeout)
    print(table(reports))
    for r in reports:
        if r["errors"]:
            print(f"[{r['server']} @ {r['offered_rate']}] errors: {r['errors']}", file=sys.stderr)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"reports": reports}, indent=2))
        print(f"wrote {out}", file=sys.stderr)
    if args.plot:
        print(f"wrote {plot(reports, args.plot)}", file=sys.stderr)
    return 0 if all(r["completed"] == r["requests"] for r in reports) else 1


def _profile(targets: list, prompt: Lengths, output: Lengths, reps: int, out: str | None) -> int:
    """`loadtest --profile`: each server's step-time profile (krakenlm.batching.profile), printed and saved."""
    from krakenlm.batching.profile import save_profiles
    from krakenlm.serve.profiler import measure_profiles

    profiles = measure_profiles(targets, prompt, output, reps)
    for name, p in profiles.items():
        alone = ", ".join(f"{n} tokens {t * 1e3:.1f} ms" for n, t in zip(p.prompts, p.ttft_alone_s, strict=True))
        gaps = ", ".join(f"{w}: {t * 1e3:.1f} ms" for w, t in zip(p.widths, p.itl_s, strict=True))
        print(f"{name}: TTFT alone {alone}; ITL at width {gaps}; capacity {p.capacity_rps:.3g} requests/s")
    if out:
        save_profiles(out, profiles)
        print(f"wrote {out} (krakenlm simulate --profile {out}" + (":NAME" if len(profiles) > 1 else "") + ")",
              file=sys.stderr)
    return 0


def add_loadtest_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loadtest", help="Poisson (constant, trace) load of streaming completions: TTFT / TPOT / ITL / "
                                        "e2e percentiles")
    p.add_argument("--url", help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--compare", help="NAME=URL,NAME=URL: the same load against each, side by side")
    p.add_argument("--rate", type=_rates, default=[math.inf], help="requests/s, comma-separated for several runs; "
                   "inf sends all at once (default)")
    p.add_argument("--arrivals", default="poisson", help=f"{' or '.join(ARRIVALS)}, or a trace file: JSON list / "
                   "lines of {\"arrival\": s, \"prompt_len\": n, \"output_len\": n} (then --rate is not used)")
    p.add_argument("--requests", type=int, default=64, help="requests per rate")
    p.add_argument("--prompt-len", "--prompt", dest="prompt_len", default="128",
                   help="prompt tokens: N or LOW-HIGH (uniform)")
    p.add_argument("--output-len", "--generate", dest="output_len", default="64",
                   help="output tokens: N or LOW-HIGH (uniform)")
    p.add_argument("--seed", type=int, default=0, help="arrivals, lengths and prompts (krakenlm simulate's --seed: "
                   "the same load)")
    p.add_argument("--slo", default="{}", help='per-request SLO for goodput, JSON: {"ttft_s": 0.5, "tpot_s": 0.05}')
    p.add_argument("--api-key")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--out", help="write the reports (or the profiles) as JSON here")
    p.add_argument("--plot", help="write latency percentiles vs rate as a PNG here")
    p.add_argument("--profile", action="store_true",
                   help="instead of a load, measure each server's step-time profile for `krakenlm simulate "
                        "--profile`: lone requests at the low / middle / high --prompt-len, and requests decoded "
                        "together at every engine width for the middle --output-len")
    p.add_argument("--profile-reps", type=int, default=4, help="repetitions of each profile measurement")
    p.set_defaults(func=_cmd_loadtest)
