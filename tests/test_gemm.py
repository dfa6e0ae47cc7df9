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
    assert "packed" in gemm.forms_for(w) or not torch.backends.mkldnn.is_available()
    for form in gemm.forms_for(w):
        out = gemm.few_rows_form(form, x, w, bias)
        assert out.shape == (rows, 40) and out.is_contiguous()
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="NOT TESTED: this torch has no oneDNN")
def test_packed_copy_follows_writes_to_the_weight_and_dies_with_it(rng):
    """The reordered copy is remade when the weight is written in place (a loaded checkpoint, an optimizer
    step), also through a view of a stacked weight, and freed with the weight."""
    stacked = torch.randn(1, 40, 48, generator=rng)
    x = torch.randn(3, 48, generator=rng)
    before = len(gemm._PACKED)
    first = gemm.few_rows_form("packed", x, stacked[0])
    torch.testing.assert_close(first, F.linear(x, stacked[0]), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        stacked.mul_(-2.0)
    torch.testing.assert_close(gemm.few_rows_form("packed", x, stacked[0]), -2.0 * first, rtol=1e-5, atol=1e-5)
    assert len(gemm._PACKED) == before + 1
    del stacked
    assert len(gemm._PACKED) == before


def test_packed_form_in_bf16_matches_linear(rng):
    x, w = torch.randn(8, 64, generator=rng).bfloat16(), torch.randn(32, 64, generator=rng).bfloat16()
    for form in gemm.forms_for(w):
        torch.testing.assert_close(gemm.few_rows_form(form, x, w).float(), F.linear(x, w).float(), rtol=2e-2,
                                   atol=2e-2)


def test_choice_is_measured_once_per_key_then_read_from_the_cache(monkeypatch, tmp_path, rng):
    monkeypatch.setenv("KRAKENLM_CACHE_DIR", str(tmp_path))
    choices.LINEAR.forget()
    calls = []

    def fake_measure(probe, weight, bias):
        calls.append((tuple(probe.shape), tuple(weight.shape), bias is not None))
        return {"linear": 2.0, "transposed": 1.0} | ({"packed": 3.0} if "packed" in gemm.forms_for(weight) else {})

    monkeypatch.setattr(gemm, "measure", fake_measure)
    x, w = torch.randn(5, 16, generator=rng), torch.randn(24, 16, generator=rng)
    cpu = torch.device("cpu")
    form = choices.linear_form(5, w, x.dtype, cpu)
    assert choices.linear_form(7, w, x.dtype, cpu) == form == "transposed"  # 5 and 7 rows share the bucket of 8
    assert calls == [((8, 16), (24, 16), False)]
    assert choices.linear_form(513, w, x.dtype, cpu) == "linear"  # above MEASURED_ROWS: F.linear, nothing measured
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


def test_each_row_bucket_runs_its_own_measured_form(monkeypatch, tmp_path):
    """An engine measures the linear form per row bucket up to its batch and its prefill's rows (the best
    form changes with the row count), and a layer with m rows runs the form of m's bucket (F.linear above)."""
    from krakenlm.model import Transformer
    from tests.conftest import tiny

    monkeypatch.setenv("KRAKENLM_CACHE_DIR", str(tmp_path))
    choices.LINEAR.forget()
    monkeypatch.setattr(gemm, "measure", lambda probe, weight, bias: {  # 2 rows: linear
        "linear": 0.1 if probe.shape[0] == 2 else 1.0, "transposed": 0.5, "packed": 0.7}
        if "packed" in gemm.forms_for(weight) else {"linear": 0.1 if probe.shape[0] == 2 else 1.0, "transposed": 0.5})
    model = Transformer(tiny("gpt"))
    picked = choices.resolve(model, "fp32", torch.float32, torch.device("cpu"), kernel="sdpa", sequences=5, prompt=3)
    assert picked.linear == ("transposed", "linear", "transposed", "transposed", "transposed")  # 1, 2, 4, 8, 16 rows
    forms = model.set_forms("sdpa", picked.linear, "tanh").forms
    assert [forms.few(m) for m in (1, 2, 3, 4, 5, 8, 9, 16, 17, 64)] == ["transposed", "linear", "transposed",
                                                                         "transposed", "transposed", "transposed",
                                                                         "transposed", "transposed", "linear",
                                                                         "linear"]
    assert choices.resolve(model, "fp32", torch.float32, torch.device("cpu"), kernel="sdpa", sequences=1,
                           prompt=2000).linear == ("transposed", "linear") + ("transposed",) * 8  # up to 512 rows
    assert "linear=transposed,linear,transposed,transposed,transposed" in str(picked)
    choices.LINEAR.forget()


def test_a_choice_cached_before_a_form_was_added_is_measured_again(monkeypatch, tmp_path, rng):
    """The disk cache keeps what a run measured; when the candidates change (``packed`` added) an entry that
    lacks one is measured again instead of read (a server had kept the old 8-row form so)."""
    monkeypatch.setenv("KRAKENLM_CACHE_DIR", str(tmp_path))
    choices.LINEAR.forget()
    w = torch.randn(24, 16, generator=rng)
    forms = gemm.forms_for(w)
    monkeypatch.setattr(gemm, "measure", lambda probe, weight, bias: {f: 1.0 + i for i, f in enumerate(forms[::-1])})
    fresh = choices.linear_form(8, w, w.dtype, torch.device("cpu"))
    assert fresh == forms[-1]
    key = next(k for k in json.loads((tmp_path / "few_rows_linear.json").read_text()) if "rows 8" in k)
    choices.LINEAR.cache.put(key, {"choice": "linear", "seconds": {"linear": 1.0, "transposed": 2.0}})  # older run
    choices.LINEAR.forget()
    assert choices.linear_form(8, w, w.dtype, torch.device("cpu")) == (forms[-1] if len(forms) > 2 else "linear")
    choices.LINEAR.forget()
