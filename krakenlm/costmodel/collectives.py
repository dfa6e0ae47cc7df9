"""Time of one collective: a latency term (alpha x steps) plus a bandwidth term, on one fabric or
over a hierarchy of nodes.

D is bytes per chip: the *output* of an all-gather, the *input* of a reduce-scatter or all-reduce,
the data a chip holds before an all-to-all. K is the group size, bw = link_bw * comm_eff.

One fabric (the group inside one node, or a spec without nodes):

    all-gather, reduce-scatter:  steps * alpha + D * f(K) / bw'
    all-reduce (RS + AG):        2 * (steps * alpha + D * f(K) / bw')
    all-to-all:                  steps * alpha + D * f(K) / bw' * a2a

f(K) = (K-1)/K when ``ring_factor`` is set, else 1 (the paper's approximation).
steps: switch 1, ring K-1, torus sum over the group's axes of (axis-1).
a2a: 1 on a switch (every chip sends (K-1)/K of its data through its own link); 1/4 on a ring or
torus (bidirectional ring estimate, about a quarter of an all-gather).
bw' = bw for ``axis_bandwidth="full"``; on a torus with ``"per_axis"``, bw * (axes used / axes).

Across nodes (a group of K = m * k chips, k in each of m nodes; the two-level algorithm NCCL and
MPI use, one NIC per chip so the k chips of a node send in parallel):

    all-gather:      inter-node all-gather of D/k among the m chips of one local rank, then an
                     intra-node all-gather of D:   T_intra(D over k) + T_inter(D/k over m)
    reduce-scatter:  the same two phases in reverse order, same time
    all-reduce:      2 * (T_intra(D over k) + T_inter(D/k over m))
    all-to-all:      T_intra_a2a(D/m over k) + s_m * alpha_net + D * f(m) / bw_net

T_intra is the one-fabric phase above; T_inter(X over m) = s_m * alpha_net + X * f(m) / bw_net with
bw_net = inter_node_bw * inter_node_eff, s_m = m-1 on a ``ring`` network, 1 on a ``switch``. An
all-to-all sends D*f(m) of each chip's data off the node through its NIC (a fat tree has full
bisection). With m = 1 every formula is exactly the one-fabric one. When a group's chips are spread
unevenly over its nodes, k is the fullest node's share (the slowest one sets the pace).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from krakenlm.costmodel.hardware import Hardware
from krakenlm.errors import ConfigError

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")


@dataclass(frozen=True)
class Group:
    """The chips taking part in one collective: their mesh axis sizes (product = group size) and the
    number of nodes they span (1 = all inside one node or one fabric)."""

    axes: tuple[int, ...]
    nodes: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.nodes, int) or not 1 <= self.nodes <= max(1, self.size):
            raise ConfigError(f"collective group: nodes must be an integer in [1, {self.size}], got {self.nodes!r}")

    @property
    def size(self) -> int:
        return math.prod(self.axes)

    @property
    def per_node(self) -> int:
        """Chips of the group in its fullest node."""
        return -(-self.size // self.nodes)


def _factor(k: int, hw: Hardware) -> float:
    return (k - 1) / k if hw.ring_factor else 1.0


def _flat_time(kind: str, nbytes: float, group: Group, hw: Hardware) -> float:
    """One fabric: the formulas of the module docstring's first block."""
    k = group.size
    if k <= 1 or nbytes <= 0:
        return 0.0
    if hw.topology == "switch":
        steps = 1
    elif hw.topology == "ring":
        steps = k - 1
    else:
        steps = sum(a - 1 for a in group.axes if a > 1)
    bw = hw.link_bw * hw.comm_eff
    if hw.topology == "torus" and hw.axis_bandwidth == "per_axis":
        used = sum(1 for a in group.axes if a > 1)
        bw *= used / len(hw.torus_axes)
    factor = _factor(k, hw)
    phase = steps * hw.alpha + nbytes * factor / bw
    if kind == "all_reduce":
        return 2 * phase
    if kind == "all_to_all":
        a2a = 1.0 if hw.topology == "switch" else 0.25
        return steps * hw.alpha + nbytes * factor / bw * a2a
    return phase


def _network_time(nbytes: float, m: int, hw: Hardware) -> float:
    """One phase over the inter-node network among m nodes (one chip per node)."""
    if m <= 1 or nbytes <= 0:
        return 0.0
    steps = m - 1 if hw.inter_node_topology == "ring" else 1
    return steps * hw.inter_node_alpha + nbytes * _factor(m, hw) / (hw.inter_node_bw * hw.inter_node_eff)


def collective_time(kind: str, nbytes: float, group: Group, hw: Hardware) -> float:
    """Seconds for one collective of ``nbytes`` per chip over ``group`` on ``hw``."""
    if kind not in KINDS:
        raise ConfigError(f"collective: kind must be one of {KINDS}, got {kind!r}")
    if group.nodes == 1 or group.size <= 1 or nbytes <= 0:
        return _flat_time(kind, nbytes, group, hw)
    if not hw.chips_per_node:
        raise ConfigError(f"collective: a group over {group.nodes} nodes needs a spec with chips_per_node "
                          f"({hw.name} is one fabric)")
    m, k = group.nodes, group.per_node
    inner = Group((k,))
    if kind == "all_to_all":
        return _flat_time("all_to_all", nbytes / m, inner, hw) + _network_time(nbytes, m, hw)
    phase = _flat_time("all_gather", nbytes, inner, hw) + _network_time(nbytes / k, m, hw)
    return 2 * phase if kind == "all_reduce" else phase


def p2p_time(nbytes: float, hw: Hardware, across_nodes: bool, eff: float = 1.0) -> float:
    """One point-to-point send of ``nbytes`` from each chip to its peer (pipeline stages): latency plus
    bytes over the node fabric, or over the chip's NIC when the peer is in another node; ``eff`` scales
    that bandwidth (a collective matmul's ring hop: ``hw.ring_hop_eff``)."""
    if nbytes <= 0:
        return 0.0
    if across_nodes:
        return hw.inter_node_alpha + nbytes / (hw.inter_node_bw * hw.inter_node_eff * eff)
    return hw.alpha + nbytes / (hw.link_bw * hw.comm_eff * eff)
