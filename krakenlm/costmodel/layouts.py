"""Partitioning layouts: which collectives one layer needs, and where the KV cache lives.

FFN layouts follow Pope et al. (2023) on a logical 3-D mesh X x Y x Z of n chips. A layer is one or
two *matrix pairs* (in-projection E -> f_in, out-projection f_out -> E): a serial block has an
attention pair and an FFN pair, each paying its own collectives; a parallel block fuses both into one
pair (f_in = FFN-in + QKV, f_out = F + Q), so its collectives over E happen once per layer.
Per pair and per chip, with T = B*L tokens (elements; bytes = elements x bytes per element):

    1d-ws   AG(all) T*E  ->  W_in -> W_out  -> RS(all) T*E                       = 2TE
    2d-ws   AG(yz) T*E/X -> W_in -> RS(x) T*f_in/YZ -> AG(x) T*f_out/YZ -> W_out -> RS(yz) T*E/X
            = T(2E/X + (f_in+f_out)/YZ); X chosen from the mesh axes to minimise it
            (for f_in = f_out = F: 2T(E/X + F/YZ), continuous optimum X = sqrt(nE/F))
    wg-X, wg-XY, wg-XYZ: weights all-gathered over N_g = X, XY or XYZ chips,
            AG(N_g) E(f_in+f_out) N_g/n of weights, plus activations AG + RS of T*E/N_g each
            (the paper's ~2TE/N_g) over the axes not gathered (``wg_rest_group``: nothing moves
            when every axis is gathered)

Kraken (T = tensor-parallel degree, N = sub-layers, d = sub-layer width): T = N or T < N (N/T
sub-layers per chip) needs one all-reduce of T*d per layer, overlappable with the next layer's
attention; T = kN shards every sub-layer Megatron-style over k chips (two blocking all-reduces over
k per layer) and keeps the overlappable all-reduce over the N sub-layer groups.

Attention: "heads" shards heads over all n chips (K/V heads with fewer than n heads are replicated,
and heads are padded to a multiple of n: ceil(kv/n) K/V heads per chip); "batch" shards sequences
(ceil(B/n) per chip, all K/V heads) and costs two all-to-alls per layer (Q+K+V in, output back).

Placement on nodes (specs with ``chips_per_node`` c): chips are numbered mesh-major with the last
mesh axis fastest (chip = (x*Y + y)*Z + z), pipeline stages outermost, and chip i sits in node i // c;
so a group over inner axes stays inside a node and a group over the outer axis may cross nodes.
Kraken with T = kN numbers chips (sub-layer group, shard): a sub-layer's k shards are neighbours (one
node when k <= c) and the exchange over the N groups is what crosses nodes. ``group_nodes`` counts the
nodes a group spans, which collectives.py prices hierarchically.

Valid splits (``check_split``): every chip holds whole heads (n_head % T == 0 when T <= n_head; with
more chips than heads the heads are padded to one per chip, as Pope et al. pad PaLM 540B's 48 heads
to 64, up to T <= n_embd); Kraken T = N, T | N or T = kN with the same rule for k and the heads of a
sub-layer; pipeline stages <= n_layer; on nodes, T divides c or c divides T, and more chips than a
node fills whole nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

from krakenlm.config import ModelConfig
from krakenlm.costmodel.collectives import Group
from krakenlm.errors import ConfigError
from krakenlm.layout import ATTENTION, FFN_LAYOUTS, GATHERED_AXES


@dataclass(frozen=True)
class MatPair:
    """An in-projection E -> f_in and an out-projection f_out -> E, sharded together."""

    e: int
    f_in: int
    f_out: int

    @property
    def params(self) -> int:
        return self.e * (self.f_in + self.f_out)


@dataclass(frozen=True)
class CommOp:
    """One collective per layer: ``elements`` per chip of an activation or weight tensor."""

    kind: str
    elements: float
    group: Group
    tensor: str = "act"  # act | weight
    overlapped: bool = False  # hidden behind the next layer's attention (Kraken)


def make_mesh(chips: int, torus_axes: tuple[int, ...] = ()) -> tuple[int, int, int]:
    """Logical X, Y, Z axes for ``chips``: the hardware torus when it matches, else a balanced factorisation."""
    if chips < 1:
        raise ConfigError(f"chips: must be a positive integer, got {chips}")
    if len(torus_axes) == 3 and math.prod(torus_axes) == chips:
        return tuple(torus_axes)  # type: ignore[return-value]
    best: tuple[int, int, int] = (chips, 1, 1)
    for x in range(1, chips + 1):
        if chips % x:
            continue
        for y in range(1, chips // x + 1):
            if (chips // x) % y:
                continue
            cand = tuple(sorted((x, y, chips // x // y), reverse=True))
            if max(cand) < max(best) or (max(cand) == max(best) and min(cand) > min(best)):
                best = cand  # type: ignore[assignment]
    return best


def layer_pairs(config: ModelConfig) -> list[MatPair]:
    """The matrix pairs of one (non-Kraken) layer: serial block two, parallel block one fused."""
    e, hd = config.n_embd, config.head_size
    q, kv = config.n_head * hd, config.kv_heads * hd
    f = config.ffn_size
    ffn_in = (2 if config.mlp == "swiglu" else 1) * f
    if config.arch == "parallel":
        return [MatPair(e, ffn_in + q + 2 * kv, f + q)]
    return [MatPair(e, q + 2 * kv, q), MatPair(e, ffn_in, f)]


def group_nodes(dims: tuple[int, ...], axes: tuple[int, ...], chips_per_node: int) -> int:
    """Nodes spanned by a group over mesh axes ``axes`` (indices into ``dims``, outermost first; chips
    numbered with the last axis fastest, chip i in node i // chips_per_node; 0 = one fabric)."""
    if not chips_per_node:
        return 1
    strides = [math.prod(dims[i + 1:]) for i in range(len(dims))]
    members = [0]
    for i in axes:
        members = [m + c * strides[i] for m in members for c in range(dims[i])]
    return len({m // chips_per_node for m in members})


def mesh_group(dims: tuple[int, ...], axes: tuple[int, ...], chips_per_node: int = 0) -> Group:
    """The Group of mesh axes ``axes`` with the nodes it spans."""
    return Group(tuple(dims[i] for i in axes), group_nodes(dims, axes, chips_per_node))


def split_2d_axes(pair: MatPair, mesh: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Indices of the mesh axes for X (splits E) and YZ (splits F) minimising 2D weight-stationary traffic
    (the runtime's 2D plan shards by the same split, so what runs is what is priced)."""
    idx = range(len(mesh))
    best: tuple[float, tuple[int, ...], tuple[int, ...]] | None = None
    for r in range(len(mesh) + 1):
        for xs in combinations(idx, r):
            yzs = tuple(i for i in idx if i not in xs)
            vol = 2 * pair.e / math.prod(mesh[i] for i in xs) + (pair.f_in + pair.f_out) / math.prod(
                mesh[i] for i in yzs)
            if best is None or vol < best[0] - 1e-9:
                best = (vol, xs, yzs)
    assert best is not None
    return best[1], best[2]


def split_2d(pair: MatPair, mesh: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Mesh axis sizes for X (splits E) and YZ (splits F) that minimise 2D weight-stationary traffic."""
    xs, yzs = split_2d_axes(pair, mesh)
    return tuple(mesh[i] for i in xs), tuple(mesh[i] for i in yzs)


def pair_ops(layout: str, pair: MatPair, tokens: float, mesh: tuple[int, ...], chips_per_node: int = 0) -> list[CommOp]:
    """The collectives one matrix pair needs per forward under an FFN layout (module docstring); groups
    carry the nodes they span when ``chips_per_node`` is given."""
    n = math.prod(mesh)
    everyone = mesh_group(mesh, tuple(range(len(mesh))), chips_per_node)
    if layout == "1d-ws":
        return [CommOp("all_gather", tokens * pair.e, everyone), CommOp("reduce_scatter", tokens * pair.e, everyone)]
    if layout == "2d-ws":
        xs, yzs = split_2d_axes(pair, mesh)
        x_group, yz_group = mesh_group(mesh, xs, chips_per_node), mesh_group(mesh, yzs, chips_per_node)
        x, yz = x_group.size, yz_group.size
        return [CommOp("all_gather", tokens * pair.e / x, yz_group),
                CommOp("reduce_scatter", tokens * pair.f_in / yz, x_group),
                CommOp("all_gather", tokens * pair.f_out / yz, x_group),
                CommOp("reduce_scatter", tokens * pair.e / x, yz_group)]
    if layout in GATHERED_AXES:
        g_group = mesh_group(mesh, tuple(range(GATHERED_AXES[layout])), chips_per_node)
        rest = wg_rest_group(layout, mesh, chips_per_node)
        n_g = g_group.size
        return [CommOp("all_gather", pair.params * n_g / n, g_group, tensor="weight"),
                CommOp("all_gather", tokens * pair.e / n_g, rest),
                CommOp("reduce_scatter", tokens * pair.e / n_g, rest)]
    raise ConfigError(f"layout: FFN layout must be one of {FFN_LAYOUTS}, got {layout!r}")


def wg_rest_group(layout: str, mesh: tuple[int, ...], chips_per_node: int = 0) -> Group:
    """The chips a weight-gathered layout's activations move over: the mesh axes it does not gather.
    Chips of one gather group hold different batch shards; the chips that share a gathered weight
    (same coordinates on the gathered axes) split its F columns and exchange tokens. Over one chip
    (wg-xyz, or all axes gathered) activations do not move."""
    return mesh_group(mesh, tuple(range(GATHERED_AXES[layout], len(mesh))), chips_per_node)


def gathered_fraction(layout: str, mesh: tuple[int, ...]) -> float:
    """Fraction of a layer's weights each chip multiplies with: 1/n weight-stationary, N_g/n gathered."""
    n = math.prod(mesh)
    if layout in GATHERED_AXES:
        return math.prod(mesh[: GATHERED_AXES[layout]]) / n
    return 1 / n


def comm_elements(ops: list[CommOp]) -> float:
    """Total elements per chip moved by ``ops`` (the paper's communication volume)."""
    return sum(op.elements for op in ops)


def continuous_ws_elements(layout: str, e: int, f: int, n: float, tokens: float) -> float:
    """Pope's closed forms with the continuous optimum X = sqrt(nE/F) (for the 1D/2D crossover)."""
    if layout == "1d-ws":
        return 2 * tokens * e
    if layout == "2d-ws":
        x = math.sqrt(n * e / f)
        return 2 * tokens * (e / x + f * x / n)
    raise ConfigError(f"layout: closed form only for 1d-ws / 2d-ws, got {layout!r}")


def switch_points(pair: MatPair, mesh: tuple[int, ...], layouts: tuple[str, ...] = ("2d-ws", "wg-x", "wg-xy", "wg-xyz"),
                  ) -> list[tuple[float, str, str]]:
    """Token counts (B*L) where the lowest-traffic FFN layout changes, as (tokens, from, to).

    Every layout's traffic is a + b*tokens, so the lower envelope is found exactly.
    """
    lines = {}
    for name in layouts:
        a = comm_elements(pair_ops(name, pair, 0.0, mesh))
        b = comm_elements(pair_ops(name, pair, 1.0, mesh)) - a
        lines[name] = (a, b)
    points: list[tuple[float, str, str]] = []
    current = min(lines, key=lambda k: (lines[k][0], lines[k][1]))
    t = 0.0
    while True:
        a0, b0 = lines[current]
        nxt = None
        for name, (a, b) in lines.items():
            if b < b0 - 1e-12:
                cross = (a - a0) / (b0 - b)
                if cross > t - 1e-9 and (nxt is None or cross < nxt[0] - 1e-9 or
                                          (abs(cross - nxt[0]) <= 1e-9 and b < lines[nxt[1]][1])):
                    nxt = (cross, name)
        if nxt is None:
            return points
        points.append((nxt[0], current, nxt[1]))
        t, current = nxt


# KV cache ------------------------------------------------------------------------------------------
def kv_bytes_per_token(config: ModelConfig, chips: int, attention: str, kv_bytes: int) -> float:
    """KV bytes per chip for one token of one sequence that the chip holds (all layers)."""
    if attention not in ATTENTION:
        raise ConfigError(f"attention: must be one of {ATTENTION}, got {attention!r}")
    if config.arch == "kraken":
        per_chip_heads = config.kv_heads * config.n_sub / chips
    elif attention == "heads":
        per_chip_heads = math.ceil(config.kv_heads / chips)
    else:
        per_chip_heads = config.kv_heads
    return 2 * config.n_layer * per_chip_heads * config.head_size * kv_bytes


def sequences_per_chip(config: ModelConfig, batch: int, chips: int, attention: str) -> int:
    """Sequences whose cache a chip holds: all of them when sharded over heads, ceil(B/n) over batch."""
    if attention == "batch" and config.arch != "kraken":
        return math.ceil(batch / chips)
    return batch


def kv_cache_bytes_per_chip(config: ModelConfig, batch: int, context: int, chips: int, attention: str,
                            kv_bytes: int) -> float:
    """KV cache bytes on one chip for ``batch`` sequences of ``context`` tokens."""
    return (kv_bytes_per_token(config, chips, attention, kv_bytes) * context
            * sequences_per_chip(config, batch, chips, attention))


def kraken_ops(config: ModelConfig, tp: int, tokens: float, chips_per_node: int = 0) -> list[CommOp]:
    """Collectives of one Kraken layer on ``tp`` chips (module docstring)."""
    n, d = config.n_sub, config.n_embd
    if tp % n and n % tp:
        raise ConfigError(f"tp: Kraken with {n} sub-layers runs on T = N, T dividing N or a multiple of N "
                          f"chips, got T={tp}")
    if tp <= n:
        return [CommOp("all_reduce", tokens * d, mesh_group((tp,), (0,), chips_per_node), overlapped=True)]
    dims = (n, tp // n)  # (sub-layer group, shard): a sub-layer's shards are neighbours
    shards, exchange = mesh_group(dims, (1,), chips_per_node), mesh_group(dims, (0,), chips_per_node)
    return [CommOp("all_reduce", tokens * d, shards), CommOp("all_reduce", tokens * d, shards),
            CommOp("all_reduce", tokens * d, exchange, overlapped=True)]


def _check_heads(heads: int, width: int, ways: int, unit: str) -> None:
    """Whole heads per shard: ``heads`` divisible by ``ways``, or more shards than heads (padded to one per
    shard) but no more than ``width`` columns."""
    if ways <= heads and heads % ways:
        raise ConfigError(f"chips: {heads} attention heads{unit} do not split evenly over {ways} chips; use a "
                          f"divisor of {heads}, or more chips than heads (padded to one head per chip)")
    if ways > width:
        raise ConfigError(f"chips: {ways} chips{unit} exceed the model width n_embd={width}: a tensor-parallel "
                          f"shard must hold at least one column")


def check_split(config: ModelConfig, tp: int, stages: int = 1, chips_per_node: int = 0) -> None:
    """Refuse a split of ``config`` over ``tp`` chips per stage x ``stages`` pipeline stages that no real
    system runs (module docstring, "Valid splits"), naming the field and the constraint."""
    for key, value in (("chips", tp), ("stages", stages)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key}: must be a positive integer, got {value!r}")
    if stages > config.n_layer:
        raise ConfigError(f"stages: {stages} pipeline stages exceed the model's {config.n_layer} layers")
    if config.arch == "kraken":
        if tp % config.n_sub and config.n_sub % tp:
            raise ConfigError(f"chips: Kraken with {config.n_sub} sub-layers runs on T = N, T dividing N or a "
                              f"multiple of N chips per stage, got T={tp}")
        if tp > config.n_sub:
            _check_heads(config.n_head, config.n_embd, tp // config.n_sub, " per sub-layer")
    else:
        _check_heads(config.n_head, config.n_embd, tp, "")
    total, c = tp * stages, chips_per_node
    if c and total > c and (total % c or (tp % c and c % tp)):
        raise ConfigError(f"chips: {stages} stage(s) x {tp} chips do not tile nodes of {c} chips; use a "
                          f"tensor-parallel degree that divides {c} or is a multiple of it, and whole nodes")
