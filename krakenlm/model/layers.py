"""Building blocks shared by every architecture, written over a leading *stream* dimension S.

A stream is one Kraken sub-layer (S = N on one device, N/T on a rank when T < N, 1 for GPT). All
per-layer weights are stacked as [S, ...], so S sub-layers run as batched matmuls, not a Python loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from krakenlm.model.activations import gelu_tanh
from krakenlm.model.attention import causal_attention
from krakenlm.model.gemm import LinearForms, one_row, row_linear, rows_linear

DEFAULT_FORMS = LinearForms()


def single_row(x: Tensor) -> bool:
    """Whether a layer sees one row per sequence under torch.compile (where ``row_attention`` pays)."""
    return x.shape[-2] == 1 and torch.compiler.is_compiling()


def row_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Attention of ONE query per sequence (a decode step) as reductions the compiler fuses into one
    pass over the KV cache; SDPA's CPU kernel is built for many queries (measured: ~0.4 ms per layer
    for 1 query x 160 keys). q [B, H, 1, hs], k/v [B, Hkv, L, hs] (GQA: H = g * Hkv), mask [B, 1, 1, L]."""
    b, h, _, hs = q.shape
    hkv = k.shape[1]
    qg = q.float().view(b, hkv, h // hkv, 1, hs)
    scores = (qg * k.float().unsqueeze(2)).sum(-1) * scale  # [B, Hkv, g, L]
    scores = scores.masked_fill(~mask.view(b, 1, 1, -1), float("-inf"))
    out = (scores.softmax(-1).unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2)  # [B, Hkv, g, hs]
    return out.reshape(b, h, 1, hs).to(q.dtype)


def linear(x: Tensor, weight: Tensor | nn.Module, forms: LinearForms = DEFAULT_FORMS) -> Tensor:
    """x [M, in] @ weight[out, in]^T (the LM head, the conjunction) in ``forms`` (krakenlm.model.gemm). A
    weight that is a module (int8, krakenlm.model.quant) multiplies itself: quantization swaps weights,
    the forward does not change."""
    if isinstance(weight, nn.Module):
        return weight.linear(x)
    return row_linear(x, weight) if one_row(x, forms) else rows_linear(x, weight, form=forms.few(x.shape[0]))


def stacked_linear(x: Tensor, weight: Tensor | nn.Module, bias: Tensor | None = None,
                   forms: LinearForms = DEFAULT_FORMS) -> Tensor:
    """x [S, M, in] @ weight[S, out, in]^T (+ bias [S, out]) -> [S, M, out], one batched GEMM (one stream
    of a few rows, or one row compiled: in ``forms``, krakenlm.model.gemm)."""
    if isinstance(weight, nn.Module) or one_row(x, forms):
        out = weight.linear(x) if isinstance(weight, nn.Module) else row_linear(x, weight)
        return out if bias is None else out + bias.unsqueeze(1)
    if weight.shape[0] == 1:  # the GPT case: a plain GEMM, no batch overhead
        out = rows_linear(x[0], weight[0], None if bias is None else bias[0], forms.few(x.shape[1]))
        return out.unsqueeze(0)
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))  # bias added inside the GEMM


class StackedNorm(nn.Module):
    """S independent LayerNorms or RMSNorms over the last dimension (one per stream).

    RMSNorm normalises in fp32 and applies the gain in the input dtype, as Llama does, so imported
    models compute what their trainers computed."""

    def __init__(self, streams: int, dim: int, kind: str, bias: bool, eps: float) -> None:
        super().__init__()
        self.eps, self.rms = eps, kind == "rmsnorm"
        self.weight = nn.Parameter(torch.ones(streams, dim))
        self.bias = nn.Parameter(torch.zeros(streams, dim)) if bias and not self.rms else None

    def forward(self, x: Tensor) -> Tensor:
        """x [S or 1, M, dim] -> [S, M, dim]. One stream: the affine runs inside layer_norm's one pass;
        several: one fused multiply-add over the normalized rows (no separate scale and shift passes).
        RMSNorm (Llama) normalizes in fp32, as transformers' LlamaRMSNorm does."""
        if self.rms:
            return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype) * self.weight.unsqueeze(1)
        if self.weight.shape[0] == 1:
            bias = None if self.bias is None else self.bias[0]
            return F.layer_norm(x, x.shape[-1:], self.weight[0], bias, self.eps)
        out = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        if self.bias is None:
            return out * self.weight.unsqueeze(1)
        return torch.addcmul(self.bias.unsqueeze(1), out, self.weight.unsqueeze(1))


@dataclass(frozen=True)
class AttentionShape:
    """Local attention shape on one rank: heads of this shard, kv heads it holds, head size."""

    n_head: int
    n_kv_head: int
    head_size: int
    padded_size: int | None = None  # heads zero-padded to this size for faster kernels (exact)

    @property
    def stored_size(self) -> int:
        return self.padded_size or self.head_size


class KVCache:
    """Static per-layer key/value buffers [S, B, kv_heads, max_len, head], preallocated once and
    written in place by slot, so shapes never change between steps (compile / CUDA-graph friendly).

    ``valid`` [B, max_len] marks slots holding real tokens: left padding and unwritten slots are
    never attended to, so each sequence sees exactly what it would see alone. The cache keeps no
    host-side length: callers say where to write (a prefill's first slot, or a decode step's slot
    per row as a device tensor).
    """

    def __init__(self, n_layer: int, streams: int, batch: int, shape: AttentionShape, max_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        size = (streams, batch, shape.n_kv_head, max_len, shape.stored_size)
        self.keys = [torch.zeros(size, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.zeros(size, dtype=dtype, device=device) for _ in range(n_layer)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop) as a cache sharing this one's storage (a server prefills one request
        into its row while the other rows keep their state)."""
        view = KVCache.__new__(KVCache)
        view.keys = [k[:, start:stop] for k in self.keys]
        view.values = [v[:, start:stop] for v in self.values]
        view.valid = self.valid[start:stop]
        view.max_len = self.max_len
        return view

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@dataclass(frozen=True)
class AttentionStep:
    """What one forward asks of every layer's attention (built once per forward, not per layer):
    ``batch`` sequences of ``t`` new tokens each, their rotary tables (None: learned positions).

    No cache: causal attention over the input (``mask`` only for left padding). With a cache, a
    prefill writes its T tokens at slots [start, start + T) of every row; a decode step (T = 1)
    writes row b at ``slots[b]`` (a device tensor). Attention then reads cache slots [0, keys).
    ``mask`` None with a cache means a prefill from slot 0 without padding: SDPA's causal kernel runs
    on the fresh keys and no mask is materialized.
    """

    batch: int
    t: int
    rope: tuple[Tensor, Tensor] | None = None
    cache: KVCache | None = None
    start: int = 0
    slots: Tensor | None = None
    keys: int = 0
    mask: Tensor | None = None


def rope_tables(positions: Tensor, head_size: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables [B, 1, T, head/2] for rotary position embeddings at the given positions."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, device=positions.device, dtype=torch.float32) / head_size)
    angles = positions.float().unsqueeze(-1) * inv_freq
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [S*B, H, T, head] pairwise (first half with second half)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    repeat = x.shape[0] // max(cos.shape[0], 1)  # no rows at all: a rank holding no sequence
    cos, sin = cos.repeat(repeat, 1, 1, 1), sin.repeat(repeat, 1, 1, 1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class StackedAttention(nn.Module):
    """Causal self-attention for S streams; fused QKV; MHA, GQA and MQA; returns the *partial*
    output projection (without bias) so a tensor-parallel caller decides where to sum it.

    The three steps are methods so a partitioning layout (krakenlm.parallel.layout_comm) can wrap the
    module and move activations between them; ``index`` is the layer whose KV cache it uses."""

    def __init__(self, streams: int, dim: int, shape: AttentionShape, bias: bool, index: int = 0) -> None:
        super().__init__()
        self.shape, self.index = shape, index
        self.kernel = "sdpa"  # causal kernel without a mask (krakenlm/model/attention.py; an engine's choice)
        self.forms = DEFAULT_FORMS  # the linear layers' forms (krakenlm/model/gemm.py; an engine's choice)
        qkv = (shape.n_head + 2 * shape.n_kv_head) * shape.head_size
        self.qkv_weight = nn.Parameter(torch.empty(streams, qkv, dim))
        self.qkv_bias = nn.Parameter(torch.zeros(streams, qkv)) if bias else None
        self.proj_weight = nn.Parameter(torch.empty(streams, dim, shape.n_head * shape.head_size))

    def forward(self, x: Tensor, step: AttentionStep) -> Tensor:
        """x [S, B*t, dim]: B sequences of t tokens (rows sequence-major)."""
        return self.project_out(self.attend(self.project_in(x), step))

    def project_in(self, x: Tensor) -> Tensor:
        return stacked_linear(x, self.qkv_weight, self.qkv_bias, self.forms)

    def project_out(self, out: Tensor) -> Tensor:
        return stacked_linear(out, self.proj_weight, forms=self.forms)

    def attend(self, qkv: Tensor, step: AttentionStep) -> Tensor:
        """Fused q|k|v [S, B*t, (h + 2 hkv) hs] -> attention output [S, B*t, h hs], through the KV cache."""
        s, m, _ = qkv.shape
        t, batch = step.t, m // step.t
        h, hkv, hs = self.shape.n_head, self.shape.n_kv_head, self.shape.stored_size
        scale = self.shape.head_size ** -0.5  # the true head size, also when heads are padded
        q, k, v = qkv.view(s * batch, t, h + 2 * hkv, hs).transpose(1, 2).split([h, hkv, hkv], dim=1)
        if step.rope is not None:
            q, k = apply_rope(q, *step.rope), apply_rope(k, *step.rope)
        if step.cache is not None:
            k, v = self._cached(k, v, step, s, batch)
        if step.mask is None and t > 1:
            out = causal_attention(q, k, v, scale, self.kernel)  # [S*B, T, heads, hs]
        elif step.mask is not None and single_row(q):
            out = row_attention(q, k, v, step.mask, scale).transpose(1, 2)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, scale=scale,
                                                 enable_gqa=hkv != h).transpose(1, 2)
        return out.reshape(s, m, h * hs)

    def _cached(self, k: Tensor, v: Tensor, step: AttentionStep, s: int, batch: int) -> tuple[Tensor, Tensor]:
        """Write the new keys and values into this layer's cache; the keys and values attention reads."""
        assert step.cache is not None
        kbuf, vbuf = step.cache.keys[self.index], step.cache.values[self.index]
        hkv, t, hs = k.shape[1], step.t, k.shape[-1]
        if step.slots is None:
            kbuf[..., step.start:step.start + t, :] = k.view(s, batch, hkv, t, hs)
            vbuf[..., step.start:step.start + t, :] = v.view(s, batch, hkv, t, hs)
        else:  # one token per row, each at its own slot. An index_put (not a scatter): the compiler
            # writes it in place, where a scatter into a graph input copies the whole buffer twice
            rows = torch.arange(batch, device=kbuf.device)
            kbuf[:, rows, :, step.slots] = k.view(s, batch, hkv, hs).transpose(0, 1)
            vbuf[:, rows, :, step.slots] = v.view(s, batch, hkv, hs).transpose(0, 1)
        if step.mask is None:
            return k, v
        return (kbuf[..., :step.keys, :].reshape(s * batch, hkv, step.keys, hs),
                vbuf[..., :step.keys, :].reshape(s * batch, hkv, step.keys, hs))

    @torch.no_grad()
    def pad_heads(self, size: int) -> None:
        """Zero-pad every q/k/v head to ``size`` dims: padded dims of q.k and of the output are exactly
        zero and the softmax scale stays 1/sqrt(true head size), so results do not change."""
        shape = self.shape
        extra = size - shape.head_size
        heads = shape.n_head + 2 * shape.n_kv_head
        s, _, dim = self.qkv_weight.shape
        w = self.qkv_weight.view(s, heads, shape.head_size, dim)
        self.qkv_weight = nn.Parameter(F.pad(w, (0, 0, 0, extra)).reshape(s, heads * size, dim))
        if self.qkv_bias is not None:
            b = self.qkv_bias.view(s, heads, shape.head_size)
            self.qkv_bias = nn.Parameter(F.pad(b, (0, extra)).reshape(s, heads * size))
        p = self.proj_weight.view(s, dim, shape.n_head, shape.head_size)
        self.proj_weight = nn.Parameter(F.pad(p, (0, extra)).reshape(s, dim, shape.n_head * size))
        self.shape = AttentionShape(shape.n_head, shape.n_kv_head, shape.head_size, size)


class StackedMLP(nn.Module):
    """GELU(tanh) or SwiGLU feed-forward for S streams; returns the partial down projection (no bias)."""

    def __init__(self, streams: int, dim: int, hidden: int, bias: bool, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.gelu, self.forms = "tanh", DEFAULT_FORMS  # forms an engine or trainer chose (krakenlm.choices)
        up = 2 * hidden if kind == "swiglu" else hidden
        self.up_weight = nn.Parameter(torch.empty(streams, up, dim))
        self.up_bias = nn.Parameter(torch.zeros(streams, up)) if bias else None
        self.down_weight = nn.Parameter(torch.empty(streams, dim, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.project_out(self.activate(self.project_in(x)))

    def project_in(self, x: Tensor) -> Tensor:
        return stacked_linear(x, self.up_weight, self.up_bias, self.forms)

    def activate(self, hidden: Tensor) -> Tensor:
        if self.kind == "swiglu":
            gate, up = hidden.chunk(2, dim=-1)
            return F.silu(gate) * up
        return gelu_tanh(hidden, self.gelu)

    def project_out(self, hidden: Tensor) -> Tensor:
        return stacked_linear(hidden, self.down_weight, forms=self.forms)


def attention_mask(valid: Tensor, q_len: int, start: int, streams: int) -> Tensor:
    """Boolean mask [S*B, 1, T, start+T] for queries at slots [start, start+T): causal, invalid keys
    hidden, and every query may see itself (so a pad query never has an all-masked row, which would
    make NaNs). Built once per forward and shared by every layer."""
    total = start + q_len
    device = valid.device
    q_pos = torch.arange(start, total, device=device).unsqueeze(1)
    k_pos = torch.arange(total, device=device).unsqueeze(0)
    allowed = (k_pos <= q_pos).unsqueeze(0) & valid[:, None, :total]
    allowed |= (k_pos == q_pos).unsqueeze(0)
    return allowed.unsqueeze(1).repeat(streams, 1, 1, 1)


def decode_mask(valid: Tensor, keys: int, streams: int) -> Tensor:
    """Mask [S*B, 1, 1, keys] of a decode step: every written, valid slot (the new token included)."""
    return valid[:, None, None, :keys].repeat(streams, 1, 1, 1)


def init_std(residual: bool, n_layer: int, n_sub: int) -> float:
    """The Kraken paper's init: N(0, 0.02); residual output projections scaled by 1/sqrt(2 L N)."""
    return 0.02 / math.sqrt(2 * n_layer * n_sub) if residual else 0.02
