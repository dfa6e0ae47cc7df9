"""Argument groups shared by the verbs that load and run a model, and their translation into the
library's ModelSource and EngineOptions: one definition, so every verb spells them alike. The translators
read the parsed flags as a plain mapping (``vars(args)``), so nothing below the parser sees argparse."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from krakenlm.dtypes import DTYPES
from krakenlm.engine import EngineOptions
from krakenlm.source import ModelSource


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--checkpoint / --preset / --config: where a model comes from (shared by several verbs)."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="native dir, HF Llama or GPT-2 dir, nanoGPT or Kraken-authors .pt file")
    src.add_argument("--preset", help="named configuration (random weights); see `krakenlm presets`")
    src.add_argument("--config", help="ModelConfig JSON file (random weights)")
    parser.add_argument("--seed", type=int, default=0, help="init seed for --preset/--config, and sampling seed")


def add_engine_args(parser: argparse.ArgumentParser, *, tp_help: str = "tensor-parallel degree") -> None:
    """How a model runs: device, dtype, TP degree and the engine's switches (every verb that runs one)."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when there is one)")
    parser.add_argument("--dtype", choices=[*sorted(DTYPES), "auto"], default="auto",
                        help="auto: the faster of bf16 and fp32 for the model on this machine (measured once, cached)")
    parser.add_argument("--tp", type=int, default=1, help=tp_help + " (local ranks, or the torchrun world)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a stalled rank aborts the run")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU)")
    parser.add_argument("--pad-heads", type=int, help="zero-pad heads to this multiple (exact; e.g. 64)")
    parser.add_argument("--layout", help="partitioning layout over the --tp ranks (Pope et al.): 1d-ws, 2d-ws, "
                        "wg-x/wg-xy/wg-xyz (prefill) with /attn-heads or /attn-batch, PREFILL,DECODE, or auto (the "
                        "cost model's choice for this workload); default: Megatron 1D (Kraken: its sub-layer split)")
    parser.add_argument("--overlap", default="none", help="gpt / parallel models at --tp N: standard TP's all-reduces "
                        "overlapped by the runtime: none (blocking), chunked:K (each row-parallel matmul in K token "
                        "chunks, each chunk's all-reduce under the next) or collective-matmul (looped reduce-scatter "
                        "/ all-gather over the ring, sequence-sharded residual)")
    parser.add_argument("--quantize", choices=["int8"], help="int8 weight-only weights made at load (per-row scales)")
    parser.add_argument("--attention", default="auto",
                        help="causal attention kernel: auto (measured fastest here), sdpa or blocked[:rows]")


def model_source(flags: Mapping[str, Any]) -> ModelSource:
    """The ModelSource that --checkpoint / --preset / --config / --seed name."""
    return ModelSource.of(checkpoint=flags["checkpoint"], preset=flags["preset"], config=flags["config"],
                          seed=flags["seed"])


def engine_options(flags: Mapping[str, Any], **overrides: object) -> EngineOptions:
    """EngineOptions from add_engine_args' flags, with ``overrides`` (e.g. a verb's fixed tp)."""
    given = {k: flags[k] for k in ("device", "dtype", "tp", "timeout", "compile", "pad_heads", "layout",
                                   "quantize", "attention")}
    given["tp_overlap"] = flags.get("overlap", "none")
    return EngineOptions(**given | {"no_comm": flags.get("no_comm", False)} | overrides)
