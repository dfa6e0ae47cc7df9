"""Measured choices: the exact forms a run may compute in whose speed depends on the machine (the dtype
under ``auto``, the causal attention kernel, the few-row linear form, the compiled one-row linear form,
the GELU form), resolved once
when an Engine or a Trainer is built and stored on it as plain options (``Choices``), printed with
every run. The model's forward only reads them: nothing is measured inside a forward.

Each measurement is taken at the shapes the run is built for, once per (machine, dtype, shape) key,
and cached on disk (krakenlm.machine.MeasuredChoice), so later runs and the other ranks read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from krakenlm.machine import MeasuredChoice, machine_key
from krakenlm.model import Transformer, activations, attention, gemm

ATTENTION = MeasuredChoice("attention")
LINEAR = MeasuredChoice("few_rows_linear")
ROW = MeasuredChoice("compiled_row_linear")
GELU = MeasuredChoice("gelu")


@dataclass(frozen=True)
class Choices:
    """What one engine or trainer runs: plain names, nothing left to measure."""

    dtype: str
    attention: str  # sdpa | blocked:B
    linear: tuple[str, ...]  # the linear form per row bucket (1, 2, 4, ...): linear | transposed | packed
    gelu: str  # tanh | sigmoid
    row: str = "reduce"  # one row inside a compiled decode step: reduce | library (measured only when compiling)

    def __str__(self) -> str:
        return (f"choices: dtype={self.dtype} attention={self.attention} linear={','.join(self.linear)} "
                f"gelu={self.gelu} row={self.row}")


def _bucket(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


def attention_kernel(heads: int, group: int, t: int, head_size: int, dtype: torch.dtype, device: torch.device,
                     training: bool) -> str:
    """The causal kernel measured fastest for ``heads`` query heads (all sequences), ``group`` of them per
    K/V head (GQA), over ``t`` tokens here."""
    heads, tb = _bucket(heads), _bucket(t, 16)
    kv = max(1, heads // group)
    key = (f"{machine_key(device)}|{str(dtype)[6:]}|{'train' if training else 'infer'}"
           f"|heads {heads}/{kv}|T {tb}|hs {head_size}")
    return ATTENTION.pick(key, lambda: attention.measure(heads, kv, tb, head_size, dtype, device, training))


STREAMED_ROWS = 8  # up to this many rows a form is measured on the whole weight, which streams from memory
PROBE_OUT = 4096  # above them (compute-bound) on this many of its output rows, to bound the measuring time


def linear_form(rows: int, weight: torch.Tensor, dtype: torch.dtype, device: torch.device) -> str:
    """The few-row linear form measured fastest for ``rows`` rows times ``weight`` here."""
    if rows > gemm.MEASURED_ROWS:
        return "linear"
    out, inner = weight.shape[-2:]
    out = out if rows <= STREAMED_ROWS else min(out, PROBE_OUT)
    key = f"{machine_key(device)}|{str(dtype)[6:]}|rows {_bucket(rows)}|{out}x{inner}|bias False"
    probe = torch.empty(_bucket(rows), inner, dtype=dtype, device=device)
    w = weight.detach().reshape(-1, inner)[:out].to(dtype)
    return LINEAR.pick(key, lambda: gemm.measure(probe, w, None), gemm.forms_for(w))


def row_form(model: Transformer, dtype: torch.dtype, device: torch.device,
             compile: Callable[[Callable[..., object]], Callable[..., object]]) -> str:
    """The one-row linear form a compiled decode step streams ``model``'s FFN weights fastest in here."""
    weights = [layer.mlp.up_weight for layer in model.layers]
    if not all(isinstance(w, torch.Tensor) for w in weights):  # int8 modules multiply themselves
        return "reduce"
    flat = [w.detach()[0].to(dtype) for w in weights]
    out, inner = flat[0].shape
    key = f"{machine_key(device)}|{str(dtype)[6:]}|{len(flat)} x {out}x{inner}"
    return ROW.pick(key, lambda: gemm.measure_row(flat, compile), gemm.ROW_FORMS)


def _row_buckets(sequences: int, prompt: int) -> int:
    """How many row buckets (1, 2, 4, ...) a run's linear layers see: decode steps of ``sequences`` rows and
    prefills of ``sequences`` x ``prompt``, up to MEASURED_ROWS."""
    return _bucket(min(gemm.MEASURED_ROWS, max(sequences, sequences * prompt))).bit_length()


def gelu_form(dtype: torch.dtype, device: torch.device, training: bool) -> str:
    """The tanh-GELU form measured fastest for this dtype and gradient mode here."""
    key = f"{machine_key(device)}|{str(dtype)[6:]}|{'train' if training else 'infer'}"
    return GELU.pick(key, lambda: activations.measure(dtype, device, training))


def resolve(model: Transformer, dtype_name: str, dtype: torch.dtype, device: torch.device, *, kernel: str = "auto",
            sequences: int = 1, prompt: int = 128, training: bool = False,
            compile: Callable[[Callable[..., object]], Callable[..., object]] | None = None) -> Choices:
    """The choices for ``model`` run on ``device`` in ``dtype``, measured at ``sequences`` x ``prompt`` tokens
    (its prefill's shape; a decode step's rows are ``sequences``); ``kernel`` other than auto is kept.
    ``compile``: how the run compiles its decode step, when it does (the one-row form is measured so)."""
    shape = model.layers[0].attn.shape
    streams = model.layers[0].attn.qkv_weight.shape[0]
    if kernel == "auto":
        kernel = attention_kernel(sequences * streams * shape.n_head, max(1, shape.n_head // shape.n_kv_head),
                                  min(prompt, model.config.block_size), shape.head_size, dtype, device, training)
    head = model.wte.weight if model.lm_head is None else model.lm_head.weight
    linear = (("linear",) if training or not isinstance(head, torch.Tensor) else
              tuple(linear_form(1 << i, head, dtype, device) for i in range(_row_buckets(sequences, prompt))))
    gelu = gelu_form(dtype, device, training) if model.config.mlp == "gelu" else "tanh"
    row = "reduce" if compile is None or training else row_form(model, dtype, device, compile)
    return Choices(dtype_name, kernel, linear, gelu, row)
