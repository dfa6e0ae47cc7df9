"""The torch.distributed side of a partitioning layout: the model's layout hooks for one rank of a
RankPlan (krakenlm.parallel.layouts), each collective recorded in the Ledger when one is attached.

Per phase and matrix pair the hooks are (the module docstring of layouts.py has the dataflow):
    1d-ws  leave: all-reduce over every rank (Megatron's reduce_shard)
    2d-ws  norm: all-gather E over yz [+ all-reduce of norm statistics over x]; scatter_inner:
           reduce-scatter over x; gather_inner: all-gather over x; leave: reduce-scatter E over yz
    wg-*   weights: all-gather of the layer's matrices over the gathered axes; norm: all-gather tokens
           over the other axes; leave: reduce-scatter tokens over them
    attn-batch  to_batch / from_batch: all-to-all of q, k, v (and back of the output) between the
           column split and the rank holding each sequence
Collectives are c10d calls (eager) or functional collectives (``functional=True``, what torch.compile
traces); a group of one rank issues nothing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from krakenlm.errors import InputError
from krakenlm.model.layers import AttentionStep, KVCache, NoHooks, StackedNorm
from krakenlm.model.params import COLUMN_QKV, PARAMS, Param, matrix_param, pair_matrices
from krakenlm.model.quant import Int8Weight
from krakenlm.model.transformer import Layer, Transformer, select_positions
from krakenlm.parallel.comm import DistComm, _guard
from krakenlm.parallel.layouts import (
    GatherPlan,
    PhaseLayout,
    RankPlan,
    assemble,
    indices,
    inner_cols,
    inner_rows,
)
from krakenlm.parallel.plan import ParallelPlan


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


@dataclass
class _Forward:
    name: str  # prefill | decode
    phase: PhaseLayout
    batch: int
    t: int
    rows: tuple[int, int]  # this rank's sequences when the batch is sharded


class LayoutComm(DistComm):
    """Comm for one rank of a RankPlan: the layout hooks over its mesh's process groups."""

    def __init__(self, plan: RankPlan, model: Transformer, *, no_comm: bool = False, functional: bool = False,
                 device: torch.device | None = None, extras: dict[str, Tensor] | None = None,
                 groups: Any = None) -> None:
        super().__init__(ParallelPlan(plan.config, plan.tp), no_comm=no_comm, functional=functional, device=device,
                         groups=None if groups is None else groups[0])
        self.rank_plan, self.model, self.extras = plan, model, extras or {}
        self.mesh_groups: dict[tuple[int, ...], Group] = groups[1] if groups is not None else self._make_groups()
        self.fwd = _Forward("prefill", plan.layout.prefill, 1, 1, (0, 1))
        self._hooks = {(phase, pair): self._pair_hooks(phase, pair) for phase in ("prefill", "decode")
                       for pair in plan.storage.splits}
        self._gathers = {phase: plan.gathers(plan.layout.phase(phase)) for phase in ("prefill", "decode")
                         if plan.layout.phase(phase).gathered}
        self._scratch = _scratch_modules(model) if self._gathers else {}

    def variant(self, **changes: Any) -> LayoutComm:
        options = {"no_comm": self.no_comm, "functional": self.functional} | changes
        options.pop("overlap", None)
        return LayoutComm(self.rank_plan, self.model, device=self.device, extras=self.extras,
                          groups=((self.shard_group, self.exchange_group), self.mesh_groups), **options)

    def _make_groups(self) -> dict[tuple[int, ...], Group]:
        """A process group for every mesh-axes set the plan uses (collective: same order on every rank)."""
        plan, mesh = self.rank_plan, self.rank_plan.mesh
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
                elif len(ranks) == mesh.size:
                    pg = dist.group.WORLD
                else:
                    pg = dist.new_group(list(ranks))
                if plan.rank in ranks:
                    out[axes] = Group(ranks, pg)
        return out

    def group(self, axes: tuple[int, ...]) -> Group:
        return self.mesh_groups[tuple(axes)]

    # Collectives -------------------------------------------------------------------------------------
    def _log(self, kind: str, group: Group, nbytes: int, site: str, tensor: str = "act") -> None:
        if self.ledger is not None and not torch.compiler.is_compiling():
            self.ledger.record(kind, group.ranks, nbytes, site, self._layer, tensor)

    def all_reduce(self, x: Tensor, group: Group, site: str, tensor: str = "act") -> Tensor:
        if group.size == 1 or self.no_comm:
            return x
        self._log("all_reduce", group, x.numel() * x.element_size(), site, tensor)
        if self.functional:
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
        if self.functional:
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
            return x.narrow(dim, group.ranks.index(self.rank_plan.rank) * (x.shape[dim] // k), x.shape[dim] // k)
        if self.functional:
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
        if self.functional:
            return funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), receive, send, group.pg))
        out = x.new_empty((sum(receive),) + tuple(x.shape[1:]))
        _guard(lambda: dist.all_to_all_single(out, x.contiguous(), receive, send, group=group.pg), site)
        return out

    # The model's layout hooks --------------------------------------------------------------------------
    def begin(self, phase: str, batch: int, t: int, step: AttentionStep) -> AttentionStep:
        layout, n = self.rank_plan.layout.phase(phase), self.rank_plan.tp
        if layout.gathered and batch % n:
            raise InputError(f"layout: {layout} shards the batch over {n} ranks; a batch of {batch} sequences is "
                             f"not divisible by {n}")
        self.fwd = _Forward(phase, layout, batch, t, sequence_rows(batch, n, self.rank_plan.rank))
        self._layer = -1  # the embedding
        if layout.attention != "batch":
            return step
        a, b = self.fwd.rows
        return AttentionStep(None if step.cache is None else step.cache.rows(0, b - a), step.start,
                             None if step.slots is None else step.slots[a:b], step.keys,
                             None if step.mask is None else step.mask[a:b])

    def pair(self, name: str) -> NoHooks:
        return self._hooks[(self.fwd.name, name)]

    def residual(self, y: Tensor) -> Tensor:
        ffn = self.fwd.phase.ffn
        if ffn == "2d-ws":
            a, b = self.rank_plan.storage.splits[next(iter(self.rank_plan.storage.splits))].e_chunk
            return y[..., a:b].contiguous()
        if self.fwd.phase.gathered:
            a, b = self.fwd.rows
            return y[:, a * self.fwd.t:b * self.fwd.t]
        return y

    def head(self, y: Tensor, batch: int, t: int, logits_at: str | Tensor) -> Tensor:
        self._layer = -1  # the LM head's collectives belong to no layer
        everyone = self.group(tuple(range(len(self.rank_plan.mesh.dims))))
        if self.fwd.phase.ffn == "2d-ws":
            return self.all_gather(select_positions(y, batch, t, logits_at), everyone, -1, "head")
        if self.fwd.phase.gathered:
            a, b = self.fwd.rows
            local = select_positions(y, b - a, t, logits_at[a:b] if isinstance(logits_at, Tensor) else logits_at)
            return self.all_gather(local, everyone, 1, "head")
        return select_positions(y, batch, t, logits_at)

    def weights(self, layer: Layer, index: int) -> Layer:
        if not self.fwd.phase.gathered:
            return layer
        plans, scratch = self._gathers[self.fwd.name], self._scratch
        gathered = _GatheredLayer(layer.parallel_block, layer.ln1, layer.ln2, scratch["attn"], scratch["mlp"],
                                  layer.proj_bias, layer.down_bias)
        for weight in MATRICES:
            stored = getattr(getattr(layer, weight.owner), weight.attr)
            plan = plans[weight.matrix]
            setattr(scratch[weight.owner], weight.attr, self._gather_matrix(stored, plan, index, weight))
            bias_param = W_IN_BIASES.get(weight.matrix)
            bias = None if bias_param is None else self.extras.get(bias_param.name(index))
            if bias is not None:
                setattr(scratch[weight.owner], bias_param.attr,
                        bias.index_select(1, torch.tensor(plan.rows, device=bias.device)))
        return gathered  # type: ignore[return-value]

    def _gather_matrix(self, stored: Tensor | Int8Weight, plan: GatherPlan, index: int,
                       param: Param) -> Tensor | Int8Weight:
        group = Group(plan.group, self.group(self.rank_plan.gather_axes(self.fwd.phase)).pg)
        values = stored.q if isinstance(stored, Int8Weight) else stored
        flat = self.all_gather(values.reshape(-1), group, 0, f"gather {param.matrix}", tensor="weight")
        weight = assemble(plan, flat, tuple(values.shape))
        if not isinstance(stored, Int8Weight):
            return weight
        scale = self.extras[f"{param.name(index)}.scale"]
        return Int8Weight(weight, scale.index_select(1, torch.tensor(plan.rows, device=scale.device)))

    def _pair_hooks(self, phase: str, pair: str) -> NoHooks:
        layout = self.rank_plan.layout.phase(phase)
        if layout.ffn == "2d-ws":
            return _TwoD(self, pair, layout)
        if layout.gathered:
            return _Gathered(self, pair, layout)
        return _Megatron(self, pair, layout)

    def cache_rows(self, batch: int) -> int:
        """KV cache rows this rank holds for ``batch`` sequences."""
        return -(-batch // self.rank_plan.tp) if self.rank_plan.layout.decode.attention == "batch" else batch

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """The decode layout's KV cache: all sequences of this rank's heads, or ceil(B/n) sequences of every
        head (attn-batch; the valid mask stays whole, so masks are built as on one device)."""
        if self.rank_plan.layout.decode.attention != "batch":
            return self.model.new_cache(batch, max_len)
        cache = self.model.new_cache(self.cache_rows(batch), max_len)
        cache.valid = torch.zeros(batch, cache.max_len, dtype=torch.bool, device=cache.valid.device)
        return cache


MATRICES = tuple(p for p in PARAMS if p.matrix is not None and not p.bias)  # a layer's gathered weights
W_IN_BIASES = {p.matrix: p for p in PARAMS if p.matrix is not None and p.bias}  # kept whole, indexed per phase


@dataclass
class _GatheredLayer:
    """A layer as the forward sees it under a weight-gathered phase (norms and biases are the stored ones)."""

    parallel_block: bool
    ln1: StackedNorm
    ln2: StackedNorm | None
    attn: nn.Module
    mlp: nn.Module
    proj_bias: Tensor | None
    down_bias: Tensor | None


def _scratch_modules(model: Transformer) -> dict[str, nn.Module]:
    """Attention and MLP modules whose weights are set to each layer's gathered ones in turn."""
    out = {}
    for name in dict.fromkeys(p.owner for p in MATRICES):
        module = copy.deepcopy(getattr(model.layers[0], name))
        for p in PARAMS:
            if p.per_layer and p.owner == name and getattr(module, p.attr, None) is not None:
                delattr(module, p.attr)
        out[name] = module
    return out


class _PairHooks(NoHooks):
    """Hooks of one matrix pair in one phase; attn-batch adds the all-to-alls around attention."""

    def __init__(self, comm: LayoutComm, pair: str, layout: PhaseLayout) -> None:
        self.comm, self.pair_name, self.layout = comm, pair, layout
        plan = comm.rank_plan
        self.split = plan.storage.splits[pair]
        self.a2a: Group | None = None
        w_ins = [matrix_param(w_in) for w_in, _ in pair_matrices(plan.config.arch)[pair]]
        if layout.attention == "batch" and any(p.split == COLUMN_QKV for p in w_ins):
            self._batch_columns(plan, layout)

    def _batch_columns(self, plan: RankPlan, layout: PhaseLayout) -> None:
        """Which q/k/v columns arrive from each member (to natural order) and which output columns go back."""
        cfg, n = plan.config, plan.tp
        if layout.gathered:
            self.a2a = self.comm.group(plan.rest_axes(layout))
            member_plans = {m: RankPlan(cfg, plan.layout, n, m).gathers(layout) for m in self.a2a.ranks}
            rows = [list(member_plans[m]["attn.qkv"].rows) for m in self.a2a.ranks]
            cols = [list(member_plans[m]["attn.proj"].cols) for m in self.a2a.ranks]
        else:
            self.a2a = self.comm.group(tuple(range(len(plan.mesh.dims))))
            rows = [indices(inner_rows(cfg, "attn.qkv", "batch", n, m)) for m in self.a2a.ranks]
            cols = [indices(inner_cols(cfg, "attn.proj", "batch", n, m)) for m in self.a2a.ranks]
        arrived = [i for r in rows for i in r]
        self.to_natural = torch.tensor(sorted(range(len(arrived)), key=arrived.__getitem__))
        self.send_columns = torch.tensor([i for c in cols for i in c])

    def _counts(self) -> list[int]:
        fwd, n = self.comm.fwd, self.comm.rank_plan.tp
        assert self.a2a is not None
        return [b - a for a, b in (sequence_rows(fwd.batch, n, m) for m in self.a2a.ranks)]

    def to_batch(self, qkv: Tensor, rope: tuple[Tensor, Tensor] | None
                 ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        if self.a2a is None:
            return qkv, rope
        t, (a, b) = self.comm.fwd.t, self.comm.fwd.rows
        counts, k, mine = self._counts(), self.a2a.size, b - a
        x = qkv[0]
        out = self.comm.all_to_all(x, self.a2a, [c * t for c in counts], [mine * t] * k, f"{self.pair_name} qkv a2a")
        width = out.shape[-1]  # explicit: a rank may hold no sequence (batch < ranks)
        out = out.view(k, mine * t, width).permute(1, 0, 2).reshape(mine * t, k * width)
        out = out.index_select(-1, self.to_natural.to(out.device)).unsqueeze(0)
        if rope is not None:
            rope = (rope[0][a:b], rope[1][a:b])
        return out, rope

    def from_batch(self, out: Tensor) -> Tensor:
        if self.a2a is None:
            return out
        t, (a, b) = self.comm.fwd.t, self.comm.fwd.rows
        counts, k, mine = self._counts(), self.a2a.size, b - a
        send = out[0].index_select(-1, self.send_columns.to(out.device))
        width = send.shape[-1] // k
        send = send.view(mine * t, k, width).permute(1, 0, 2).reshape(k * mine * t, width)
        back = self.comm.all_to_all(send, self.a2a, [mine * t] * k, [c * t for c in counts],
                                    f"{self.pair_name} out a2a")
        return back.unsqueeze(0)


class _Megatron(_PairHooks):
    """1d-ws: a replicated residual; partial out-projections summed by one all-reduce."""

    def leave(self, h: Tensor) -> Tensor:
        everyone = self.comm.group(tuple(range(len(self.comm.rank_plan.mesh.dims))))
        return self.comm.all_reduce(h, everyone, f"{self.pair_name} leave")


class _TwoD(_PairHooks):
    """2d-ws: residual E split over every rank; E gathered over yz, F split over yz and then over x."""

    def __init__(self, comm: LayoutComm, pair: str, layout: PhaseLayout) -> None:
        super().__init__(comm, pair, layout)
        dims = range(len(comm.rank_plan.mesh.dims))
        self.x = comm.group(self.split.x_axes)
        self.yz = comm.group(tuple(a for a in dims if a not in self.split.x_axes))
        self.e_index = torch.tensor(indices(self.split.e_block))

    def norm(self, ln: StackedNorm, y: Tensor) -> Tensor:
        x = self.comm.all_gather(y, self.yz, -1, f"{self.pair_name} enter")
        if self.x.size == 1:
            return ln(x)
        # E is split over x: the mean and variance (RMSNorm: the mean square) need every chunk
        # (two float32 sums per token).
        xf = x.float()
        stats = self.comm.all_reduce(torch.stack([xf.sum(-1), (xf * xf).sum(-1)], -1), self.x,
                                     f"{self.pair_name} norm", tensor="stats")
        width = self.comm.rank_plan.config.n_embd
        mean = torch.zeros_like(stats[..., :1]) if ln.rms else stats[..., :1] / width  # RMSNorm: no centering
        var = stats[..., 1:] / width - mean * mean
        out = ((xf - mean) * torch.rsqrt(var + ln.eps)).to(x.dtype)
        index = self.e_index.to(x.device)
        out = out * ln.weight.index_select(-1, index).unsqueeze(1)
        return out if ln.bias is None else out + ln.bias.index_select(-1, index).unsqueeze(1)

    def scatter_inner(self, h: Tensor) -> Tensor:
        return self.comm.reduce_scatter(h, self.x, -1, f"{self.pair_name} inner rs")

    def gather_inner(self, h: Tensor) -> Tensor:
        return self.comm.all_gather(h, self.x, -1, f"{self.pair_name} inner ag")

    def leave(self, h: Tensor) -> Tensor:
        return self.comm.reduce_scatter(h, self.yz, -1, f"{self.pair_name} leave")

    def local(self, bias: Tensor | None) -> Tensor | None:
        a, b = self.split.e_chunk
        return None if bias is None else bias[..., a:b]


class _Gathered(_PairHooks):
    """wg-*: whole sequences per rank; the tokens of a gather group meet over the other axes."""

    def __init__(self, comm: LayoutComm, pair: str, layout: PhaseLayout) -> None:
        super().__init__(comm, pair, layout)
        self.rest = comm.group(comm.rank_plan.rest_axes(layout))

    def norm(self, ln: StackedNorm, y: Tensor) -> Tensor:
        return ln(self.comm.all_gather(y, self.rest, 1, f"{self.pair_name} enter"))

    def leave(self, h: Tensor) -> Tensor:
        return self.comm.reduce_scatter(h, self.rest, 1, f"{self.pair_name} leave")
