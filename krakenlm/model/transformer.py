"""One Transformer for gpt, parallel-block, Kraken and Ladder Residual models, on one device or as one
rank's shard.

Forward schedule per layer l (streams y: [S, B*T, d]; S local sub-layers; GPT/parallel/ladder have S = 1):

    kraken / gpt:  h = Σshard Attn(LN1(y));  a = y + h
                   ffn_in = h + Σsub y_prev  (kraken, l >= 1: awaited here, issued at the end of l-1)
                          = a                (otherwise)
                   y = a + Σshard FFN(LN2(ffn_in))
    parallel:      y = y + Σshard (Attn(LN(y)) + FFN(LN(y)))
    ladder:        modules u_1, u_2, ... (attention, MLP, attention, ...); a ladder module k reads
                   x + u_1 + ... + u_{k-2}: the previous module's output u_{k-1} is still in its
                   AllReduce (issued async) while module k computes, and is added right before
                   module k+1 (Zhang et al. 2025). Standard layers below ``ladder_start`` read
                   x + u_1 + ... + u_{k-1} (the gpt schedule).

Σshard sums partial matmul outputs over the ranks sharing one sub-layer (Megatron TP); Σsub sums
sub-layer outputs over ranks holding different sub-layers (Kraken's one exchange per layer). Both
go through a Comm object: on a single device they are identities / local sums, so the single-device
model and every tensor-parallel rank run this same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from krakenlm.config import ModelConfig
from krakenlm.errors import ConfigError, InputError
from krakenlm.model.attention import check_kernel
from krakenlm.model.layers import (
    NO_HOOKS,
    AttentionShape,
    AttentionStep,
    KVCache,
    NoHooks,
    PairHooks,
    StackedAttention,
    StackedMLP,
    StackedNorm,
    attention_mask,
    decode_mask,
    init_std,
    linear,
    rope_tables,
)
from krakenlm.model.params import ONES, RESIDUAL, ZEROS, lookup


@dataclass(frozen=True)
class Shard:
    """Which slice of the full model an instance holds.

    Sub-layers [sub_start, sub_start + sub_count) of every layer, and within each of them part
    ``part`` of ``parts`` of the heads and FFN columns (Megatron). The full model is Shard.full().
    """

    sub_start: int = 0
    sub_count: int = 1
    part: int = 0
    parts: int = 1

    @staticmethod
    def full(config: ModelConfig) -> Shard:
        return Shard(0, config.n_sub, 0, 1)

    def attention(self, config: ModelConfig) -> AttentionShape:
        kv = config.kv_heads
        return AttentionShape(config.n_head // self.parts, kv // self.parts if kv % self.parts == 0 else 1,
                              config.head_size)

    def validate(self, config: ModelConfig) -> None:
        """Raise ConfigError if the model cannot be split this way."""
        if config.n_sub % self.sub_count or self.sub_start % self.sub_count or self.sub_start >= config.n_sub:
            raise ConfigError(f"tp: cannot place sub-layers [{self.sub_start}, {self.sub_start + self.sub_count}) "
                              f"of a model with n_sub={config.n_sub}")
        for what, n in (("n_head", config.n_head), ("ffn_size", config.ffn_size), ("n_embd", config.n_embd)):
            if n % self.parts:
                raise ConfigError(f"tp: {what}={n} is not divisible by the {self.parts} ranks sharing a sub-layer")
        kv = config.kv_heads
        if kv % self.parts and self.parts % kv:
            raise ConfigError(f"tp: n_kv_head={kv} must divide or be divisible by {self.parts} ranks per sub-layer")


class Pending(Protocol):
    def wait(self) -> Tensor: ...


class Comm(Protocol):
    """Where a forward pass communicates. Implementations: LocalComm (one device) and the
    torch.distributed runtime in krakenlm.parallel (Megatron / Kraken plans, and the partitioning
    layouts of krakenlm.parallel.layouts, which also use the layout hooks below).

    reduce_shard: the Megatron shard sum, blocking. reduce_shard_async: the same sum issued now and
    awaited by the caller (Ladder Residual's per-module AllReduce). exchange: Kraken's sum over
    sub-layers, issued async. reduce_conj: the conjunction's sum. agree: rank 0's tokens for everyone."""

    def reduce_shard(self, x: Tensor) -> Tensor: ...

    def reduce_shard_async(self, x: Tensor) -> Pending: ...

    def exchange(self, y: Tensor) -> Pending: ...

    def reduce_conj(self, x: Tensor) -> Tensor: ...

    def layer_begin(self, layer: int) -> None: ...

    def agree(self, tokens: Tensor) -> Tensor: ...

    # Layout hooks (PlainComm: one replicated residual stream, identity).
    def begin(self, phase: str, batch: int, t: int, step: AttentionStep) -> AttentionStep: ...

    def pair(self, name: str) -> PairHooks: ...

    def residual(self, y: Tensor) -> Tensor: ...

    def head(self, y: Tensor, batch: int, t: int, logits_at: str | Tensor) -> Tensor: ...

    def weights(self, layer: Layer, index: int) -> Layer: ...


class _Ready:
    def __init__(self, value: Tensor) -> None:
        self.value = value

    def wait(self) -> Tensor:
        return self.value


def select_positions(y: Tensor, batch: int, t: int, logits_at: str | Tensor) -> Tensor:
    """Streams y [S, B*t, d] -> [S, B, t_out, d] at the positions whose logits are wanted."""
    s, _, d = y.shape
    y = y.view(s, batch, t, d)
    if isinstance(logits_at, Tensor):
        return y[:, torch.arange(batch, device=y.device), logits_at].unsqueeze(2)
    if logits_at == "last":
        return y[:, :, -1:]
    if logits_at != "all":
        raise ValueError(f"logits_at must be 'all', 'last' or an index tensor, got {logits_at!r}")
    return y


class _ShardSum(NoHooks):
    """A matrix pair under Megatron: partial out-projections summed by ``reduce_shard``."""

    def __init__(self, comm: PlainComm) -> None:
        self.comm = comm

    def leave(self, h: Tensor) -> Tensor:
        return self.comm.reduce_shard(h)


class PlainComm:
    """The layout hooks of a replicated residual stream (one device, Megatron, Kraken): every pair's
    only collective is ``reduce_shard``."""

    def reduce_shard(self, x: Tensor) -> Tensor:
        return x

    def begin(self, phase: str, batch: int, t: int, step: AttentionStep) -> AttentionStep:
        return step

    def pair(self, name: str) -> PairHooks:
        return _ShardSum(self)

    def residual(self, y: Tensor) -> Tensor:
        return y

    def head(self, y: Tensor, batch: int, t: int, logits_at: str | Tensor) -> Tensor:
        return select_positions(y, batch, t, logits_at)

    def weights(self, layer: Layer, index: int) -> Layer:
        return layer


class LocalComm(PlainComm):
    """Single device: every partial sum is already complete."""

    def pair(self, name: str) -> PairHooks:
        return NO_HOOKS

    def reduce_shard_async(self, x: Tensor) -> Pending:
        return _Ready(x)

    def exchange(self, y: Tensor) -> Pending:
        return _Ready(y.sum(0))

    def reduce_conj(self, x: Tensor) -> Tensor:
        return x

    def layer_begin(self, layer: int) -> None:
        pass

    def agree(self, tokens: Tensor) -> Tensor:
        return tokens


LOCAL = LocalComm()


class Layer(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard) -> None:
        super().__init__()
        s, d = shard.sub_count, config.n_embd
        self.parallel_block = config.arch == "parallel"
        self.ln1 = StackedNorm(s, d, config.norm, config.bias, config.norm_eps)
        self.attn = StackedAttention(s, d, shard.attention(config), config.bias)
        self.ln2 = None if self.parallel_block else StackedNorm(s, d, config.norm, config.bias, config.norm_eps)
        self.mlp = StackedMLP(s, d, config.ffn_size // shard.parts, config.bias, config.mlp)
        # Biases of row-parallel projections are added once, after the shard sum.
        self.proj_bias = nn.Parameter(torch.zeros(s, d)) if config.bias else None
        self.down_bias = nn.Parameter(torch.zeros(s, d)) if config.bias else None


def _add_bias(x: Tensor, bias: Tensor | None) -> Tensor:
    return x if bias is None else x + bias.unsqueeze(1)


class Transformer(nn.Module):
    """gpt | parallel | kraken | ladder decoder; full model or one rank's shard. The LM head (tied to
    the embedding, or untied) is replicated on every rank."""

    def __init__(self, config: ModelConfig, shard: Shard | None = None, *, init: bool = True) -> None:
        super().__init__()
        self.config = config
        self.shard = shard or Shard.full(config)
        self.shard.validate(config)
        d = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, d)
        self.wpe = nn.Embedding(config.block_size, d) if config.position == "learned" else None
        self.layers = nn.ModuleList(Layer(config, self.shard) for _ in range(config.n_layer))
        if config.has_conjunction:
            self.conj_weight = nn.Parameter(torch.empty(d, self.shard.sub_count * d // self.shard.parts))
            self.conj_bias = nn.Parameter(torch.zeros(d)) if config.bias else None
        self.ln_f = StackedNorm(1, d, config.norm, config.bias, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        if init:
            self.reset_parameters()

    @property
    def attention_shape(self) -> AttentionShape:
        return self.layers[0].attn.shape

    def pad_heads(self, multiple: int) -> Transformer:
        """Round every head up to a multiple of ``multiple`` with zeros (exact; an inference-time
        kernel choice, checkpoints keep the true shapes). Head size 113 -> 128, 60 -> 64."""
        if multiple < 1:
            raise ConfigError(f"pad_heads: multiple must be >= 1, got {multiple}")
        size = self.config.padded_head_size(multiple)
        if size != self.config.head_size:
            if self.config.position == "rope":
                raise ConfigError("pad_heads: not supported with rope (rotation pairs would move)")
            for layer in self.layers:
                layer.attn.pad_heads(size)
        return self

    def set_attention_kernel(self, kernel: str) -> Transformer:
        """The causal attention kernel of every layer: auto (measured fastest here), sdpa or blocked[:rows]."""
        check_kernel(kernel)
        for layer in self.layers:
            layer.attn.kernel = kernel
        return self

    def reset_parameters(self, seed: int | None = None) -> None:
        """The paper's init (N(0, 0.02), residual projections N(0, 0.02/sqrt(2LN)), norms 1, biases 0)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        cfg = self.config
        for name, p in self.named_parameters():
            init = lookup(name)[0].init  # the kind each parameter starts as: krakenlm.model.params
            if init in (ONES, ZEROS):
                nn.init.ones_(p) if init == ONES else nn.init.zeros_(p)
                continue
            std = init_std(init == RESIDUAL, cfg.n_layer, cfg.n_sub)
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        param = self.wte.weight
        return KVCache(self.config.n_layer, self.shard.sub_count, batch, self.attention_shape,
                       max_len or self.config.block_size, param.dtype, param.device)

    def forward(self, idx: Tensor, *, positions: Tensor | None = None, valid: Tensor | None = None,
                cache: KVCache | None = None, start: int = 0, logits_at: str | Tensor = "all",
                comm: Comm = LOCAL) -> Tensor:
        """Logits for token ids idx [B, T] (a full forward, or a prefill into a KV cache).

        positions [B, T]: position ids (default start, start+1, ...); valid [B, T]: False at left
        padding; cache: written at slots [start, start + T) of every row, attention reads slots
        [0, start + T) (start = 0 starts the rows afresh); logits_at: "all", "last", or an index
        tensor [B] of the position per sequence whose logits are wanted.
        """
        batch, t = idx.shape
        limit = self.config.block_size if cache is None else min(cache.max_len, self.config.block_size)
        if start + t > limit:
            raise InputError(f"sequence of {start + t} tokens exceeds the context of {limit}")
        if positions is None:
            positions = torch.arange(start, start + t, device=idx.device).expand(batch, t)
        streams = self.shard.sub_count
        mask = None
        if cache is not None:
            cache.valid[:, start:start + t] = True if valid is None else valid
            if start == 0:
                cache.valid[:, t:] = False  # a reused row forgets its previous sequence
            if start > 0 or valid is not None:
                mask = attention_mask(cache.valid, t, start, streams)
        elif valid is not None:
            mask = attention_mask(valid, t, 0, streams)
        step = AttentionStep(cache, start, None, start + t, mask)
        return self._run(idx, positions, step, logits_at, comm, "prefill")

    def decode(self, tokens: Tensor, slots: Tensor, positions: Tensor, cache: KVCache, *, keys: int | None = None,
               comm: Comm = LOCAL) -> Tensor:
        """One decode step: row b's token [B] is written at cache slot slots[b] with position id
        positions[b]; returns logits [B, vocab]. Everything stays on the device (no host reads), and
        shapes depend only on the cache, so the step compiles once and replays as a CUDA graph.
        Attention reads slots [0, keys) (default: the whole cache)."""
        keys = cache.max_len if keys is None else keys
        cache.valid.scatter_(1, slots.unsqueeze(1), True)
        step = AttentionStep(cache, 0, slots, keys, decode_mask(cache.valid, keys, self.shard.sub_count))
        return self._run(tokens.unsqueeze(1), positions.unsqueeze(1), step, "all", comm, "decode")[:, 0]

    def _run(self, idx: Tensor, positions: Tensor, step: AttentionStep, logits_at: str | Tensor,
             comm: Comm, phase: str) -> Tensor:
        cfg = self.config
        batch, t = idx.shape
        step = comm.begin(phase, batch, t, step)
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        rope = rope_tables(positions, cfg.head_size, cfg.rope_theta) if cfg.position == "rope" else None
        y = comm.residual(x.reshape(1, batch * t, cfg.n_embd))  # layer 0: every sub-layer reads the embedding
        if cfg.arch == "ladder":
            return self._head(self._ladder(y, t, rope, step, comm), batch, t, logits_at, comm)
        pending = None
        for i, layer in enumerate(self.layers):
            comm.layer_begin(i)
            y = self._layer(comm.weights(layer, i), i, y, pending, t, rope, step, comm)
            pending = comm.exchange(y) if cfg.arch == "kraken" and i < cfg.n_layer - 1 else None
        return self._head(y, batch, t, logits_at, comm)

    def _layer(self, layer: Layer, index: int, y: Tensor, pending: Pending | None, t: int,
               rope: tuple[Tensor, Tensor] | None, step: AttentionStep, comm: Comm) -> Tensor:
        if layer.parallel_block:
            pair = comm.pair("block")
            h_in = pair.norm(layer.ln1, y)
            out = pair.leave(layer.attn(h_in, t, rope, step, index, pair) + layer.mlp(h_in, pair))
            return _add_bias(_add_bias(y + out, pair.local(layer.proj_bias)), pair.local(layer.down_bias))
        pair = comm.pair("attn")
        h = _add_bias(pair.leave(layer.attn(pair.norm(layer.ln1, y), t, rope, step, index, pair)),
                      pair.local(layer.proj_bias))
        a = y + h
        ffn_in = a if pending is None else h + pending.wait().unsqueeze(0)
        pair = comm.pair("ffn")
        return a + _add_bias(pair.leave(layer.mlp(pair.norm(layer.ln2, ffn_in), pair)), pair.local(layer.down_bias))

    def _ladder(self, y: Tensor, t: int, rope: tuple[Tensor, Tensor] | None, step: AttentionStep,
                comm: Comm) -> Tensor:
        """The Ladder Residual schedule, module by module (attention, MLP, attention, ...).

        A module whose successor is a ladder module (and the last module, when it is one) issues its
        AllReduce asynchronously; a ladder module k first adds every finished output but the previous
        one (u_{k-1}, still in flight), so u_{k-1} is awaited right before module k+1 computes and the
        last two are awaited after the last module, as the paper's code does. Other modules add
        everything first and reduce blocking. Bias of a row-parallel projection joins after its sum.
        """
        start, last = self.config.ladder_start, 2 * len(self.layers) - 1
        inflight: list[tuple[Pending, Tensor | None]] = []
        for i, layer in enumerate(self.layers):
            comm.layer_begin(i)
            layer = comm.weights(layer, i)
            for k, (norm, bias) in enumerate(((layer.ln1, layer.proj_bias), (layer.ln2, layer.down_bias))):
                index = 2 * i + k
                while len(inflight) > (1 if i >= start else 0):
                    pending, done_bias = inflight.pop(0)
                    y = y + _add_bias(pending.wait(), done_bias)
                h = norm(y)
                out = layer.attn(h, t, rope, step, i) if k == 0 else layer.mlp(h)
                if min(index + 1, last) // 2 >= start:
                    inflight.append((comm.reduce_shard_async(out), bias))
                else:
                    inflight.append((_Ready(comm.reduce_shard(out)), bias))
        for pending, done_bias in inflight:
            y = y + _add_bias(pending.wait(), done_bias)
        return y

    def _head(self, y: Tensor, batch: int, t: int, logits_at: str | Tensor, comm: Comm) -> Tensor:
        y = comm.head(y, batch, t, logits_at)  # [S, B, t_out, d], whole rows on every rank
        s, _, t_out, d = y.shape
        if self.config.has_conjunction:
            shard = self.shard
            width = d // shard.parts
            cols = y[..., shard.part * width:(shard.part + 1) * width]  # [S, B, t, d/parts]
            z = cols.permute(1, 2, 0, 3).reshape(batch * t_out, s * width)
            z = linear(z, self.conj_weight)
            z = comm.reduce_conj(z)
            if self.conj_bias is not None:
                z = z + self.conj_bias
            z = z.unsqueeze(0)
        else:
            z = y.reshape(1, batch * t_out, d)
        z = self.ln_f(z)[0]
        logits = linear(z, self.wte.weight if self.lm_head is None else self.lm_head.weight)
        return logits.view(batch, t_out, -1)

