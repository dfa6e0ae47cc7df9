"""GELU with the tanh approximation, computed the fastest exact way on the running machine.

GELU_tanh(x) = x/2 (1 + tanh(z)), z = sqrt(2/pi) (x + 0.044715 x^3), is the same function as
x * sigmoid(2z) (tanh(z) = 2 sigmoid(2z) - 1). CPUs vectorize sigmoid far better than tanh (torch's
tanh-GELU ran at 1.5 ns per element on an AMD Zen 5, the sigmoid form at 0.55 in bf16 and 0.42 in
fp32), while on a GPU the single fused kernel wins; so the form is chosen by measurement per
(machine, dtype, inference or training) when an engine or trainer is built (krakenlm.choices). The sigmoid form computes
16-bit inputs in fp32 and rounds once, as the fused kernel does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from krakenlm.machine import fastest_seconds

FORMS = ("tanh", "sigmoid")
_TWO_C = 2 * math.sqrt(2 / math.pi)
_PROBE = (512, 1536)


def gelu_sigmoid(x: Tensor) -> Tensor:
    """x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)), in fp32 for 16-bit x (in place where no gradient is kept)."""
    y = x.float()
    if torch.is_grad_enabled() and y.requires_grad:
        return (y * torch.sigmoid(y * torch.addcmul(y.new_tensor(_TWO_C), y, y, value=_TWO_C * 0.044715))).to(x.dtype)
    u = torch.addcmul(y.new_tensor(_TWO_C), y, y, value=_TWO_C * 0.044715)
    return u.mul_(y).sigmoid_().mul_(y).to(x.dtype)


def gelu_form(form: str, x: Tensor) -> Tensor:
    return gelu_sigmoid(x) if form == "sigmoid" else F.gelu(x, approximate="tanh")


def measure(dtype: torch.dtype, device: torch.device, training: bool) -> dict[str, float]:
    """Seconds per call of each form on a fixed probe, forward (and backward when ``training``)."""
    x = torch.randn(_PROBE, generator=torch.Generator(device=device).manual_seed(0), device=device).to(dtype)
    x.requires_grad_(training)
    grad = torch.ones_like(x)
    times = {}
    for form in FORMS:
        def call(form: str = form) -> object:
            if not training:
                with torch.no_grad():
                    return gelu_form(form, x)
            return torch.autograd.grad(gelu_form(form, x), x, grad)
        times[form] = fastest_seconds(call, device, repeats=3, budget_s=0.02)
    return times


def gelu_tanh(x: Tensor, form: str = "tanh") -> Tensor:
    """GELU (tanh approximation) in ``form`` (the one measured fastest here, krakenlm.choices); in a trace
    the fused kernel."""
    if torch.compiler.is_compiling():
        return F.gelu(x, approximate="tanh")
    return gelu_form(form, x)
