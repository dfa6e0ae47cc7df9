"""A linear layer over a few rows (a decode step of a batch, a prefill's last positions), in the form
measured fastest on the running machine.

x [M, in] @ W[out, in]^T can run as that GEMM (``F.linear``) or as W @ x^T, a tall GEMM whose
result is transposed back; both are exact up to summation order. BLAS libraries treat the two very
differently when M is small: with MKL on an Intel Xeon (one thread, fp32) ``F.linear`` at M = 8
took 1.05 ms for a 3072 x 768 weight and 40 ms for GPT-2's 50257 x 768 LM head, W @ x^T 0.74 and
28 ms (at M = 1 they tie). So the form is chosen by measurement per (machine, dtype, rows rounded up
to a power of two, weight shape) when an engine is built (krakenlm.choices), for every row bucket up to
the engine's batch and its prefill (at most ``MEASURED_ROWS``), and the model runs the form it was
given. With gradients, and above the buckets measured, it is ``F.linear``.

Inside torch.compile, ONE row (a decode step at batch 1) runs as ``row_linear``, a multiply-and-sum the
compiler turns into one vectorized pass over the weight, or as the library's GEMV (``F.linear``, an
extern call in the compiled graph). Which streams the weights faster depends on the CPU: on an AMD EPYC
Zen 5 BLAS GEMV read weights at half the bandwidth of the generated reduction (11 vs 23 GB/s); on an
Intel Xeon (family 6 model 167) fp32 GEMV ran at the memory floor and the reduction at 1.16x it, while
in bf16 the reduction was the faster (1.43x vs 1.62x). So this form is measured too (``measure_row``),
when a compiled engine is built.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from krakenlm.machine import fastest_seconds

PACK_ROWS = 8  # the row count oneDNN's reordered layout is chosen for (4-16 rows measured alike)
ROW_FORMS = ("reduce", "library")
MEASURED_ROWS = 512  # the largest row bucket a form is measured for; above it F.linear


@dataclass(frozen=True)
class LinearForms:
    """The forms a model's linear layers run in (an engine's measured choices): ``rows[i]`` for up to 2**i
    rows outside a trace (``linear`` for more; the best form changes with the row count: on an Intel
    Xeon, family 6 model 167, fp32, ``linear`` streamed GPT-2's weights at 1.07x the read floor for 2 rows
    where ``transposed`` took 1.77x, and at 8 rows 2.70x against 1.84x), ``row`` for one row inside
    torch.compile."""

    rows: tuple[str, ...] = ("linear",)
    row: str = "reduce"

    def few(self, m: int) -> str:
        """The form for ``m`` rows."""
        bucket = max(0, m - 1).bit_length()
        return self.rows[bucket] if bucket < len(self.rows) else "linear"


def row_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., 1, in] @ weight[..., out, in]^T for ONE row, as a multiply-and-sum the compiler turns into
    one vectorized pass over the weight (fp32 accumulation)."""
    return (x.float().unsqueeze(-2) * weight.float().unsqueeze(-3)).sum(-1).to(x.dtype)


def one_row(x: Tensor, forms: LinearForms) -> bool:
    """Whether a linear layer sees one row under torch.compile and runs it as ``row_linear``."""
    return forms.row == "reduce" and x.shape[-2] == 1 and torch.compiler.is_compiling()


def forms_for(weight: Tensor) -> tuple[str, ...]:
    """The few-row forms ``weight`` can run in (``packed``: fp32 or bf16 on a CPU with oneDNN)."""
    packed = (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
              and torch.backends.mkldnn.is_available())
    return ("linear", "transposed", "packed") if packed else ("linear", "transposed")


_PACKED: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], tuple[int, Tensor]] = {}


def packed_weight(weight: Tensor) -> Tensor:
    """oneDNN's reordered copy of ``weight`` [out, in], made on first use and kept while the tensor that
    owns its memory lives; remade if that memory is written (its version counter moves), so a copy never
    goes stale."""
    owner = weight if weight._base is None else weight._base
    key = (weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype)
    version, packed = _PACKED.get(key, (None, None))
    if packed is None or version != owner._version:
        if packed is None:
            weakref.finalize(owner, _PACKED.pop, key, None)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS)
        _PACKED[key] = owner._version, packed
    return packed


def few_rows_form(form: str, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [M, in] @ weight[out, in]^T (+ bias [out]) in one named form; a contiguous [M, out]."""
    if form == "packed":
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed_weight(weight), bias, "none", [], "")
    if form == "transposed":
        out = torch.mm(weight, x.t()) if bias is None else torch.addmm(bias.unsqueeze(1), weight, x.t())
        return out.t().contiguous()
    return F.linear(x, weight, bias)


def measure(x: Tensor, weight: Tensor, bias: Tensor | None) -> dict[str, float]:
    """Seconds per call of each form on ``weight`` for random rows shaped like ``x``."""
    probe = torch.randn(x.shape, generator=torch.Generator(device=x.device).manual_seed(0), device=x.device)
    probe = probe.to(x.dtype)
    return {form: fastest_seconds(lambda form=form: few_rows_form(form, probe, weight, bias), x.device, repeats=3,
                                  budget_s=0.02) for form in forms_for(weight)}


def measure_row(weights: Sequence[Tensor], compile: Callable[[Callable[..., object]], Callable[..., object]]
                ) -> dict[str, float]:
    """Seconds per pass of each one-row form over ``weights`` [out, in] (a model's layer weights, so they
    stream from memory as a decode step reads them), each compiled by ``compile``."""
    gen = torch.Generator(device=weights[0].device).manual_seed(0)
    rows = [torch.randn(1, w.shape[1], generator=gen, device=w.device).to(w.dtype) for w in weights]
    forms = {"reduce": row_linear, "library": lambda x, w: F.linear(x, w)}
    seconds = {}
    for name, form in forms.items():
        step = compile(lambda form=form: [form(x, w) for x, w in zip(rows, weights, strict=True)])
        step()  # compiles
        seconds[name] = fastest_seconds(step, weights[0].device, repeats=3, budget_s=0.05)
    return seconds


def rows_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, form: str = "linear") -> Tensor:
    """x [M, in] @ weight[out, in]^T (+ bias): for a few rows outside a trace and without gradients, in
    ``form`` (the one measured fastest here, krakenlm.choices); otherwise F.linear."""
    if (form == "linear" or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return F.linear(x, weight, bias)
    return few_rows_form(form, x, weight, bias)
