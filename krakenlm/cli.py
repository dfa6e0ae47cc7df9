"""`krakenlm <verb>`: parse arguments, call the library, print. No logic of its own.

Each subsystem registers its own verbs (``add_*_parser`` functions); bad input surfaces as one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from krakenlm.checkpoint import build_model
from krakenlm.dtypes import DTYPES
from krakenlm.errors import KrakenError
from krakenlm.generate import GenerationResult, SamplingConfig, generate
from krakenlm.tokenizer import default_tokenizer_for, get_tokenizer


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--checkpoint / --preset / --config: where a model comes from (shared by several verbs)."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="native dir, HF GPT-2 dir, nanoGPT or Kraken-authors .pt file")
    src.add_argument("--preset", help="named configuration (random weights); see `krakenlm presets`")
    src.add_argument("--config", help="ModelConfig JSON file (random weights)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--seed", type=int, default=0, help="init seed for --preset/--config, and sampling seed")


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


def model_source(args: argparse.Namespace) -> dict:
    return {"checkpoint": args.checkpoint, "preset": args.preset, "config": args.config, "seed": args.seed}


def print_result(result: GenerationResult, prompts: list[str], tokenizer, tp: int) -> None:
    for text, tokens in zip(prompts, result.tokens, strict=True):
        print(text + tokenizer.decode(tokens))
        print("---")
    print(f"[tp={tp}] prompt tokens {result.prompt_tokens}, TTFT {result.prefill_seconds * 1e3:.1f} ms, "
          f"decode {result.decode_tokens_per_second:.1f} tokens/s", file=sys.stderr)


def _cmd_generate(args: argparse.Namespace) -> int:
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    if args.tp > 1:
        from krakenlm.parallel.launch import generate_tp

        return generate_tp(args, sampling)
    model = build_model(**model_source(args), dtype=DTYPES[args.dtype])
    tokenizer = get_tokenizer(args.tokenizer or default_tokenizer_for(model.config.vocab_size))
    ids = [tokenizer.encode(p) for p in args.prompt]
    result = generate(model, ids, args.max_new_tokens, sampling, stop_token=tokenizer.eot_token)
    print_result(result, args.prompt, tokenizer, 1)
    return 0


def _add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text on one device or tensor-parallel (--tp N)")
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--tokenizer", choices=["gpt2", "bytes"], help="default: by vocabulary size")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (spawns local gloo ranks)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a stalled rank aborts the run")
    p.add_argument("--no-comm", action="store_true", help="skip every collective (wrong output, right timing)")
    p.add_argument("--trace", metavar="DIR", help="with --tp: write each rank's prefill timeline as a chrome trace")
    p.set_defaults(func=_cmd_generate)


def _registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Verbs of every subsystem; a subsystem that fails to import must not break the others."""
    registrars: list[Callable[[argparse._SubParsersAction], None]] = [_add_generate_parser]
    for module, names in [
        ("krakenlm.costmodel.cli", ["add_predict_parser", "add_plan_parser", "add_simulate_parser",
                                    "add_calibrate_parser"]),
        ("krakenlm.train.cli", ["add_prepare_parser", "add_train_parser"]),
        ("krakenlm.eval.cli", ["add_eval_parser"]),
        ("krakenlm.bench.cli", ["add_bench_parser"]),
        ("krakenlm.demo", ["add_demo_parser"]),
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
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KrakenError as err:
        print(f"krakenlm {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"krakenlm {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
