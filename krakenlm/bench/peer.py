"""The PyTorch-native peer: the same standard GPT, sharded by DTensor's parallelize_module.

Our model stores fused, stacked weights; DTensor's Colwise/Rowwise styles want plain nn.Linear
modules, so the peer is a textbook GPT (separate q/k/v so a column split keeps whole heads) that
copies our weights. Timing it next to our runtime tells whether our hand-written tensor parallelism
costs or saves anything against the framework's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from krakenlm.config import ModelConfig
from krakenlm.errors import ConfigError
from krakenlm.model import Transformer


class _Block(nn.Module):
    def __init__(self, d: int, hidden: int, head_size: int, bias: bool, eps: float) -> None:
        super().__init__()
        self.head_size, self.eps = head_size, eps
        self.ln_1 = nn.LayerNorm(d, eps=eps, bias=bias)
        self.q, self.k, self.v = (nn.Linear(d, d, bias=bias) for _ in range(3))
        self.attn_proj = nn.Linear(d, d, bias=bias)
        self.ln_2 = nn.LayerNorm(d, eps=eps, bias=bias)
        self.c_fc = nn.Linear(d, hidden, bias=bias)
        self.mlp_proj = nn.Linear(hidden, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        h = self.ln_1(x)
        # After a column split each rank holds a whole number of heads: count them locally.
        q, k, v = (lin(h).view(b, t, -1, self.head_size).transpose(1, 2) for lin in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1).transpose(1, 2).reshape(b, t, -1)
        x = x + self.attn_proj(att)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class PeerGPT(nn.Module):
    """A plain GPT (learned positions, GELU MLP, multi-head attention) with a tied LM head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        plain = config.arch == "gpt" and config.position == "learned" and config.mlp == "gelu"
        if not plain or config.kv_heads != config.n_head:
            raise ConfigError("peer: the DTensor peer covers standard GPTs only (learned positions, GELU, MHA)")
        d = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, d)
        self.wpe = nn.Embedding(config.block_size, d)
        self.blocks = nn.ModuleList(_Block(d, config.ffn_size, config.head_size, config.bias, config.norm_eps)
                                    for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(d, eps=config.norm_eps, bias=config.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits of the last position (what time-to-first-token needs)."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x[:, -1:]), self.wte.weight)

    @torch.no_grad()
    def load_from(self, ours: Transformer) -> PeerGPT:
        """Copy the weights of our full (unsharded) model."""
        d = ours.config.n_embd
        self.wte.weight.copy_(ours.wte.weight)
        self.wpe.weight.copy_(ours.wpe.weight)
        _copy_norm(self.ln_f, ours.ln_f)
        for block, layer in zip(self.blocks, ours.layers, strict=True):
            _copy_norm(block.ln_1, layer.ln1)
            _copy_norm(block.ln_2, layer.ln2)
            for i, lin in enumerate((block.q, block.k, block.v)):
                lin.weight.copy_(layer.attn.qkv_weight[0, i * d:(i + 1) * d])
                if lin.bias is not None:
                    lin.bias.copy_(layer.attn.qkv_bias[0, i * d:(i + 1) * d])
            _copy_linear(block.attn_proj, layer.attn.proj_weight, layer.proj_bias)
            _copy_linear(block.c_fc, layer.mlp.up_weight, layer.mlp.up_bias)
            _copy_linear(block.mlp_proj, layer.mlp.down_weight, layer.down_bias)
        return self


def _copy_norm(dst: nn.LayerNorm, src: nn.Module) -> None:
    dst.weight.copy_(src.weight[0])
    if dst.bias is not None:
        dst.bias.copy_(src.bias[0])


def _copy_linear(dst: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
    dst.weight.copy_(weight[0])
    if dst.bias is not None:
        dst.bias.copy_(bias[0])


def build_peer(config: ModelConfig, seed: int, dtype: torch.dtype, world: int, device: torch.device) -> PeerGPT:
    """The peer with our seeded weights, Megatron-sharded over all ranks by parallelize_module."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from krakenlm.source import build_model

    if config.n_head % world or config.ffn_size % world:
        raise ConfigError(f"peer: heads ({config.n_head}) and FFN width must divide over {world} ranks")
    peer = PeerGPT(config).load_from(build_model(config=config, seed=seed)).to(device=device, dtype=dtype).eval()
    mesh = init_device_mesh(device.type, (world,))
    plan = {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(), "attn_proj": RowwiseParallel(),
            "c_fc": ColwiseParallel(), "mlp_proj": RowwiseParallel()}
    for block in peer.blocks:
        parallelize_module(block, mesh, plan)
    return peer
