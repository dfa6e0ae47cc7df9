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
go through a Comm object (four sums, nothing else): on a single device they are identities / local
sums, so the single-device model and every tensor-parallel rank run this same code. Pope et al.'s
partitioning layouts and int8 weights are transformations of a built model (modules swapped in by
krakenlm.parallel.layout_comm and krakenlm.model.quant), not branches of this forward.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from krakenlm.config import ModelConfig
from krakenlm.errors import ConfigError, InputError
from krakenlm.model.attention import check_kernel
from krakenlm.model.gemm import LinearForms
from krakenlm.model.layers import (
    DEFAULT_FORMS,
    AttentionShape,
    AttentionStep,
    KVCache,
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
from krakenlm.model.sharding import Shard


class Pending(Protocol):
    def wait(self) -> Tensor: ...


class Comm(Protocol):
    """The model's whole contract with communication: the four sums its forward issues. LocalComm is one
    device; krakenlm.parallel implements it over torch.distributed (DistComm for Megatron / Kraken /
    Ladder, and the partitioning layouts, whose other collectives live in modules a plan installs).

    reduce: the Megatron shard sum of a pair's partial out-projection, blocking; ``site`` names the pair
    ("attn", "ffn", or a parallel block's fused "block"). reduce_async: the same sum issued now and
    awaited where the model calls ``wait`` (Ladder Residual). exchange: Kraken's sum over sub-layers,
    issued at the end of a layer and awaited before the next layer's FFN. reduce_conj: the conjunction's
    sum over every rank. gather_vocab: every rank's slice of the logits (``Shard.vocab_part``, in rank
    order) joined into the whole vocabulary, when the ranks split the LM head."""

    def reduce(self, x: Tensor, site: str) -> Tensor: ...

    def reduce_async(self, x: Tensor, site: str) -> Pending: ...

    def exchange(self, y: Tensor) -> Pending: ...

    def reduce_conj(self, x: Tensor) -> Tensor: ...

    def gather_vocab(self, x: Tensor, vocab: int) -> Tensor: ...


class Ready:
    """A sum that is already complete (one device, a group of one, blocking mode)."""

    def __init__(self, value: Tensor) -> None:
        self.value = value

    def wait(self) -> Tensor:
        return self.value


class LocalComm:
    """Single device: every partial sum is already complete; Kraken's streams are summed locally."""

    def reduce(self, x: Tensor, site: str) -> Tensor:
        return x

    def reduce_async(self, x: Tensor, site: str) -> Pending:
        return Ready(x)

    def exchange(self, y: Tensor) -> Pending:
        return Ready(y.sum(0))

    def reduce_conj(self, x: Tensor) -> Tensor:
        return x

    def gather_vocab(self, x: Tensor, vocab: int) -> Tensor:
        return x


LOCAL = LocalComm()
SPLIT_HEAD_ROWS = 64  # rows up to which split ranks project only their vocabulary slice


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


def _add_bias(x: Tensor, bias: Tensor | None) -> Tensor:
    return x if bias is None else x + bias.unsqueeze(1)


class Layer(nn.Module):
    """One gpt / parallel / Kraken layer (the module docstring's schedule). Biases of row-parallel
    projections are added once, after the shard sum."""

    def __init__(self, config: ModelConfig, shard: Shard, index: int) -> None:
        super().__init__()
        s, d = shard.sub_count, config.n_embd
        self.parallel_block = config.arch == "parallel"
        self.ln1 = StackedNorm(s, d, config.norm, config.bias, config.norm_eps)
        self.attn = StackedAttention(s, d, shard.attention(config), config.bias, index)
        self.ln2 = None if self.parallel_block else StackedNorm(s, d, config.norm, config.bias, config.norm_eps)
        self.mlp = StackedMLP(s, d, config.ffn_size // shard.parts, config.bias, config.mlp)
        self.proj_bias = nn.Parameter(torch.zeros(s, d)) if config.bias else None
        self.down_bias = nn.Parameter(torch.zeros(s, d)) if config.bias else None

    def forward(self, y: Tensor, step: AttentionStep, pending: Pending | None = None, *, comm: Comm) -> Tensor:
        """Streams y [S, B*t, d] -> the layer's output; ``pending``: Kraken's exchange of the previous layer."""
        if self.ln2 is None:
            h = self.ln1(y)
            out = comm.reduce(self.attn(h, step) + self.mlp(h), "block")
            return _add_bias(_add_bias(y + out, self.proj_bias), self.down_bias)
        h = _add_bias(comm.reduce(self.attn(self.ln1(y), step), "attn"), self.proj_bias)
        a = y + h
        ffn_in = a if pending is None else h + pending.wait().unsqueeze(0)
        return a + _add_bias(comm.reduce(self.mlp(self.ln2(ffn_in)), "ffn"), self.down_bias)


class LadderLayer(Layer):
    """A layer of a ladder model, module by module (attention, then MLP).

    A module whose successor is a ladder module (and the last module, when it is one) issues its
    AllReduce asynchronously; a ladder module k first adds every finished output but the previous
    one (u_{k-1}, still in flight), so u_{k-1} is awaited right before module k+1 computes and the
    last two are awaited after the last module, as the paper's code does. Other modules add
    everything first and reduce blocking."""

    def __init__(self, config: ModelConfig, shard: Shard, index: int) -> None:
        super().__init__(config, shard, index)
        start, last = config.ladder_start, index == config.n_layer - 1
        self.ladder = index >= start
        self.next_ladder = self.ladder if last else index + 1 >= start  # the MLP's successor

    def forward(self, y: Tensor, step: AttentionStep, pending: list[tuple[Pending, Tensor | None]] | None = None,
                *, comm: Comm) -> Tensor:
        """``pending``: the modules' sums still in flight with their biases (updated in place)."""
        assert pending is not None and self.ln2 is not None
        modules = ((self.ln1, "attn", self.proj_bias, self.ladder), (self.ln2, "ffn", self.down_bias, self.next_ladder))
        for norm, site, bias, overlap in modules:
            while len(pending) > (1 if self.ladder else 0):
                done, done_bias = pending.pop(0)
                y = y + _add_bias(done.wait(), done_bias)
            h = norm(y)
            out = self.attn(h, step) if site == "attn" else self.mlp(h)
            pending.append((comm.reduce_async(out, site) if overlap else Ready(comm.reduce(out, site)), bias))
        return y


class Transformer(nn.Module):
    """gpt | parallel | kraken | ladder decoder; full model or one rank's shard. The LM head (tied to
    the embedding, or untied) is held whole on every rank; with ``head_split`` (an engine's ranks set it)
    each rank projects only its slice of the vocabulary for up to ``SPLIT_HEAD_ROWS`` rows (decode steps,
    a prefill's last positions) and the slices are gathered: each rank then streams 1/N of the head's
    weights (GPT-2's head is a third of its bytes), as Megatron's vocabulary-parallel output layer does.
    More rows (scoring every position) project the whole head locally: gathering their logits would cost
    more than the rows' share of the GEMM."""

    def __init__(self, config: ModelConfig, shard: Shard | None = None, *, init: bool = True) -> None:
        super().__init__()
        self.config = config
        self.shard = shard or Shard.full(config)
        self.shard.validate(config)
        d = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, d)
        self.wpe = nn.Embedding(config.block_size, d) if config.position == "learned" else None
        kind = LadderLayer if config.arch == "ladder" else Layer
        self.layers = nn.ModuleList(kind(config, self.shard, i) for i in range(config.n_layer))
        if config.has_conjunction:
            self.conj_weight = nn.Parameter(torch.empty(d, self.shard.sub_count * d // self.shard.parts))
            self.conj_bias = nn.Parameter(torch.zeros(d)) if config.bias else None
        self.ln_f = StackedNorm(1, d, config.norm, config.bias, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        self.forms = DEFAULT_FORMS  # the conjunction's and the head's linear forms (set_forms)
        self.head_split = False  # the ranks split the LM head's vocabulary (the class docstring)
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
        """The causal attention kernel of every layer: sdpa or blocked[:rows] (``auto`` is resolved by
        whoever builds the run: krakenlm.choices)."""
        if check_kernel(kernel) == "auto":
            raise ConfigError("attention: 'auto' is measured when an engine or trainer is built "
                              "(krakenlm.choices); a model runs a named kernel")
        for layer in self.layers:
            layer.attn.kernel = kernel
        return self

    def set_forms(self, attention: str, linear: str | tuple[str, ...], gelu: str, row: str = "reduce") -> Transformer:
        """The measured choices an engine or trainer resolved (krakenlm.choices.Choices), as plain names;
        ``linear``: one few-row form, or one per row bucket (1, 2, 4, ... rows)."""
        self.set_attention_kernel(attention)
        self.forms = LinearForms((linear,) if isinstance(linear, str) else tuple(linear), row)
        for module in self.modules():
            if isinstance(module, (StackedAttention, StackedMLP)):
                module.forms = self.forms
            if isinstance(module, StackedMLP):
                module.gelu = gelu
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
        step = AttentionStep(batch, t, self._rope(positions), cache, start, None, start + t, mask)
        return self._run(idx, positions, step, logits_at, comm)

    def decode(self, tokens: Tensor, slots: Tensor, positions: Tensor, cache: KVCache, *, keys: int | None = None,
               comm: Comm = LOCAL) -> Tensor:
        """One decode step: row b's token [B] is written at cache slot slots[b] with position id
        positions[b]; returns logits [B, vocab]. Everything stays on the device (no host reads), and
        shapes depend only on the cache, so the step compiles once and replays as a CUDA graph.
        Attention reads slots [0, keys) (default: the whole cache)."""
        keys = cache.max_len if keys is None else keys
        cache.valid.scatter_(1, slots.unsqueeze(1), True)
        positions = positions.unsqueeze(1)
        step = AttentionStep(tokens.shape[0], 1, self._rope(positions), cache, 0, slots, keys,
                             decode_mask(cache.valid, keys, self.shard.sub_count))
        return self._run(tokens.unsqueeze(1), positions, step, "all", comm)[:, 0]

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor] | None:
        cfg = self.config
        return rope_tables(positions, cfg.head_size, cfg.rope_theta) if cfg.position == "rope" else None

    def _run(self, idx: Tensor, positions: Tensor, step: AttentionStep, logits_at: str | Tensor,
             comm: Comm) -> Tensor:
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        y = x.reshape(1, -1, x.shape[-1])  # layer 0: every sub-layer reads the embedding
        if self.config.arch == "ladder":
            inflight: list[tuple[Pending, Tensor | None]] = []
            for layer in self.layers:
                y = layer(y, step, inflight, comm=comm)
            for pending, bias in inflight:
                y = y + _add_bias(pending.wait(), bias)
            return self._head(y, step, logits_at, comm)
        pending = None
        for i, layer in enumerate(self.layers):
            y = layer(y, step, pending, comm=comm)
            pending = comm.exchange(y) if self.config.arch == "kraken" and i < self.config.n_layer - 1 else None
        return self._head(y, step, logits_at, comm)

    def _head(self, y: Tensor, step: AttentionStep, logits_at: str | Tensor, comm: Comm) -> Tensor:
        batch = step.batch
        y = select_positions(y, batch, step.t, logits_at)  # [S, B, t_out, d]
        s, _, t_out, d = y.shape
        if self.config.has_conjunction:
            shard = self.shard
            width = d // shard.parts
            cols = y[..., shard.part * width:(shard.part + 1) * width]  # [S, B, t, d/parts]
            z = cols.permute(1, 2, 0, 3).reshape(batch * t_out, s * width)
            z = comm.reduce_conj(linear(z, self.conj_weight, self.forms))
            if self.conj_bias is not None:
                z = z + self.conj_bias
            z = z.unsqueeze(0)
        else:
            z = y.reshape(1, batch * t_out, d)
        logits = self._logits(self.ln_f(z)[0], comm)
        return logits.view(batch, t_out, -1)

    def _logits(self, z: Tensor, comm: Comm) -> Tensor:
        weight = self.wte.weight if self.lm_head is None else self.lm_head.weight
        if self.head_split and isinstance(weight, Tensor) and z.shape[0] <= SPLIT_HEAD_ROWS:
            a, b = self.shard.vocab_part(self.config)
            return comm.gather_vocab(linear(z, weight[a:b], self.forms), self.config.vocab_size)
        return linear(z, weight, self.forms)
