"""An independent Ladder Residual forward, written from the paper's equations in the two-stream form
of its Hugging Face adaptation code, with separate q/k/v/o and MLP modules per layer. Tests only.

Per layer l with input streams (hidden h, attention stream s):
    standard layer:  a = h + Attn(N1(h));   m = a + MLP(N2(a))
    ladder layer:    a = h + Attn(N1(s));   m = a + MLP(N2(h))
then s, h = a, m. Both streams start as the embedding; logits = N_f(h) W^T. In a ladder layer the
attention misses the previous MLP's output and the MLP misses this attention's output: each module
reads the residual stream one module late.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(kind: str, d: int, bias: bool, eps: float) -> nn.Module:
    return RMSNorm(d, eps) if kind == "rmsnorm" else nn.LayerNorm(d, eps=eps, bias=bias)


class Layer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, bias: bool, norm: str, mlp: str, eps: float) -> None:
        super().__init__()
        self.heads, self.mlp_kind = heads, mlp
        self.norm1, self.norm2 = make_norm(norm, d, bias, eps), make_norm(norm, d, bias, eps)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=bias) for _ in range(4))
        self.gate = nn.Linear(d, ffn, bias=bias) if mlp == "swiglu" else None
        self.up = nn.Linear(d, ffn, bias=bias)
        self.down = nn.Linear(ffn, d, bias=bias)

    def attention(self, x):
        b, t, d = x.shape
        hs = d // self.heads
        q, k, v = (f(x).view(b, t, self.heads, hs).transpose(1, 2) for f in (self.q, self.k, self.v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))

    def feed_forward(self, x):
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))

    def forward(self, h, s, ladder: bool):
        a = h + self.attention(self.norm1(s if ladder else h))
        m = a + self.feed_forward(self.norm2(h if ladder else a))
        return m, a


class ReferenceLadder(nn.Module):
    def __init__(self, n_layer, d, heads, vocab, block, *, ladder_layers=None, bias=False, norm="layernorm",
                 mlp="gelu", eps=1e-5):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.layers = nn.ModuleList(Layer(d, heads, 4 * d, bias, norm, mlp, eps) for _ in range(n_layer))
        self.norm_f = make_norm(norm, d, bias, eps)
        self.first_ladder = n_layer - (n_layer if ladder_layers is None else ladder_layers)

    def forward(self, idx):
        h = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        s = h
        for i, layer in enumerate(self.layers):
            h, s = layer(h, s, ladder=i >= self.first_ladder)
        return self.norm_f(h) @ self.wte.weight.t()

    def native_state(self) -> dict:
        """These weights under krakenlm's native names (stacked over one stream, fused q/k/v and gate/up)."""
        out = {"wte.weight": self.wte.weight, "wpe.weight": self.wpe.weight,
               "ln_f.weight": self.norm_f.weight.unsqueeze(0)}
        if getattr(self.norm_f, "bias", None) is not None:
            out["ln_f.bias"] = self.norm_f.bias.unsqueeze(0)
        for i, layer in enumerate(self.layers):
            up = [layer.gate, layer.up] if layer.gate is not None else [layer.up]
            parts = {"ln1": layer.norm1, "ln2": layer.norm2}
            for name, norm in parts.items():
                out[f"layers.{i}.{name}.weight"] = norm.weight.unsqueeze(0)
                if getattr(norm, "bias", None) is not None:
                    out[f"layers.{i}.{name}.bias"] = norm.bias.unsqueeze(0)
            out[f"layers.{i}.attn.qkv_weight"] = torch.cat([layer.q.weight, layer.k.weight, layer.v.weight])[None]
            out[f"layers.{i}.attn.proj_weight"] = layer.o.weight[None]
            out[f"layers.{i}.mlp.up_weight"] = torch.cat([m.weight for m in up])[None]
            out[f"layers.{i}.mlp.down_weight"] = layer.down.weight[None]
            if layer.up.bias is not None:
                out[f"layers.{i}.attn.qkv_bias"] = torch.cat([layer.q.bias, layer.k.bias, layer.v.bias])[None]
                out[f"layers.{i}.proj_bias"] = layer.o.bias[None]
                out[f"layers.{i}.mlp.up_bias"] = torch.cat([m.bias for m in up])[None]
                out[f"layers.{i}.down_bias"] = layer.down.bias[None]
        return {k: v.detach().clone() for k, v in out.items()}
