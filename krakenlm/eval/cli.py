"""`krakenlm eval tasks` (zero-shot SuperGLUE, several checkpoints side by side) and `krakenlm eval ppl`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from krakenlm.dtypes import DTYPES
from krakenlm.errors import InputError
from krakenlm.validation import check_int, check_output_file


def _names(checkpoints: list[str], names: list[str] | None) -> list[str]:
    """Row labels: --name values, else each checkpoint's file or directory name (made unique)."""
    if names:
        if len(names) != len(checkpoints):
            raise InputError(f"--name given {len(names)} times for {len(checkpoints)} checkpoints; "
                             "give one per checkpoint")
        return names
    labels: list[str] = []
    for ckpt in checkpoints:
        base = Path(ckpt).stem or ckpt
        label, n = base, 2
        while label in labels:
            label, n = f"{base}-{n}", n + 1
        labels.append(label)
    return labels


def _perplexity(checkpoint: str, data: str, args: argparse.Namespace) -> float:
    from krakenlm.engine import Engine, EngineOptions
    from krakenlm.eval.perplexity import MAX_WINDOWS, perplexity
    from krakenlm.source import ModelSource

    check_int(args.windows, "windows", maximum=MAX_WINDOWS)  # before a model is loaded
    check_int(args.batch_size, "batch_size")
    # the engine checks memory before --dtype auto times its GEMMs
    with Engine(ModelSource.of(checkpoint=checkpoint), EngineOptions(device=args.device, dtype=args.dtype),
                local=True) as engine:
        ppl = perplexity(engine, data, split=args.split, num_windows=args.windows, batch_size=args.batch_size,
                         seed=args.ppl_seed)
        print(f"[eval] {checkpoint}: perplexity with {engine.choices}", file=sys.stderr)
        return ppl


def cmd_tasks(args: argparse.Namespace) -> int:
    """Evaluate every checkpoint on the local tasks; print the comparison table, write JSON + markdown."""
    from krakenlm.eval import report
    from krakenlm.eval.harness import KrakenLM
    from krakenlm.eval.tasks import check_data, evaluate, parse_tasks

    tasks = parse_tasks(args.tasks)
    check_data(args.data_dir, tasks)  # fail on bad data before loading any model
    if args.out:
        check_output_file(args.out, "--out")  # before the evaluation, so its results are not lost
        check_output_file(Path(args.out).with_suffix(".md"), "--out (its table)")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    results = []
    for name, ckpt in zip(_names(args.checkpoint, args.name), args.checkpoint, strict=True):
        print(f"[eval] {name}: {ckpt} (tp={args.tp}, {args.dtype})", file=sys.stderr)
        lm = KrakenLM(checkpoint=ckpt, dtype=args.dtype, batch_size=args.batch_size, tp=args.tp,
                      tokenizer=args.tokenizer, device=args.device, timeout=args.timeout)
        try:
            scores = evaluate(lm, args.data_dir, tasks, args.limit)
            print(f"[eval] {name}: {lm.engine.choices}", file=sys.stderr)
        finally:
            lm.close()
        ppl = _perplexity(ckpt, args.ppl_data, args) if args.ppl_data else None
        results.append(report.ModelResult(name, ckpt, scores, lm.config.num_params(), lm.config.to_dict(), ppl,
                                          {"tp": args.tp, "dtype": args.dtype, "batch_size": lm.batch_size,
                                           "tokenizer": lm.tokenizer_id}))
    extra: dict[str, Any] = {"data_dir": str(Path(args.data_dir).resolve()), "limit": args.limit, "num_fewshot": 0}
    if args.ppl_data:
        extra["perplexity"] = {"data": str(Path(args.ppl_data).resolve()), "split": args.split,
                               "windows": args.windows, "seed": args.ppl_seed}
    print(report.markdown_table(results, tasks), end="")
    if args.out:
        json_path, md_path = report.write(results, tasks, args.out, extra)
        print(f"[eval] wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    """Validation perplexity of one checkpoint over seeded windows of a prepared data dir."""
    ppl = _perplexity(args.checkpoint, args.data, args)
    print(json.dumps({"checkpoint": args.checkpoint, "data": args.data, "split": args.split,
                      "windows": args.windows, "seed": args.ppl_seed, "perplexity": ppl}))
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=[*sorted(DTYPES), "auto"], default="auto",
                   help="auto: the faster of bf16 and fp32 for the model on this machine (measured once, cached)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when there is one)")
    p.add_argument("--split", default="val", help="perplexity split of the prepared data dir (val.bin)")
    p.add_argument("--windows", type=int, default=200, help="perplexity: number of seeded random windows")
    p.add_argument("--ppl-seed", type=int, default=1234, help="perplexity: window seed (same windows for every model)")


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `krakenlm eval {tasks,ppl}`."""
    p = subparsers.add_parser("eval", help="zero-shot SuperGLUE via lm-eval, and validation perplexity")
    sub = p.add_subparsers(dest="eval_verb", required=True)

    t = sub.add_parser("tasks", help="local SuperGLUE tasks (lm-eval prompts) on one or more checkpoints")
    t.add_argument("--checkpoint", action="append", required=True,
                   help="native dir, HF GPT-2 dir, nanoGPT or Kraken-authors .pt (repeat to compare)")
    t.add_argument("--name", action="append", help="row label per --checkpoint (default: its file name)")
    t.add_argument("--tasks", default="all", help="comma-separated: boolq,cb,copa,multirc,record,rte,wic,wsc or all")
    t.add_argument("--data-dir", required=True, help="directory with <task>.jsonl files (HF super_glue fields)")
    t.add_argument("--limit", type=int, help="at most this many examples per task (quick checks)")
    t.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (local ranks: gloo on CPU, NCCL on GPUs)")
    t.add_argument("--timeout", type=float, default=1800.0, help="seconds tensor-parallel ranks wait for each other")
    t.add_argument("--tokenizer", help="gpt2, bytes or a prepared data dir with its BPE (default: by vocabulary size)")
    t.add_argument("--ppl-data", help="prepared data dir: add a validation-perplexity column")
    t.add_argument("--out", help="write results JSON here (and the markdown table next to it, .md)")
    _add_common(t)
    t.set_defaults(func=cmd_tasks)

    q = sub.add_parser("ppl", help="validation perplexity over a prepared data dir (train.bin / val.bin)")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--data", required=True, help="prepared data dir (krakenlm prepare)")
    _add_common(q)
    q.set_defaults(func=cmd_ppl)
