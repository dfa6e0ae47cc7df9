"""The `generate` verb: tokenize, run generation on one device or across local ranks, print."""

from __future__ import annotations

import argparse
import sys

from krakenlm.checkpoint import build_model
from krakenlm.cli import DTYPES
from krakenlm.generate import GenerationResult, SamplingConfig, generate
from krakenlm.tokenizer import default_tokenizer_for, get_tokenizer


def model_source(args: argparse.Namespace) -> dict:
    return {"checkpoint": args.checkpoint, "preset": args.preset, "config": args.config, "seed": args.seed}


def print_result(result: GenerationResult, prompts: list[str], tokenizer, tp: int) -> None:
    for text, tokens in zip(prompts, result.tokens, strict=True):
        print(text + tokenizer.decode(tokens))
        print("---")
    print(f"[tp={tp}] prompt tokens {result.prompt_tokens}, TTFT {result.prefill_seconds * 1e3:.1f} ms, "
          f"decode {result.decode_tokens_per_second:.1f} tokens/s", file=sys.stderr)


def run_generate(args: argparse.Namespace) -> int:
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
