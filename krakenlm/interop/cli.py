"""`krakenlm export`: a checkpoint as a Hugging Face directory."""

from __future__ import annotations

import argparse

from krakenlm.interop.hf_export import FORMATS, export_checkpoint

HOW_TO_LOAD = {"gpt2": "loads as GPT-2", "llama": "loads as Llama",
               "krakenlm": "loads with trust_remote_code=True (krakenlm's modeling file)"}


def _cmd_export(args: argparse.Namespace) -> int:
    result = export_checkpoint(args.checkpoint, args.out, format=args.format, tokenizer=args.tokenizer)
    print(f"wrote {result.path} ({result.layout} layout): transformers' AutoModelForCausalLM "
          f"{HOW_TO_LOAD[result.layout]}")
    return 0


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a checkpoint as a Hugging Face directory (transformers, lm-eval's hf model)")
    p.add_argument("checkpoint", help="native dir, HF Llama / GPT-2 dir or export, nanoGPT or Kraken-authors .pt file")
    p.add_argument("out", help="directory to write (new, empty, or an earlier export, which is replaced)")
    p.add_argument("--format", choices=FORMATS, default="hf",
                   help="hf: plain GPT-2 / Llama where that is exactly the model, otherwise krakenlm's own model "
                        "class (trust_remote_code); hf-krakenlm: always krakenlm's class")
    p.add_argument("--tokenizer", help="gpt2, bytes, a prepared data dir (its BPE) or none; default: gpt2 for "
                                       "GPT-2-sized vocabularies, bytes for smaller ones")
    p.set_defaults(func=_cmd_export)
