"""The few-rows linear layer: both forms compute F.linear; the form is measured once per key (when an engine
is built, krakenlm.choices), then cached."""

import json

import pytest
import torch
import torch.nn.functional as F

from krakenlm import choices
from krakenlm.model import gemm


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("with_bias", [False, True])
def test_forms_equal_the_float64_product(rows, with_bias, rng):
    x, w = torch.randn(rows, 48, generator=rng), torch.randn(40, 48, generator=rng)
    bias = torch.randn(40, generator=rng) if with_bias else None
    want = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    for form in gemm.FORMS:
        out = gemm.few_rows_form(form, x, w, bias)
        assert out.shape == (rows, 40) and out.is_contiguous()
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_choice_is_measured_once_per_key_then_read_from_the_cache(monkeypatch, tmp_path, rng):
    monkeypatch.setenv("KRAKENLM_CACHE_DIR", str(tmp_path))
    choices.LINEAR.forget()
    calls = []

    def fake_measure(probe, weight, bias):
        calls.append((tuple(probe.shape), tuple(weight.shape), bias is not None))
        return {"linear": 2.0, "transposed": 1.0}

    monkeypatch.setattr(gemm, "measure", fake_measure)
    x, w = torch.randn(5, 16, generator=rng), torch.randn(24, 16, generator=rng)
    cpu = torch.device("cpu")
    form = choices.linear_form(5, w, x.dtype, cpu)
    assert choices.linear_form(7, w, x.dtype, cpu) == form == "transposed"  # 5 and 7 rows share the bucket of 8
    assert calls == [((8, 16), (24, 16), False)]
    assert choices.linear_form(65, w, x.dtype, cpu) == "linear"  # above FEW_ROWS: F.linear, nothing measured
    with torch.inference_mode():
        torch.testing.assert_close(gemm.rows_linear(x, w, form=form), gemm.few_rows_form("transposed", x, w))
    trained = torch.randn(32, 16, generator=rng, requires_grad=True)
    gemm.rows_linear(x, trained, form=form).sum().backward()  # training: F.linear
    assert len(calls) == 1 and trained.grad is not None
    entry = next(iter(json.loads((tmp_path / "few_rows_linear.json").read_text()).values()))
    assert entry["choice"] == "transposed"
    choices.LINEAR.forget()
    choices.linear_form(5, w, x.dtype, cpu)  # a fresh process reads the file
    assert len(calls) == 1
    choices.LINEAR.forget()
