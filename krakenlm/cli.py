"""`krakenlm <verb>`: parse arguments, call the library, print. No logic of its own.

Each subsystem registers its own verbs (``add_*_parser`` functions); bad input surfaces as one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from krakenlm.cli_args import add_engine_args, add_model_args, engine_options, model_source
from krakenlm.costmodel.estimator import Workload
from krakenlm.demo import DemoConfig, run_demo
from krakenlm.engine import Engine
from krakenlm.errors import KrakenError, exit_interrupted
from krakenlm.generate import SamplingConfig, Stop
from krakenlm.tokenizer import check_text, default_tokenizer_for, get_tokenizer


def _cmd_presets(args: argparse.Namespace) -> int:
    from krakenlm.presets import PRESETS

    rows = [(n, c.arch, c.n_layer, c.n_embd, c.n_head, c.n_sub, c.num_params() / 1e6) for n, c in PRESETS.items()]
    if args.json:
        print(json.dumps({n: PRESETS[n].to_dict() | {"params": PRESETS[n].num_params()} for n in PRESETS}, indent=2))
        return 0
    print(f"{'preset':<20} {'arch':<9} {'L':>3} {'d':>6} {'heads':>5} {'N':>2} {'params(M)':>11}")
    for row in rows:
        print(f"{row[0]:<20} {row[1]:<9} {row[2]:>3} {row[3]:>6} {row[4]:>5} {row[5]:>2} {row[6]:>11.2f}")
    return 0


def _cmd_size(args: argparse.Namespace) -> int:
    from krakenlm.config import size_kraken

    s = size_kraken(args.budget, args.layers, args.heads, args.n_sub, per_layer=args.per_layer,
                    hardware_friendly=args.hardware_friendly)
    print(json.dumps({"n_embd": s.n_embd, "n_head_per_sub_layer": s.n_head, "head_size": s.n_embd // s.n_head,
                      "params": s.params}))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.trace is not None:
        from krakenlm.validation import check_output_dir

        check_output_dir(args.trace, "trace")
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    # --layout auto: the cost model's choice for this batch, prompt (bytes bound its tokens) and output length;
    # an empty prompt is refused later, by name.
    prompt = max(len(check_text(p).encode()) for p in args.prompt) or 1
    workload = Workload(batch=len(args.prompt), prompt=prompt,
                        generate=max(args.max_new_tokens, 0), dtype="int8" if args.quantize else
                        ("fp32" if args.dtype == "fp32" else "bf16"))
    source, options = model_source(vars(args)), engine_options(vars(args))
    with Engine.launch(source, options, workload) as engine:
        if not engine.is_driver:  # a torchrun rank >= 1: it followed rank 0, which prints
            return 0
        if args.layout:
            print(f"[tp={engine.world}] layout {engine.layout}", file=sys.stderr)
        tokenizer = get_tokenizer(args.tokenizer or default_tokenizer_for(engine.config.vocab_size))
        ids = [tokenizer.encode(p) for p in args.prompt]
        result = engine.generate(ids, args.max_new_tokens, sampling, Stop((tokenizer.eot_token,)),
                                 vocab_limit=tokenizer.vocab_size, trace=args.trace)
        print("\n---\n".join(result.completions(args.prompt, tokenizer.decode)) + "\n---")
        print("\n".join(result.summary(engine.world, engine.config.arch)), file=sys.stderr)
        print(f"[tp={engine.world}] {engine.choices}", file=sys.stderr)
    return 0


def _add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text on one device or tensor-parallel (--tp N)")
    add_model_args(p)
    add_engine_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--tokenizer", choices=["gpt2", "bytes"], help="default: by vocabulary size")
    p.add_argument("--no-comm", action="store_true", help="skip every collective (wrong output, right timing)")
    p.add_argument("--trace", metavar="DIR", help="with --tp: write each rank's timeline as a chrome trace")
    p.set_defaults(func=_cmd_generate)


def _cmd_convert(args: argparse.Namespace) -> int:
    from krakenlm.checkpoint import Checkpoint, is_native_checkpoint, save_checkpoint
    from krakenlm.validation import check_output_dir

    check_output_dir(args.out, "out", is_native_checkpoint, "checkpoint")  # before reading a large input
    ckpt = Checkpoint(args.checkpoint)
    config = ckpt.config if args.ladder_layers is None else ckpt.config.as_ladder(args.ladder_layers)
    path = save_checkpoint(args.out, ckpt.state(), config, {"converted_from": str(args.checkpoint)})
    print(f"wrote {path} ({config.arch}, {config.num_params() / 1e6:.1f}M params"
          + (f", last {args.ladder_layers} of {config.n_layer} layers ladder)" if args.ladder_layers is not None
             else ")"))
    return 0


def _add_convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="any supported checkpoint (HF Llama / GPT-2, nanoGPT ...) -> native; "
                                       "optionally rewire the last K layers as Ladder Residual")
    p.add_argument("--checkpoint", required=True, help="native dir, HF Llama or GPT-2 dir, nanoGPT or .pt file")
    p.add_argument("--out", required=True, help="native checkpoint directory to write")
    p.add_argument("--ladder-layers", type=int, metavar="K",
                   help="the last K layers read the residual stream one module late (same weights; the Ladder "
                        "paper adapts a pretrained model this way, then retrains briefly)")
    p.set_defaults(func=_cmd_convert)


def _demo_config(args: argparse.Namespace) -> DemoConfig:
    return DemoConfig(out=args.out, steps=args.steps, prompt_len=args.prompt_len, rounds=args.rounds,
                      device=args.device, dtype=args.dtype)


def _cmd_demo(args: argparse.Namespace) -> int:
    from krakenlm.validation import check_output_dir

    check_output_dir(args.out, "out")  # before training, so a bad --out loses no work
    return run_demo(_demo_config(args))


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    d = DemoConfig()
    p = sub.add_parser("demo", help="end-to-end: train small Kraken + GPT, serve on 2 ranks, TTFT vs prediction")
    p.add_argument("--out", default=os.environ.get("KRAKENLM_DEMO_DIR", d.out))
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per model")
    p.add_argument("--prompt-len", type=int, default=d.prompt_len)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--device", default=d.device, help="where the 2-rank generation runs: cpu, cuda or auto")
    p.add_argument("--dtype", default=d.dtype, help="training and timing: auto (the faster here), bf16 or fp32")
    p.set_defaults(func=_cmd_demo)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from krakenlm.doctor import run_doctor
    from krakenlm.validation import check_output_dir

    check_output_dir(args.out, "out")
    return run_doctor(args.out, timings=args.timings)


def _add_doctor_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="GPU check: CUDA vs CPU, 2 ranks on the GPU(s), CUDA graphs, calibration records")
    p.add_argument("--out", default="doctor-results", help="directory for doctor.json and the calibration records")
    p.add_argument("--no-timings", dest="timings", action="store_false", help="skip the 1.3B-shape timings")
    p.set_defaults(func=_cmd_doctor)


def _registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Verbs of every subsystem; a subsystem that fails to import must not break the others."""
    registrars: list[Callable[[argparse._SubParsersAction], None]] = [_add_generate_parser, _add_convert_parser,
                                                                       _add_demo_parser, _add_doctor_parser]
    for module, names in [
        ("krakenlm.costmodel.cli", ["add_predict_parser", "add_plan_parser", "add_simulate_parser",
                                    "add_calibrate_parser"]),
        ("krakenlm.train.cli", ["add_prepare_parser", "add_train_parser"]),
        ("krakenlm.eval.cli", ["add_eval_parser"]),
        ("krakenlm.bench.cli", ["add_bench_parser", "add_roofline_parser"]),
        ("krakenlm.serve.cli", ["add_serve_parser", "add_loadtest_parser"]),
        ("krakenlm.interop.cli", ["add_export_parser"]),
    ]:
        try:
            mod = __import__(module, fromlist=names)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("krakenlm"):
                continue  # subsystem not installed in this build
            raise
        registrars += [getattr(mod, n) for n in names]
    return registrars


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="krakenlm", description="Kraken and tensor-parallel transformer inference: "
                                     "models, training, serving, benchmarks and a cost model.")
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("presets", help="list named model configurations")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_presets)
    p = sub.add_parser("size", help="Kraken width d for a parameter budget (the paper's sizing rule)")
    p.add_argument("--budget", type=int, required=True, help="parameters (total, or per layer with --per-layer)")
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--heads", type=int, required=True, help="total heads over all sub-layers")
    p.add_argument("--n-sub", type=int, required=True, help="Kraken degree N")
    p.add_argument("--per-layer", action="store_true")
    p.add_argument("--hardware-friendly", action="store_true", help="d and head size multiples of 64")
    p.set_defaults(func=_cmd_size)
    for register in _registrars():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # imports every subsystem: seconds, a Ctrl-C may land here
    except KeyboardInterrupt:
        exit_interrupted()
    try:
        return int(args.func(args) or 0)
    except KrakenError as err:
        print(f"krakenlm {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0
    except OSError as err:  # the system refused a file or socket operation (a full disk, a path that is a file)
        where = f": {err.filename}" if err.filename else ""
        print(f"krakenlm {args.verb}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"krakenlm {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
