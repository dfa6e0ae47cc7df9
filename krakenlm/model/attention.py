"""Causal attention kernels, and the choice between them made by measurement on the running machine.

Candidates, all exact formulations of softmax(q k^T * scale + causal) v:

- ``sdpa``: torch's scaled_dot_product_attention (flash/efficient kernels on CUDA, a flash-style
  kernel on CPU).
- ``blocked:B``: queries in blocks of B rows; block i multiplies only keys [0, end of block i)
  (causal block skipping: about half the FLOPs at long prompts), the causal mask is added to the
  diagonal block only, and each block is two batched GEMMs around a softmax. On CPUs whose GEMMs are
  fast (bf16 with AVX-512 BF16 or AMX) this runs at GEMM speed where the CPU flash kernel runs 3-8x
  slower (docs/benchmarks.md has the measurements).

The choice (``auto``) is measured when an engine or trainer is built (krakenlm.choices), per (machine,
dtype, forward-only or training, batch x heads, prompt length, head size) on random data of that shape
(prompt lengths rounded up to a power of two), and cached; the model runs the kernel it was given. In training the
blocked kernel keeps each block's probabilities for the backward (about heads x T^2 / 2 elements per
call), so it is a candidate there only while that stays under ``TRAIN_SCORE_BYTES``.
Attention with a mask (left padding, a prefill after earlier tokens, a decode step) always uses SDPA.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.profiler import record_function

from krakenlm.errors import ConfigError
from krakenlm.machine import fastest_seconds

KERNELS = ("auto", "sdpa", "blocked")
BLOCKS = (64, 128, 256)
DEFAULT_BLOCK = 128  # for kernel="blocked" without a measurement
TRAIN_SCORE_BYTES = 256 * 2**20
PROFILE_RANGE = "krakenlm::attention"


def check_kernel(kernel: str) -> str:
    """Validate a kernel name ("auto", "sdpa", "blocked" or "blocked:B")."""
    name, _, block = kernel.partition(":")
    if name not in KERNELS or (block and (name != "blocked" or not block.isdigit() or int(block) < 1)):
        raise ConfigError(f"attention: expected one of {KERNELS} or blocked:<rows>, got {kernel!r}")
    return kernel


@functools.lru_cache(maxsize=64)
def _causal_bias(rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[rows, rows]: 0 on and below the diagonal, -inf above (added to a diagonal score block)."""
    upper = torch.ones(rows, rows, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(rows, rows, dtype=dtype, device=device).masked_fill(upper, float("-inf"))


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)


def _blocked(q: Tensor, k: Tensor, v: Tensor, scale: float, block: int) -> Tensor:
    n, h, t, hs = q.shape
    if k.shape[1] != h:  # grouped / multi-query: every query head gets its group's keys
        k, v = (z.repeat_interleave(h // k.shape[1], dim=1) for z in (k, v))
    q3, v3 = (z.reshape(n * h, t, hs) for z in (q, v))
    k_t = k.reshape(n * h, t, hs).transpose(1, 2).contiguous()  # [n*h, hs, t]: every block's keys without a copy
    out = q.new_empty(n, t, h, hs)
    heads_view = out.transpose(1, 2)  # [n, h, t, hs]: blocks are written in the output projection's layout
    bias = _causal_bias(min(block, t), q.dtype, q.device)
    for a in range(0, t, block):
        b = min(t, a + block)
        scores = _block_scores(q3[:, a:b], k_t[:, :, :b], scale, bias[:b - a, :b - a])
        heads_view[:, :, a:b] = torch.bmm(torch.softmax(scores, dim=-1), v3[:, :b]).view(n, h, b - a, hs)
    return out


def _block_scores(q: Tensor, k_t: Tensor, scale: float, diagonal_bias: Tensor) -> Tensor:
    """Scaled scores of one query block against keys [0, b), the causal mask on the last (diagonal) keys.

    In fp32 one GEMM. A 16-bit GEMM rounds its output, and a score of 20 rounded to bf16 is off by
    0.06, enough to move a softmax weight by 6%; so 16-bit scores come from a second GEMM that
    subtracts each row's maximum (from the first, rounded GEMM) inside its fp32 accumulation: the
    entries near the maximum, the ones the softmax keeps, are then small and nearly exact. The shift
    does not change the softmax and carries no gradient."""
    rows = diagonal_bias.shape[0]
    if q.element_size() >= 4:
        scores = torch.bmm(q * scale, k_t)
        scores[:, :, -rows:] += diagonal_bias
        return scores
    with torch.no_grad():
        rough = torch.bmm(q, k_t)
        rough[:, :, -rows:] += diagonal_bias
        shift = rough.amax(dim=-1, keepdim=True).expand(-1, -1, k_t.shape[-1])
    scores = torch.baddbmm(shift, q, k_t, beta=-scale, alpha=scale)
    scores[:, :, -rows:] += diagonal_bias
    return scores


def run_kernel(kernel: str, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal attention with one named kernel: q [N, H, T, hs], k/v [N, Hkv, T, hs] -> [N, T, H, hs]."""
    name, _, block = kernel.partition(":")
    if name == "sdpa":
        return _sdpa(q, k, v, scale)
    return _blocked(q, k, v, scale, int(block) if block else DEFAULT_BLOCK)


def candidates(heads: int, t: int, hs: int, itemsize: int, training: bool) -> list[str]:
    """The kernels worth measuring at a shape (blocks shorter than the prompt; memory-capped in training)."""
    out = ["sdpa"]
    for block in BLOCKS:
        if block < t or block == BLOCKS[0]:
            saved = heads * t * (t + block) / 2 * itemsize
            if not training or saved <= TRAIN_SCORE_BYTES:
                out.append(f"blocked:{block}")
    return out


def measure(heads: int, kv_heads: int, t: int, hs: int, dtype: torch.dtype, device: torch.device,
            training: bool) -> dict[str, float]:
    """Seconds per call of every candidate at this shape (forward, or forward + backward in training)."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, t, hs, generator=gen, device=device).to(dtype)
    k, v = (torch.randn(1, kv_heads, t, hs, generator=gen, device=device).to(dtype) for _ in range(2))
    grad_out = torch.randn(1, t, heads, hs, generator=gen, device=device).to(dtype)
    for z in (q, k, v):
        z.requires_grad_(training)
    scale = hs ** -0.5
    times = {}
    for kernel in candidates(heads, t, hs, q.element_size(), training):
        def call(kernel: str = kernel) -> object:
            if not training:
                with torch.no_grad():
                    return run_kernel(kernel, q, k, v, scale)
            return torch.autograd.grad(run_kernel(kernel, q, k, v, scale), (q, k, v), grad_out)
        times[kernel] = fastest_seconds(call, device, repeats=3, budget_s=0.02)
    return times


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, kernel: str = "sdpa") -> Tensor:
    """softmax(q k^T * scale, causal) v for q [N, H, T, hs] and k, v [N, Hkv, T, hs] -> [N, T, H, hs], with
    the named kernel (``auto`` is resolved before a model runs: krakenlm.choices)."""
    # every kernel computes in q's dtype, as SDPA does; the profiler range lets a breakdown count its ops
    # (a trace has no profiler, so a compiled graph leaves it out)
    marked = contextlib.nullcontext() if torch.compiler.is_compiling() else record_function(PROFILE_RANGE)
    with torch.autocast(q.device.type, enabled=False), marked:
        return run_kernel(kernel, q, k, v, scale)


def attention_flops(heads: int, head_size: int, t: int, sequences: int = 1) -> float:
    """FLOPs of causal attention (QK^T and PV over the T(T+1)/2 visible pairs), as counted everywhere here."""
    return 2.0 * 2.0 * sequences * heads * head_size * t * (t + 1) / 2
