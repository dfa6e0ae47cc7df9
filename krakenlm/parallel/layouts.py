"""Pope et al.'s partitioning layouts executed: each layout is a plan (data) applied to the ordinary model.

Layout names and parsing are krakenlm.layout's; which layouts run, and the ``auto`` choice, are
krakenlm.costmodel.layout_choice's. The mesh is the cost model's (``make_mesh``: n ranks as X x Y x Z, the
last axis fastest), and 2D splits every pair on the axes the cost model finds cheapest (``split_2d_axes``),
so what runs is what is priced.

What each rank holds (E = n_embd; a pair is an in-projection W_in: E -> f_in and an out-projection
W_out: f_out -> E; a gpt layer has an attention and an FFN pair, a parallel block one fused pair):
- inner columns in(r) / out(r): rank r's heads (attn-heads; K/V heads replicated when there are
  fewer than ranks) or an even 1/n of the q, k and v columns (attn-batch); the FFN's F/n columns.
- storage, per pair with E-axes X and F-axes YZ (1d-ws: X empty): W_in rows = in(s) for s in r's
  x-group (ranks differing from r only on X), columns = the E chunks of r's yz-group; W_out the
  transpose. The W_in bias lives on the first rank of each x-group (the partial sums add it once).
  Embeddings, norms and out-projection biases are kept whole on every rank.
- residual stream between pairs: replicated (1d-ws: one all-reduce per pair), E split in n chunks in
  rank order (2d-ws: AG over yz, [norm statistics over x], W_in, RS over x, inner op, AG over x,
  W_out, RS over yz), or the batch split in n chunks (wg-*: weights all-gathered over the first
  axes G per layer, tokens AG / RS over the other axes C).
- attention: heads (each rank its heads, all sequences) or batch (an all-to-all moves q, k and v
  columns to the rank holding the sequence, with every head; its KV cache holds ceil(B/n) rows).
Both phases read one KV cache and one copy of the weights: a phase either uses the decode's layout or
is a weight-gathered prefill gathering the decode's weights (attn-batch in both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from krakenlm.config import ModelConfig
from krakenlm.costmodel.estimator import Workload
from krakenlm.costmodel.hardware import load_hardware
from krakenlm.costmodel.layout_choice import check_layout, choose
from krakenlm.costmodel.layouts import layer_pairs, make_mesh, split_2d_axes
from krakenlm.errors import ConfigError
from krakenlm.layout import GATHERED_AXES, Layout, PhaseLayout
from krakenlm.model.layers import AttentionShape
from krakenlm.model.params import COLUMN_FFN, COLUMN_QKV, ROW_HEADS, lookup, matrix_param, pair_matrices, qkv_blocks
from krakenlm.model.sharding import Shard, gathered_ffn_rows, split_ranges

Ranges = list[tuple[int, int]]
# The mesh ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mesh:
    """n ranks as the cost model's logical mesh (axis sizes, outermost first; the last axis fastest)."""

    dims: tuple[int, ...]

    @classmethod
    def for_ranks(cls, n: int) -> Mesh:
        return cls(make_mesh(n))

    @property
    def size(self) -> int:
        return math.prod(self.dims)

    def coords(self, rank: int) -> tuple[int, ...]:
        out = []
        for d in reversed(self.dims):
            out.append(rank % d)
            rank //= d
        return tuple(reversed(out))

    def rank(self, coords: tuple[int, ...]) -> int:
        r = 0
        for c, d in zip(coords, self.dims, strict=True):
            r = r * d + c
        return r

    def group(self, rank: int, axes: tuple[int, ...]) -> tuple[int, ...]:
        """Ranks that differ from ``rank`` only on ``axes``, ascending."""
        base = self.coords(rank)
        members = [base]
        for a in axes:
            members = [m[:a] + (c,) + m[a + 1:] for m in members for c in range(self.dims[a])]
        return tuple(sorted(self.rank(m) for m in members))

    def groups(self, axes: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Every distinct group over ``axes`` (each rank in exactly one), in a fixed order."""
        return sorted({self.group(r, axes) for r in range(self.size)})


# Columns -------------------------------------------------------------------------------------------------
def _even(total: int, n: int, r: int, offset: int = 0) -> Ranges:
    size = total // n
    return [(offset + r * size, offset + (r + 1) * size)]


def inner_rows(config: ModelConfig, matrix: str, attention: str, n: int, r: int) -> Ranges:
    """Natural output columns of W_in ``matrix`` ("attn.qkv" | "mlp.up") that rank r computes in the inner op."""
    split = matrix_param(matrix).split
    if split == COLUMN_QKV and attention == "batch":  # an even 1/n of the q, of the k and of the v rows
        return [rg for a, b in qkv_blocks(config) for rg in _even(b - a, n, r, a)]
    return split_ranges(split, config, Shard(0, 1, r, n))


def inner_cols(config: ModelConfig, matrix: str, attention: str, n: int, r: int) -> Ranges:
    """Natural input columns of W_out ``matrix`` ("attn.proj" | "mlp.down") rank r feeds from the inner op."""
    split = matrix_param(matrix).split
    if split == ROW_HEADS and attention == "batch":
        return _even(config.n_head * config.head_size, n, r)
    return split_ranges(split, config, Shard(0, 1, r, n))


def indices(ranges: Ranges) -> list[int]:
    return [i for a, b in ranges for i in range(a, b)]


@dataclass(frozen=True)
class PairSplit:
    """One matrix pair's storage on one rank: its x-group (E split, partial sums of W_in) and yz-group."""

    name: str
    x_axes: tuple[int, ...]
    xgroup: tuple[int, ...]
    yzgroup: tuple[int, ...]
    rank: int
    e_chunk: tuple[int, int]  # this rank's E columns of the residual (2d-ws)
    e_block: Ranges  # E columns W_in reads: the chunks of the yz-group


@dataclass
class StoragePlan:
    """Which slice of every full tensor a rank keeps (the weights both phases share)."""

    config: ModelConfig
    mesh: Mesh
    rank: int
    ffn: str  # "1d-ws" | "2d-ws": the stationary layout the weights are stored in
    attention: str

    @cached_property
    def splits(self) -> dict[str, PairSplit]:
        cfg, n = self.config, self.mesh.size
        names = tuple(pair_matrices(cfg.arch))
        e = cfg.n_embd // n
        out = {}
        for name, pair in zip(names, layer_pairs(cfg), strict=True):
            xs = split_2d_axes(pair, self.mesh.dims)[0] if self.ffn == "2d-ws" else ()
            yzs = tuple(a for a in range(len(self.mesh.dims)) if a not in xs)
            yzgroup = self.mesh.group(self.rank, yzs)
            out[name] = PairSplit(name, xs, self.mesh.group(self.rank, xs), yzgroup, self.rank,
                                  (self.rank * e, (self.rank + 1) * e), [(s * e, (s + 1) * e) for s in yzgroup])
        return out

    def for_rank(self, rank: int) -> StoragePlan:
        """The same storage as another rank holds it."""
        return StoragePlan(self.config, self.mesh, rank, self.ffn, self.attention)

    def pair_of(self, matrix: str) -> PairSplit:
        return next(self.splits[pair] for pair, matrices in pair_matrices(self.config.arch).items()
                    if any(matrix in m for m in matrices))

    def w_in_rows(self, matrix: str) -> Ranges:
        """Natural rows of W_in ``matrix`` this rank stores: the inner columns of its x-group."""
        n = self.mesh.size
        return [rg for s in self.pair_of(matrix).xgroup for rg in inner_rows(self.config, matrix, self.attention, n, s)]

    def w_out_cols(self, matrix: str) -> Ranges:
        """Natural columns of W_out ``matrix`` this rank stores."""
        n = self.mesh.size
        return [rg for s in self.pair_of(matrix).xgroup for rg in inner_cols(self.config, matrix, self.attention, n, s)]

    def ranges(self, name: str, shape: tuple[int, ...]) -> tuple[list[Ranges], bool]:
        """(ranges per dimension, zero) of the full tensor ``name`` kept by this rank; ``zero``: keep the
        shape but store zeros (a W_in bias on a rank that is not first in its x-group)."""
        ranges: list[Ranges] = [[(0, d)] for d in shape]
        param = lookup(name)[0]  # the W_in / W_out side of a pair matrix (int8: its .q / .scale too)
        if param.side is None or param.matrix is None:
            return ranges, False
        matrix, split = param.matrix, self.pair_of(param.matrix)
        if param.side == "in":
            ranges[1] = self.w_in_rows(matrix)
            if len(shape) == 3:
                ranges[2] = split.e_block
            return ranges, param.bias and split.xgroup[0] != self.rank
        ranges[1] = split.e_block
        if len(shape) == 3:
            ranges[2] = self.w_out_cols(matrix)
        return ranges, False

    def attention_shape(self) -> AttentionShape:
        """Heads the attention of this rank runs: its own (attn-heads) or every head of its sequences."""
        if self.attention == "batch":
            return AttentionShape(self.config.n_head, self.config.kv_heads, self.config.head_size)
        return Shard(0, 1, self.rank, self.mesh.size).attention(self.config)


def slice_tensor(tensor: Tensor, ranges: list[Ranges]) -> Tensor:
    """The blocks ``ranges`` name on every dimension of ``tensor``, joined (a contiguous copy)."""
    out = tensor
    for dim, rg in enumerate(ranges):
        if rg == [(0, tensor.shape[dim])]:
            continue
        if len(rg) == 1:
            out = out.narrow(dim, rg[0][0], rg[0][1] - rg[0][0])
        else:
            out = out.index_select(dim, torch.tensor(indices(rg), device=tensor.device))
    return out.clone(memory_format=torch.contiguous_format)  # its own storage: the full tensor can go


# Weight gathering (wg-*) ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GatherPlan:
    """How the stored pieces of one matrix, all-gathered over a group, assemble into the weight this rank
    multiplies with: pieces form a grid (row blocks x column blocks) in ``order``; then rows and columns
    are permuted (``row_perm`` / ``col_perm``, None = keep) into the order the layer needs."""

    group: tuple[int, ...]
    order: tuple[int, ...]  # group positions in grid order (row block major)
    grid: tuple[int, int]
    rows: tuple[int, ...]  # natural row indices of the result
    cols: tuple[int, ...]  # natural column indices of the result
    row_perm: Tensor | None = None
    col_perm: Tensor | None = None


def gather_plan(group: tuple[int, ...], pieces: list[tuple[Ranges, Ranges]],
                row_order: list[int] | None = None, col_order: list[int] | None = None) -> GatherPlan:
    """``pieces[i]`` = (rows, cols) stored by group member i. The result's rows follow ``row_order`` (natural
    indices; default: the grid's order), likewise its columns."""
    row_blocks = list(dict.fromkeys(tuple(p[0]) for p in pieces))
    col_blocks = list(dict.fromkeys(tuple(p[1]) for p in pieces))
    cell = {(row_blocks.index(tuple(r)), col_blocks.index(tuple(c))): i for i, (r, c) in enumerate(pieces)}
    if len(cell) != len(pieces) or len(cell) != len(row_blocks) * len(col_blocks):
        raise ConfigError("layout: the weights stored on a gather group do not tile one matrix")  # plan bug
    order = tuple(cell[(i, j)] for i in range(len(row_blocks)) for j in range(len(col_blocks)))
    grid_rows = [i for rb in row_blocks for i in indices(list(rb))]
    grid_cols = [i for cb in col_blocks for i in indices(list(cb))]

    def perm(grid: list[int], want: list[int] | None) -> tuple[tuple[int, ...], Tensor | None]:
        if want is None or want == grid:
            return tuple(grid), None
        pos = {v: k for k, v in enumerate(grid)}
        return tuple(want), torch.tensor([pos[v] for v in want])

    rows, row_perm = perm(grid_rows, row_order)
    cols, col_perm = perm(grid_cols, col_order)
    return GatherPlan(group, order, (len(row_blocks), len(col_blocks)), rows, cols, row_perm, col_perm)


def assemble(plan: GatherPlan, gathered: Tensor, piece_shape: tuple[int, ...]) -> Tensor:
    """The weight from ``gathered`` [len(group) * prod(piece_shape)] (pieces [S, rows, cols] in group order)."""
    s, r, c = piece_shape
    gr, gc = plan.grid
    pieces = gathered.view(len(plan.group), s, r, c)
    if plan.order != tuple(range(len(plan.order))):
        pieces = pieces[list(plan.order)]
    out = pieces.view(gr, gc, s, r, c).permute(2, 0, 3, 1, 4).reshape(s, gr * r, gc * c)
    if plan.row_perm is not None:
        out = out.index_select(1, plan.row_perm.to(out.device))
    if plan.col_perm is not None:
        out = out.index_select(2, plan.col_perm.to(out.device))
    return out


@dataclass(frozen=True)
class RankPlan:
    """Everything a rank needs to run a Layout: the mesh, its storage and the per-phase gathers."""

    config: ModelConfig
    layout: Layout
    tp: int
    rank: int

    def __post_init__(self) -> None:
        check_layout(self.config, self.layout, self.tp)

    @cached_property
    def storage(self) -> StoragePlan:
        """The weights as the decode's layout stores them (a weight-gathered prefill gathers those)."""
        dec = self.layout.decode
        return StoragePlan(self.config, Mesh.for_ranks(self.tp), self.rank, dec.ffn, dec.attention)

    @property
    def mesh(self) -> Mesh:
        return self.storage.mesh

    def gather_axes(self, phase: PhaseLayout) -> tuple[int, ...]:
        return tuple(range(min(GATHERED_AXES[phase.ffn], len(self.mesh.dims))))

    def rest_axes(self, phase: PhaseLayout) -> tuple[int, ...]:
        return tuple(range(len(self.gather_axes(phase)), len(self.mesh.dims)))

    def gathers(self, phase: PhaseLayout) -> dict[str, GatherPlan]:
        """Per matrix ("attn.qkv", ...): how this rank assembles it when ``phase`` gathers weights."""
        group = self.mesh.group(self.rank, self.gather_axes(phase))
        st, cfg = self.storage, self.config
        plans = {}
        members = [st.for_rank(s) for s in group]
        for pair in st.splits:
            for w_in, w_out in pair_matrices(cfg.arch)[pair]:
                rows_in = [m.w_in_rows(w_in) for m in members]
                cols_in = [m.pair_of(w_in).e_block for m in members]
                plan_in = gather_plan(group, list(zip(rows_in, cols_in, strict=True)))
                ffn_in = matrix_param(w_in).split == COLUMN_FFN
                order = gathered_ffn_rows(list(plan_in.rows), cfg) if ffn_in else None
                plan_in = gather_plan(group, list(zip(rows_in, cols_in, strict=True)), row_order=order,
                                      col_order=list(range(cfg.n_embd)))
                cols_out = [m.w_out_cols(w_out) for m in members]
                want = [i for i in plan_in.rows if i < cfg.ffn_size] if ffn_in else None
                plans[w_in] = plan_in
                plans[w_out] = gather_plan(group, list(zip(cols_in, cols_out, strict=True)),
                                           row_order=list(range(cfg.n_embd)), col_order=want)
        return plans


# Choosing (--layout auto) -----------------------------------------------------------------------------------
def runtime_hardware(device: torch.device) -> str:
    """The bundled cost-model spec for this device: cpu-gloo (the file, never a calibration), or the GPU by its name."""
    if device.type != "cuda":
        return "cpu-gloo"
    name = torch.cuda.get_device_name(device).lower()
    for key, spec in (("h200", "h200"), ("h100", "h100-sxm"), ("a100", "a100-80gb-nvswitch")):
        if key in name:
            return spec
    return "h100-sxm"


def resolve(text: str | None, config: ModelConfig, tp: int, workload: Workload | None,
            device: torch.device) -> Layout:
    """The Layout a ``layout`` option names: the default, a layout string, or ``auto`` (the cost model's
    choice for ``workload``, default: one sequence of 128 tokens and 32 new)."""
    if text is None:
        return Layout.default(config)
    if text == "auto":
        return choose(config, tp, workload or Workload(batch=1, prompt=128, generate=32),
                      load_hardware(runtime_hardware(device)))
    layout = Layout.parse(text)
    check_layout(config, layout, tp)
    return layout
