"""The sigmoid form of tanh-GELU is the same function: values and gradients against F.gelu."""

import pytest
import torch
import torch.nn.functional as F

from krakenlm import choices
from krakenlm.model import activations
from krakenlm.model.activations import gelu_form, gelu_tanh


def test_fp32_values_and_gradients_match_torch():
    x = torch.randn(64, 100, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(gelu_form("sigmoid", x), F.gelu(x, approximate="tanh"), rtol=1e-5, atol=1e-6)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ga,) = torch.autograd.grad(gelu_form("sigmoid", a), a, torch.ones_like(x))
    (gb,) = torch.autograd.grad(F.gelu(b, approximate="tanh"), b, torch.ones_like(x))
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5)


def test_bf16_error_is_torchs():
    """bf16 tolerance: computed in fp32 and rounded once, so no further from the exact values than torch's
    own bf16 GELU."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1)).bfloat16() * 4
    exact = F.gelu(x.double(), approximate="tanh")
    ours = gelu_form("sigmoid", x)
    assert ours.dtype == torch.bfloat16
    torchs = (F.gelu(x, approximate="tanh").double() - exact).abs().max()
    assert (ours.double() - exact).abs().max() <= torchs


@pytest.mark.parametrize("form", ["tanh", "sigmoid"])
def test_measured_choice_runs_the_cached_form(monkeypatch, tmp_path, form):
    monkeypatch.setenv("KRAKENLM_CACHE_DIR", str(tmp_path))
    choices.GELU.forget()
    monkeypatch.setattr(activations, "measure", lambda *a: {f: 1.0 if f == form else 2.0 for f in ("tanh", "sigmoid")})
    x = torch.randn(10, 10)
    chosen = choices.gelu_form(x.dtype, x.device, training=False)
    assert chosen == form
    torch.testing.assert_close(gelu_tanh(x, chosen), gelu_form(form, x), rtol=0, atol=0)
    choices.GELU.forget()
