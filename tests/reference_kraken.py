"""An independent Kraken forward written straight from the paper's pseudo-code, with the authors'
per-sub-layer module layout (N separate blocks called in a Python loop). Tests only."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d, bias=bias)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(d, 3 * d, bias=bias)
        self.attn.c_proj = nn.Linear(d, d, bias=bias)
        self.ln_2 = nn.LayerNorm(d, bias=bias)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(d, ffn, bias=bias)
        self.mlp.c_proj = nn.Linear(ffn, d, bias=bias)

    def attention(self, x):
        b, t, d = x.shape
        q, k, v = self.attn.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        return self.attn.c_proj((att @ v).transpose(1, 2).reshape(b, t, d))

    def ffn(self, x):
        return self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class ReferenceKraken(nn.Module):
    def __init__(self, n_layer, n_sub, d, heads_per_sub, vocab, block, bias=False):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(vocab, d)
        self.transformer.wpe = nn.Embedding(block, d)
        self.transformer.h = nn.ModuleList(
            nn.ModuleList(Block(d, heads_per_sub, 2 * d, bias) for _ in range(n_layer)) for _ in range(n_sub))
        self.transformer.conjunction = nn.Linear(n_sub * d, d, bias=bias)
        self.transformer.ln_f = nn.LayerNorm(d, bias=bias)
        self.n_layer, self.n_sub = n_layer, n_sub
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.05)

    def forward(self, idx):
        tr = self.transformer
        x = tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1]))
        ys = []
        for i in range(self.n_sub):
            blk = tr.h[i][0]
            a = x + blk.attention(blk.ln_1(x))
            ys.append(a + blk.ffn(a))
        for layer in range(1, self.n_layer):
            s = sum(ys)
            new = []
            for i in range(self.n_sub):
                blk = tr.h[i][layer]
                a = ys[i] + blk.attention(blk.ln_1(ys[i]))
                new.append(a + blk.ffn(a - ys[i] + s))
            ys = new
        z = tr.conjunction(torch.cat(ys, dim=-1))
        return tr.ln_f(z) @ tr.wte.weight.t()
