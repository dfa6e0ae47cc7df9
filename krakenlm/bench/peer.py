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
from krakenlm.model.params import foreign_state, owner_of, qkv_blocks


class _QKV(nn.Module):
    """The fused q|k|v projection kept as three Linears, so a column split keeps whole heads."""

    def __init__(self, d: int, bias: bool) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d, bias=bias) for _ in range(3))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.q(h), self.k(h), self.v(h)

    def load(self, attr: str, fused: Tensor, blocks: list[tuple[int, int]]) -> None:
        """Copy the fused weight or bias ``fused`` (rows q|k|v, krakenlm.model.params.qkv_blocks)."""
        for lin, (a, b) in zip((self.q, self.k, self.v), blocks, strict=True):
            getattr(lin, attr).copy_(fused[a:b])


class _Attention(nn.Module):
    def __init__(self, d: int, head_size: int, bias: bool) -> None:
        super().__init__()
        self.head_size = head_size
        self.c_attn = _QKV(d, bias)
        self.c_proj = nn.Linear(d, d, bias=bias)

    def forward(self, h: Tensor) -> Tensor:
        b, t, _ = h.shape
        # After a column split each rank holds a whole number of heads: count them locally.
        q, k, v = (x.view(b, t, -1, self.head_size).transpose(1, 2) for x in self.c_attn(h))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1).transpose(1, 2).reshape(b, t, -1)
        return self.c_proj(att)


class _MLP(nn.Module):
    def __init__(self, d: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class _Block(nn.Module):
    def __init__(self, d: int, hidden: int, head_size: int, bias: bool, eps: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, eps=eps, bias=bias)
        self.attn = _Attention(d, head_size, bias)
        self.ln_2 = nn.LayerNorm(d, eps=eps, bias=bias)
        self.mlp = _MLP(d, hidden, bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PeerGPT(nn.Module):
    """A plain GPT (learned positions, GELU MLP, multi-head attention) with a tied LM head, its modules
    named as nanoGPT names them (krakenlm.model.params), q|k|v apart."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        plain = config.arch == "gpt" and config.position == "learned" and config.mlp == "gelu"
        if not plain or config.kv_heads != config.n_head:
            raise ConfigError("peer: the DTensor peer covers standard GPTs only (learned positions, GELU, MHA)")
        d = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, d)
        self.wpe = nn.Embedding(config.block_size, d)
        self.h = nn.ModuleList(_Block(d, config.ffn_size, config.head_size, config.bias, config.norm_eps)
                               for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(d, eps=config.norm_eps, bias=config.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits of the last position (what time-to-first-token needs)."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x[:, -1:]), self.wte.weight)

    @torch.no_grad()
    def load_from(self, ours: Transformer) -> PeerGPT:
        """Copy the weights of our full (unsharded) model, through its nanoGPT names."""
        blocks = qkv_blocks(ours.config)
        for name, t in foreign_state(ours.state_dict(), ours.config, "nanogpt").items():
            owner_name, attr = owner_of(name)
            owner = self.get_submodule(owner_name)
            if isinstance(owner, _QKV):
                owner.load(attr, t, blocks)
            else:
                getattr(owner, attr).copy_(t)
        return self


def build_peer(config: ModelConfig, seed: int, dtype: torch.dtype, world: int, device: torch.device) -> PeerGPT:
    """The peer with our seeded weights, Megatron-sharded over all ranks by parallelize_module."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from krakenlm.source import build_model

    if config.n_head % world or config.ffn_size % world:
        raise ConfigError(f"peer: heads ({config.n_head}) and FFN width must divide over {world} ranks")
    peer = PeerGPT(config).load_from(build_model(config=config, seed=seed)).to(device=device, dtype=dtype).eval()
    mesh = init_device_mesh(device.type, (world,))
    plan = {"attn.c_attn.q": ColwiseParallel(), "attn.c_attn.k": ColwiseParallel(), "attn.c_attn.v": ColwiseParallel(),
            "attn.c_proj": RowwiseParallel(), "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel()}
    for block in peer.h:
        parallelize_module(block, mesh, plan)
    return peer
