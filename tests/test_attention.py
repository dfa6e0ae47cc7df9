"""Causal attention kernels: every candidate against an independent softmax(QK^T)V, forward and backward,
and the measured choice (cached, deterministic given its cache entry)."""

import json
import math

import pytest
import torch

from krakenlm import choices
from krakenlm.errors import ConfigError
from krakenlm.model import attention
from krakenlm.model.attention import causal_attention, check_kernel, run_kernel
from tests.conftest import tiny


def reference(q, k, v, scale):
    """softmax(q k^T * scale + causal mask) v in float64, written out: [N, T, H, hs]."""
    q, k, v = (z.double() for z in (q, k, v))
    if k.shape[1] != q.shape[1]:
        k, v = (z.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for z in (k, v))
    t = q.shape[2]
    scores = q @ k.transpose(-1, -2) * scale
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf)
    return (scores.softmax(-1) @ v).transpose(1, 2)


def qkv(n, h, hkv, t, hs, magnitude=1.0, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, h, t, hs, generator=gen) * magnitude
    k, v = (torch.randn(n, hkv, t, hs, generator=gen) * magnitude for _ in range(2))
    return [z.to(dtype) for z in (q, k, v)]


KERNELS = ["sdpa", "blocked:16", "blocked:64", "blocked:128"]
SHAPES = [(2, 4, 4, 100, 16), (1, 6, 6, 64, 113), (3, 4, 2, 37, 8), (1, 4, 1, 130, 32)]  # MHA, odd sizes, GQA, MQA


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_kernels_match_the_written_out_attention(kernel, shape):
    q, k, v = qkv(*shape, magnitude=2.0)
    scale = shape[-1] ** -0.5
    out = run_kernel(kernel, q, k, v, scale)
    expected = reference(q, k, v, scale)
    assert out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("kernel", ["blocked:16", "blocked:64"])
def test_fp32_gradients_match(kernel):
    q, k, v = qkv(2, 4, 2, 50, 16, magnitude=1.5)
    grad = torch.randn(2, 50, 4, 16, generator=torch.Generator().manual_seed(1))
    grads = []
    for name in ("sdpa", kernel):
        leaves = [z.clone().requires_grad_() for z in (q, k, v)]
        out = run_kernel(name, *leaves, 0.25)
        grads.append(torch.autograd.grad(out, leaves, grad))
    for ours, theirs in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


@pytest.mark.parametrize("magnitude", [1.0, 3.0])
def test_bf16_blocked_error_is_within_twice_sdpas(magnitude):
    """bf16 tolerance: against fp64 attention of the same (bf16-rounded) inputs, the blocked kernel's
    largest error is at most 2x SDPA's own bf16 error (peaked attention included: magnitude 3 gives
    scores of ~20, where rounding unshifted scores to bf16 would be ~10x worse)."""
    q, k, v = qkv(1, 6, 6, 256, 64, magnitude=magnitude, dtype=torch.bfloat16)
    expected = reference(q, k, v, 0.125)
    sdpa_err = (run_kernel("sdpa", q, k, v, 0.125).double() - expected).abs().max().item()
    ours_err = (run_kernel("blocked:64", q, k, v, 0.125).double() - expected).abs().max().item()
    assert ours_err <= 2 * sdpa_err


def test_bf16_gradients_close_to_fp64():
    q, k, v = qkv(1, 2, 2, 64, 32, dtype=torch.bfloat16)
    grad = torch.randn(1, 64, 2, 32, generator=torch.Generator().manual_seed(2))
    errors = {}
    exact = [z.double().requires_grad_() for z in (q, k, v)]
    expected = torch.autograd.grad(reference(*exact, 32 ** -0.5), exact, grad.double())
    for name in ("sdpa", "blocked:16"):
        leaves = [z.clone().requires_grad_() for z in (q, k, v)]
        got = torch.autograd.grad(run_kernel(name, *leaves, 32 ** -0.5), leaves, grad.bfloat16())
        errors[name] = max((g.double() - e).abs().max().item() for g, e in zip(got, expected, strict=True))
    assert errors["blocked:16"] <= 2 * errors["sdpa"] + 1e-3


def test_kernel_names_are_checked():
    assert check_kernel("blocked:32") == "blocked:32"
    for bad in ("flash", "blocked:0", "sdpa:4", "blocked:x"):
        with pytest.raises(ConfigError, match="attention"):
            check_kernel(bad)


def test_choice_is_measured_once_then_read_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("KRAKENLM_CACHE_DIR", str(tmp_path))
    choices.ATTENTION.forget()
    calls = []

    def fake_measure(heads, kv, t, hs, dtype, device, training):
        calls.append((heads, kv, t, hs, training))
        return {"sdpa": 2.0, "blocked:64": 1.0}

    monkeypatch.setattr(attention, "measure", fake_measure)
    q, k, v = qkv(1, 4, 4, 100, 16)
    kernel = choices.attention_kernel(4, 1, 100, 16, q.dtype, q.device, training=False)
    assert calls == [(4, 4, 128, 16, False)]  # prompt length rounded up to a power of two
    torch.testing.assert_close(causal_attention(q, k, v, 0.25, kernel), run_kernel("blocked:64", q, k, v, 0.25))
    entry = next(iter(json.loads((tmp_path / "attention.json").read_text()).values()))
    assert entry["choice"] == "blocked:64"
    # a fresh process (memo and in-memory cache dropped) reads the file and measures nothing
    choices.ATTENTION.forget()
    choices.attention_kernel(4, 1, 100, 16, q.dtype, q.device, training=False)
    assert len(calls) == 1
    choices.ATTENTION.forget()


def test_corrupt_choice_cache_is_ignored_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("KRAKENLM_CACHE_DIR", str(tmp_path))
    (tmp_path / "attention.json").write_text("{not json")
    choices.ATTENTION.forget()
    q, k, v = qkv(1, 2, 2, 20, 8)
    with pytest.warns(RuntimeWarning, match="ignoring the unreadable measurement cache"):
        kernel = choices.attention_kernel(2, 1, 20, 8, q.dtype, q.device, training=False)
    out = causal_attention(q, k, v, 8 ** -0.5, kernel)
    torch.testing.assert_close(out.double(), reference(q, k, v, 8 ** -0.5), rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "attention.json").read_text())  # rewritten whole
    choices.ATTENTION.forget()


@pytest.mark.parametrize("arch", ["gpt", "parallel", "kraken"])
def test_model_forward_and_gradients_equal_across_kernels(arch):
    """The whole model (prefill and training) gives the same logits and gradients whichever kernel runs."""
    from krakenlm.model import Transformer

    idx = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(3))
    results = []
    for kernel in ("sdpa", "blocked:16"):
        torch.manual_seed(0)
        model = Transformer(tiny(arch)).set_attention_kernel(kernel)
        logits = model(idx)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
        loss.backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_breakdown_counts_the_blocked_kernels_gemms_as_attention():
    """The blocked kernel is made of bmm calls; a bench breakdown files them under attention, not GEMM."""
    from krakenlm.bench.breakdown import profile_forward

    q, k, v = qkv(1, 4, 4, 256, 32)
    times = {}
    for kernel in ("blocked:64", "sdpa"):
        times[kernel] = profile_forward(lambda kernel=kernel: causal_attention(q, k, v, 0.2, kernel), vocab=257)
        assert times[kernel]["attention"] > 0 and times[kernel]["GEMM"] == 0, kernel
    # a bare bmm outside the range is a GEMM: the range, not the op name, decides
    assert profile_forward(lambda: q @ k.transpose(-1, -2), vocab=257)["GEMM"] > 0
