"""A linear layer over a few rows (a decode step of a batch, a prefill's last positions), in the form
measured fastest on the running machine.

x [M, in] @ W[out, in]^T can run as that GEMM (``F.linear``) or as W @ x^T, a tall GEMM whose
result is transposed back; both are exact up to summation order. BLAS libraries treat the two very
differently when M is small: with MKL on an Intel Xeon (one thread, fp32) ``F.linear`` at M = 8
took 1.05 ms for a 3072 x 768 weight and 40 ms for GPT-2's 50257 x 768 LM head, W @ x^T 0.74 and
28 ms (at M = 1 they tie). So the form is chosen by measurement per (machine, dtype, rows rounded up
to a power of two, weight shape) when an engine is built (krakenlm.choices), and the model runs the
form it was given. Inside torch.compile, with gradients, and above ``FEW_ROWS`` rows it is ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from krakenlm.machine import fastest_seconds

FORMS = ("linear", "transposed")
FEW_ROWS = 64


def few_rows_form(form: str, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [M, in] @ weight[out, in]^T (+ bias [out]) in one named form; a contiguous [M, out]."""
    if form == "transposed":
        out = torch.mm(weight, x.t()) if bias is None else torch.addmm(bias.unsqueeze(1), weight, x.t())
        return out.t().contiguous()
    return F.linear(x, weight, bias)


def measure(x: Tensor, weight: Tensor, bias: Tensor | None) -> dict[str, float]:
    """Seconds per call of each form on ``weight`` for random rows shaped like ``x``."""
    probe = torch.randn(x.shape, generator=torch.Generator(device=x.device).manual_seed(0), device=x.device)
    probe = probe.to(x.dtype)
    return {form: fastest_seconds(lambda form=form: few_rows_form(form, probe, weight, bias), x.device, repeats=3,
                                  budget_s=0.02) for form in FORMS}


def rows_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, form: str = "linear") -> Tensor:
    """x [M, in] @ weight[out, in]^T (+ bias): for a few rows outside a trace and without gradients, in
    ``form`` (the one measured fastest here, krakenlm.choices); otherwise F.linear."""
    if (form == "linear" or x.shape[0] > FEW_ROWS or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return F.linear(x, weight, bias)
    return few_rows_form(form, x, weight, bias)
