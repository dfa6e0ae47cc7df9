"""A partitioning layout applied to one rank's built model (krakenlm.parallel.layouts has the plan and
its dataflow): per phase, a view of the model whose modules carry the layout's collectives, and the
Comm its forward sums with. The model's forward does not change; what a plan installs on the view:

    wte / wpe   2d-ws: this rank's E chunk of the residual; wg-*: this rank's sequences
    ln1 / ln2   a pair's entry: 2d-ws all-gathers E over yz [+ all-reduces norm statistics over x];
                wg-* all-gathers tokens over the axes not gathered
    attn / mlp  2d-ws: reduce-scatter over x after W_in, all-gather over x before W_out; attn-batch:
                all-to-all of q, k, v to the rank holding each sequence, and of the output back;
                wg-*: the layer's weights all-gathered over the gathered axes first
    biases      2d-ws: the out-projection biases' E chunk
    head        2d-ws: E all-gathered before the final norm; wg-*: the last layer's output all-gathered
and the phase's Comm, whose ``reduce(x, site)`` is the pair's exit: all-reduce over every rank (1d-ws),
reduce-scatter of E over yz (2d-ws) or of tokens over the other axes (wg-*).

Collectives are c10d calls in eager mode and functional collectives while torch.compile traces (the
compiled decode step); a group of one rank issues nothing. Each is recorded in the Ledger when one is attached.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from krakenlm.errors import ConfigError, InputError
from krakenlm.model.layers import (
    AttentionShape,
    AttentionStep,
    KVCache,
    StackedAttention,
    StackedMLP,
    StackedNorm,
    stacked_linear,
)
from krakenlm.model.params import PARAMS, Param, matrix_param
from krakenlm.model.quant import Int8Weight
from krakenlm.model.transformer import Ready, Transformer
from krakenlm.parallel.comm import _guard, broadcast_tokens, watch_layers
from krakenlm.parallel.layouts import (
    GatherPlan,
    PairSplit,
    PhaseLayout,
    RankPlan,
    assemble,
    indices,
    inner_cols,
    inner_rows,
)
from krakenlm.parallel.ledger import Ledger

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class Group:
    """The ranks of one collective and their process group (None for a single rank)."""

    ranks: tuple[int, ...]
    pg: Any

    @property
    def size(self) -> int:
        return len(self.ranks)


def sequence_rows(batch: int, n: int, rank: int) -> tuple[int, int]:
    """Sequences [a, b) of a batch split over n ranks (the first batch % n ranks take one more)."""
    base, extra = divmod(batch, n)
    a = rank * base + min(rank, extra)
    return a, a + base + (rank < extra)


def make_groups(plan: RankPlan) -> dict[tuple[int, ...], Group]:
    """A process group for every mesh-axes set the plan uses (collective: same order on every rank)."""
    mesh = plan.mesh
    axes_sets = {tuple(range(len(mesh.dims)))}
    for split in plan.storage.splits.values():
        axes_sets |= {split.x_axes, tuple(a for a in range(len(mesh.dims)) if a not in split.x_axes)}
    for phase in (plan.layout.prefill, plan.layout.decode):
        if phase.gathered:
            axes_sets |= {plan.gather_axes(phase), plan.rest_axes(phase)}
    out = {}
    for axes in sorted(axes_sets):
        for ranks in mesh.groups(axes):
            if len(ranks) == 1:
                pg = None
            else:
                pg = dist.group.WORLD if len(ranks) == mesh.size else dist.new_group(list(ranks))
            if plan.rank in ranks:
                out[axes] = Group(ranks, pg)
    return out


class Collectives:
    """One phase's collectives over the plan's mesh groups, each recorded in ``ledger`` under ``layer``."""

    def __init__(self, plan: RankPlan, groups: dict[tuple[int, ...], Group], *, no_comm: bool) -> None:
        self.plan, self.groups, self.no_comm = plan, groups, no_comm
        self.ledger: Ledger | None = None
        self.layer = -1  # the layer running (set by LayoutComm.layer_begin); -1: embedding / LM head

    def group(self, axes: tuple[int, ...]) -> Group:
        return self.groups[tuple(axes)]

    @property
    def everyone(self) -> Group:
        return self.group(tuple(range(len(self.plan.mesh.dims))))

    def _log(self, kind: str, group: Group, nbytes: int, site: str, tensor: str = "act") -> None:
        if self.ledger is not None and not torch.compiler.is_compiling():
            self.ledger.record(kind, group.ranks, nbytes, site, self.layer, tensor)

    def all_reduce(self, x: Tensor, group: Group, site: str, tensor: str = "act") -> Tensor:
        if group.size == 1 or self.no_comm:
            return x
        self._log("all_reduce", group, x.numel() * x.element_size(), site, tensor)
        if torch.compiler.is_compiling():
            return funcol.wait_tensor(funcol.all_reduce(x, "sum", group.pg))
        x = x.contiguous()
        _guard(lambda: dist.all_reduce(x, group=group.pg), site)
        return x

    def all_gather(self, x: Tensor, group: Group, dim: int, site: str, tensor: str = "act") -> Tensor:
        """Members' ``x`` concatenated along ``dim`` in rank order."""
        if group.size == 1:
            return x
        self._log("all_gather", group, x.numel() * x.element_size() * group.size, site, tensor)
        if self.no_comm:
            return torch.cat([x] * group.size, dim)
        if torch.compiler.is_compiling():
            return funcol.wait_tensor(funcol.all_gather_tensor(x.contiguous(), dim % x.dim(), group.pg))
        xs = x.movedim(dim, 0).contiguous()
        out = xs.new_empty((group.size * xs.shape[0],) + tuple(xs.shape[1:]))
        _guard(lambda: dist.all_gather_single(out, xs, group=group.pg), site)
        return out.movedim(0, dim)

    def reduce_scatter(self, x: Tensor, group: Group, dim: int, site: str) -> Tensor:
        """Sum over members, this rank keeping its chunk of ``dim`` (split into group.size equal chunks)."""
        if group.size == 1:
            return x
        self._log("reduce_scatter", group, x.numel() * x.element_size(), site)
        k = group.size
        if self.no_comm:
            return x.narrow(dim, group.ranks.index(self.plan.rank) * (x.shape[dim] // k), x.shape[dim] // k)
        if torch.compiler.is_compiling():
            return funcol.wait_tensor(funcol.reduce_scatter_tensor(x.contiguous(), "sum", dim % x.dim(), group.pg))
        xs = x.movedim(dim, 0).contiguous()
        out = xs.new_empty((xs.shape[0] // k,) + tuple(xs.shape[1:]))
        _guard(lambda: dist.reduce_scatter_single(out, xs, group=group.pg), site)
        return out.movedim(0, dim)

    def all_to_all(self, x: Tensor, group: Group, send: list[int], receive: list[int], site: str) -> Tensor:
        """Rows of ``x`` [sum(send), ...]: block i goes to member i; block i of the result came from it."""
        if group.size == 1:
            return x
        self._log("all_to_all", group, x.numel() * x.element_size(), site)
        if self.no_comm:
            return x.new_zeros((sum(receive),) + tuple(x.shape[1:]))
        if torch.compiler.is_compiling():
            return funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), receive, send, group.pg))
        out = x.new_empty((sum(receive),) + tuple(x.shape[1:]))
        _guard(lambda: dist.all_to_all_single(out, x.contiguous(), receive, send, group=group.pg), site)
        return out


class LayoutComm:
    """The model's Comm under one phase's layout: a pair's sum is the layout's exit collective."""

    def __init__(self, collectives: Collectives, phase: PhaseLayout) -> None:
        self.c, self.phase = collectives, phase
        plan, dims = collectives.plan, range(len(collectives.plan.mesh.dims))
        self.yz = {pair: collectives.group(tuple(a for a in dims if a not in split.x_axes))
                   for pair, split in plan.storage.splits.items()}
        self.rest = collectives.group(plan.rest_axes(phase)) if phase.gathered else None

    def reduce(self, x: Tensor, site: str) -> Tensor:
        if self.phase.ffn == "2d-ws":
            return self.c.reduce_scatter(x, self.yz[site], -1, f"{site} leave")
        if self.rest is not None:
            return self.c.reduce_scatter(x, self.rest, 1, f"{site} leave")
        return self.c.all_reduce(x, self.c.everyone, f"{site} leave")

    def reduce_async(self, x: Tensor, site: str) -> Ready:
        return Ready(self.reduce(x, site))

    def exchange(self, y: Tensor) -> Ready:
        raise ConfigError("layout: Kraken models run the 'kraken' layout, not a partitioning layout")

    def reduce_conj(self, x: Tensor) -> Tensor:
        raise ConfigError("layout: Kraken models run the 'kraken' layout, not a partitioning layout")

    def gather_vocab(self, x: Tensor, vocab: int) -> Tensor:
        raise ConfigError("layout: a partitioning layout runs its own LM head (its plan's modules)")

    def layer_begin(self, layer: int) -> None:
        self.c.layer = layer

    def agree(self, tokens: Tensor) -> Tensor:
        return broadcast_tokens(tokens, self.c.no_comm)


# The residual stream's share and the head ---------------------------------------------------------------
class EmbeddingShare(nn.Module):
    """This rank's share of an embedding's output: E columns [a, b) (2d-ws: the residual is split over
    every rank) or, with ``n`` ranks, its sequences (wg-*: whole sequences per rank)."""

    def __init__(self, inner: nn.Module, chunk: tuple[int, int] | None, n: int, rank: int,
                 phase: PhaseLayout) -> None:
        super().__init__()
        self.inner, self.chunk, self.n, self.rank, self.phase = inner, chunk, n, rank, phase

    @property
    def weight(self) -> Any:  # the whole table, for a tied LM head
        return self.inner.weight

    def forward(self, idx: Tensor) -> Tensor:
        if self.chunk is not None:
            return self.inner(idx)[..., self.chunk[0]:self.chunk[1]]
        if idx.shape[0] % self.n:
            raise InputError(f"layout: {self.phase} shards the batch over {self.n} ranks; a batch of {idx.shape[0]} "
                             f"sequences is not divisible by {self.n}")
        a, b = sequence_rows(idx.shape[0], self.n, self.rank)
        return self.inner(idx[a:b])


class GatherNorm(nn.Module):
    """2d-ws head: whole rows of E on every rank (an all-gather over all ranks), then the final norm."""

    def __init__(self, inner: StackedNorm, c: Collectives) -> None:
        super().__init__()
        self.inner, self.c = inner, c

    def forward(self, z: Tensor) -> Tensor:
        self.c.layer = -1  # the LM head's collectives belong to no layer
        return self.inner(self.c.all_gather(z, self.c.everyone, -1, "head"))


def _gather_rows_hook(c: Collectives) -> Any:
    """wg-* head: the last layer's output, every rank's sequences gathered on every rank."""
    def hook(module: nn.Module, args: Any, kwargs: Any, out: Tensor) -> Tensor:
        c.layer = -1
        return c.all_gather(out, c.everyone, 1, "head")
    return hook


# A pair's entry ------------------------------------------------------------------------------------------
class TwoDNorm(nn.Module):
    """2d-ws entry: the residual's E chunks of the yz-group gathered; with E split over x (X > 1) the
    mean and variance (RMSNorm: the mean square) need every chunk: two float32 sums per token."""

    def __init__(self, inner: StackedNorm, c: Collectives, split: PairSplit, pair: str) -> None:
        super().__init__()
        dims = range(len(c.plan.mesh.dims))
        self.inner, self.c, self.pair = inner, c, pair
        self.x = c.group(split.x_axes)
        self.yz = c.group(tuple(a for a in dims if a not in split.x_axes))
        self.e_index = torch.tensor(indices(split.e_block))

    def forward(self, y: Tensor) -> Tensor:
        x = self.c.all_gather(y, self.yz, -1, f"{self.pair} enter")
        ln = self.inner
        if self.x.size == 1:
            return ln(x)
        xf = x.float()
        stats = self.c.all_reduce(torch.stack([xf.sum(-1), (xf * xf).sum(-1)], -1), self.x, f"{self.pair} norm",
                                  tensor="stats")
        width = self.c.plan.config.n_embd
        mean = torch.zeros_like(stats[..., :1]) if ln.rms else stats[..., :1] / width  # RMSNorm: no centering
        var = stats[..., 1:] / width - mean * mean
        out = ((xf - mean) * torch.rsqrt(var + ln.eps)).to(x.dtype)
        index = self.e_index.to(x.device)
        out = out * ln.weight.index_select(-1, index).unsqueeze(1)
        return out if ln.bias is None else out + ln.bias.index_select(-1, index).unsqueeze(1)


class TokensNorm(nn.Module):
    """wg-* entry: the tokens of the ranks that differ on the axes not gathered, then the norm."""

    def __init__(self, inner: StackedNorm, c: Collectives, rest: Group, pair: str) -> None:
        super().__init__()
        self.inner, self.c, self.rest, self.pair = inner, c, rest, pair

    def forward(self, y: Tensor) -> Tensor:
        return self.inner(self.c.all_gather(y, self.rest, 1, f"{self.pair} enter"))


# Inside a pair -------------------------------------------------------------------------------------------
class WeightGather:
    """wg-*: a layer's stored pieces of one matrix all-gathered over the gathered axes and assembled into
    the weight this rank multiplies with; the W_in bias (and int8 scales) indexed from the whole copies
    kept at load (``extras``)."""

    def __init__(self, c: Collectives, phase: PhaseLayout, extras: dict[str, Tensor]) -> None:
        self.c, self.extras = c, extras
        self.plans = c.plan.gathers(phase)
        self.group = c.group(c.plan.gather_axes(phase))

    def weight(self, module: nn.Module, param: Param, index: int) -> Tensor | Int8Weight:
        stored, plan = getattr(module, param.attr), self.plans[param.matrix]
        values = stored.q if isinstance(stored, Int8Weight) else stored
        group = Group(plan.group, self.group.pg)
        flat = self.c.all_gather(values.reshape(-1), group, 0, f"gather {param.matrix}", tensor="weight")
        weight = assemble(plan, flat, tuple(values.shape))
        if not isinstance(stored, Int8Weight):
            return weight
        return Int8Weight(weight, self._rows(f"{param.name(index)}.scale", plan))

    def bias(self, matrix: str, index: int) -> Tensor | None:
        param = next((p for p in PARAMS if p.matrix == matrix and p.bias), None)
        name = None if param is None else param.name(index)
        return None if name not in self.extras else self._rows(name, self.plans[matrix])

    def _rows(self, name: str, plan: GatherPlan) -> Tensor:
        whole = self.extras[name]
        return whole.index_select(1, torch.tensor(plan.rows, device=whole.device))


class PairCollectives:
    """What happens between a pair's matmuls: 2d-ws reduce-scatters the in-projection over x and
    all-gathers the inner activations back before the out-projection (identity otherwise)."""

    def __init__(self, c: Collectives, split: PairSplit, pair: str, two_d: bool) -> None:
        self.c, self.pair = c, pair
        self.x = c.group(split.x_axes) if two_d else None

    def scatter_inner(self, h: Tensor) -> Tensor:
        return h if self.x is None else self.c.reduce_scatter(h, self.x, -1, f"{self.pair} inner rs")

    def gather_inner(self, h: Tensor) -> Tensor:
        return h if self.x is None else self.c.all_gather(h, self.x, -1, f"{self.pair} inner ag")


class LayoutMLP(nn.Module):
    """The FFN of a pair under a layout (the stored module's weights, or gathered ones)."""

    def __init__(self, inner: StackedMLP, inside: PairCollectives, gather: WeightGather | None, index: int) -> None:
        super().__init__()
        self.inner, self.inside, self.gather, self.index = inner, inside, gather, index

    def forward(self, x: Tensor) -> Tensor:
        mlp, inside = self.inner, self.inside
        if self.gather is None:
            return mlp.project_out(inside.gather_inner(mlp.activate(inside.scatter_inner(mlp.project_in(x)))))
        up, down = (self.gather.weight(mlp, matrix_param(m), self.index) for m in ("mlp.up", "mlp.down"))
        hidden = mlp.activate(stacked_linear(x, up, self.gather.bias("mlp.up", self.index)))
        return stacked_linear(hidden, down)


class BatchSharded:
    """attn-batch: q, k and v move from the pair's column split to the rank holding each sequence (with
    every head), and the attention output moves back (all-to-alls over ``group``)."""

    def __init__(self, c: Collectives, phase: PhaseLayout, pair: str) -> None:
        plan, n = c.plan, c.plan.tp
        self.c, self.pair = c, pair
        if phase.gathered:
            self.group = c.group(plan.rest_axes(phase))
            member_plans = {m: RankPlan(plan.config, plan.layout, n, m).gathers(phase) for m in self.group.ranks}
            rows = [list(member_plans[m]["attn.qkv"].rows) for m in self.group.ranks]
            cols = [list(member_plans[m]["attn.proj"].cols) for m in self.group.ranks]
        else:
            self.group = c.everyone
            rows = [indices(inner_rows(plan.config, "attn.qkv", "batch", n, m)) for m in self.group.ranks]
            cols = [indices(inner_cols(plan.config, "attn.proj", "batch", n, m)) for m in self.group.ranks]
        arrived = [i for r in rows for i in r]
        self.to_natural = torch.tensor(sorted(range(len(arrived)), key=arrived.__getitem__))
        self.send_columns = torch.tensor([i for c in cols for i in c])
        self._last: tuple[AttentionStep, AttentionStep] | None = None

    def _counts(self, batch: int) -> list[int]:
        return [b - a for a, b in (sequence_rows(batch, self.c.plan.tp, m) for m in self.group.ranks)]

    def step(self, step: AttentionStep) -> AttentionStep:
        """The forward's step for this rank's sequences (made once per forward, shared by every layer)."""
        tracing = torch.compiler.is_compiling()  # a trace builds its own steps: no memo
        if not tracing and self._last is not None and self._last[0] is step:
            return self._last[1]
        a, b = sequence_rows(step.batch, self.c.plan.tp, self.c.plan.rank)
        mine = AttentionStep(b - a, step.t, None if step.rope is None else (step.rope[0][a:b], step.rope[1][a:b]),
                             None if step.cache is None else step.cache.rows(0, b - a), step.start,
                             None if step.slots is None else step.slots[a:b], step.keys,
                             None if step.mask is None else step.mask[a:b])
        if not tracing:
            self._last = (step, mine)
        return mine

    def to_batch(self, qkv: Tensor, step: AttentionStep, mine: AttentionStep) -> Tensor:
        t, k, rows = step.t, self.group.size, mine.batch
        send = [c * t for c in self._counts(step.batch)]
        out = self.c.all_to_all(qkv[0], self.group, send, [rows * t] * k, f"{self.pair} qkv a2a")
        width = out.shape[-1]  # explicit: a rank may hold no sequence (batch < ranks)
        out = out.view(k, rows * t, width).permute(1, 0, 2).reshape(rows * t, k * width)
        return out.index_select(-1, self.to_natural.to(out.device)).unsqueeze(0)

    def from_batch(self, out: Tensor, step: AttentionStep, mine: AttentionStep) -> Tensor:
        t, k, rows = step.t, self.group.size, mine.batch
        send = out[0].index_select(-1, self.send_columns.to(out.device))
        width = send.shape[-1] // k
        send = send.view(rows * t, k, width).permute(1, 0, 2).reshape(k * rows * t, width)
        back = self.c.all_to_all(send, self.group, [rows * t] * k, [c * t for c in self._counts(step.batch)],
                                 f"{self.pair} out a2a")
        return back.unsqueeze(0)


class LayoutAttention(nn.Module):
    """The attention of a pair under a layout: the stored module's three steps with the layout's
    collectives between them (and gathered weights under wg-*)."""

    def __init__(self, inner: StackedAttention, inside: PairCollectives, batch: BatchSharded | None,
                 gather: WeightGather | None) -> None:
        super().__init__()
        self.inner, self.inside, self.batch, self.gather = inner, inside, batch, gather

    @property
    def shape(self) -> AttentionShape:
        return self.inner.shape

    def forward(self, x: Tensor, step: AttentionStep) -> Tensor:
        attn, index = self.inner, self.inner.index
        if self.gather is None:
            qkv = self.inside.scatter_inner(attn.project_in(x))
        else:
            qkv = stacked_linear(x, self.gather.weight(attn, matrix_param("attn.qkv"), index),
                                 self.gather.bias("attn.qkv", index))
        if self.batch is None:
            out = attn.attend(qkv, step)
        else:
            mine = self.batch.step(step)
            out = self.batch.from_batch(attn.attend(self.batch.to_batch(qkv, step, mine), mine), step, mine)
        out = self.inside.gather_inner(out)
        if self.gather is None:
            return attn.project_out(out)
        return stacked_linear(out, self.gather.weight(attn, matrix_param("attn.proj"), index))


# The plan applied ----------------------------------------------------------------------------------------
def _shallow(module: nn.Module) -> Any:
    """A copy sharing every parameter and buffer whose submodules, parameters and hooks can be replaced
    without touching the original."""
    out = copy.copy(module)
    for name, value in vars(module).items():
        if isinstance(value, dict):
            out.__dict__[name] = copy.copy(value)
    return out


def _install_layer(layer: nn.Module, c: Collectives, phase: PhaseLayout, extras: dict[str, Tensor]) -> None:
    """Swap a layer's norms, attention and MLP (and under 2d-ws its biases) for the layout's."""
    plan = c.plan
    splits = plan.storage.splits
    pairs = ("block", "block") if layer.parallel_block else ("attn", "ffn")
    gather = WeightGather(c, phase, extras) if phase.gathered else None
    rest = c.group(plan.rest_axes(phase)) if phase.gathered else None
    two_d = phase.ffn == "2d-ws"
    for norm, pair in zip(("ln1", "ln2"), pairs, strict=True):
        inner = getattr(layer, norm)
        if inner is not None and (two_d or rest is not None):
            setattr(layer, norm, TwoDNorm(inner, c, splits[pair], pair) if two_d else TokensNorm(inner, c, rest, pair))
    batch = BatchSharded(c, phase, pairs[0]) if phase.attention == "batch" else None
    layer.attn = LayoutAttention(layer.attn, PairCollectives(c, splits[pairs[0]], pairs[0], two_d), batch, gather)
    layer.mlp = LayoutMLP(layer.mlp, PairCollectives(c, splits[pairs[1]], pairs[1], two_d), gather,
                          layer.attn.inner.index)
    if two_d:  # the residual is E-split: the biases added after the exit are this rank's chunk
        a, b = splits[pairs[0]].e_chunk
        for name in ("proj_bias", "down_bias"):
            if getattr(layer, name) is not None:
                setattr(layer, name, nn.Parameter(getattr(layer, name)[..., a:b], requires_grad=False))


def phase_view(model: Transformer, c: Collectives, phase: PhaseLayout, extras: dict[str, Tensor]) -> Transformer:
    """``model`` as ``phase`` runs it: a view sharing its weights, with the layout's modules installed."""
    view = _shallow(model)
    view.layers = nn.ModuleList(_shallow(layer) for layer in model.layers)
    for layer in view.layers:
        _install_layer(layer, c, phase, extras)
    if phase.ffn == "2d-ws" or phase.gathered:
        two_d = phase.ffn == "2d-ws"
        chunk = c.plan.storage.splits[next(iter(c.plan.storage.splits))].e_chunk if two_d else None
        view.wte = EmbeddingShare(model.wte, chunk, c.plan.tp, c.plan.rank, phase)
        view.wpe = None if model.wpe is None else EmbeddingShare(model.wpe, chunk, c.plan.tp, c.plan.rank, phase)
        if two_d:
            view.ln_f = GatherNorm(model.ln_f, c)
        else:
            view.layers[-1].register_forward_hook(_gather_rows_hook(c), with_kwargs=True)
    watch_layers(view)
    return view


class LayoutRun:
    """One rank's model under a RankPlan: per phase, the model view and the Comm its forward sums with."""

    def __init__(self, model: Transformer, plan: RankPlan, extras: dict[str, Tensor], *, no_comm: bool = False
                 ) -> None:
        self.plan, self.model = plan, model
        groups = make_groups(plan)
        self.views: dict[str, Transformer] = {}
        self.comms: dict[str, LayoutComm] = {}
        for name in PHASES:
            phase = plan.layout.phase(name)
            c = Collectives(plan, groups, no_comm=no_comm)
            self.views[name] = phase_view(model, c, phase, extras)
            self.comms[name] = LayoutComm(c, phase)

    def record(self, ledger: Ledger | None) -> None:
        """Record every collective of both phases in ``ledger`` (None: stop recording)."""
        for comm in self.comms.values():
            comm.c.ledger = ledger

    def cache_rows(self, batch: int) -> int:
        """KV cache rows this rank holds for ``batch`` sequences."""
        return -(-batch // self.plan.tp) if self.plan.layout.decode.attention == "batch" else batch

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """The decode layout's KV cache: all sequences of this rank's heads, or ceil(B/n) sequences of every
        head (attn-batch; the valid mask stays whole, so masks are built as on one device)."""
        if self.plan.layout.decode.attention != "batch":
            return self.model.new_cache(batch, max_len)
        cache = self.model.new_cache(self.cache_rows(batch), max_len)
        cache.valid = torch.zeros(batch, cache.max_len, dtype=torch.bool, device=cache.valid.device)
        return cache
