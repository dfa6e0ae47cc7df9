"""Time of one collective: a latency term (alpha x steps) plus a bandwidth term.

D is bytes per chip: the *output* of an all-gather, the *input* of a reduce-scatter or all-reduce,
the data a chip holds before an all-to-all. K is the group size, bw = link_bw * comm_eff.

    all-gather, reduce-scatter:  steps * alpha + D * f(K) / bw'
    all-reduce (RS + AG):        2 * (steps * alpha + D * f(K) / bw')
    all-to-all:                  steps * alpha + D * f(K) / bw' * a2a

f(K) = (K-1)/K when ``ring_factor`` is set, else 1 (the paper's approximation).
steps: switch 1, ring K-1, torus sum over the group's axes of (axis-1).
a2a: 1 on a switch (every chip sends (K-1)/K of its data through its own link); 1/4 on a ring or
torus (bidirectional ring estimate, about a quarter of an all-gather).
bw' = bw for ``axis_bandwidth="full"``; on a torus with ``"per_axis"``, bw * (axes used / axes).
"""

from __future__ import annotations

from dataclasses import dataclass

from krakenlm.costmodel.hardware import Hardware
from krakenlm.errors import ConfigError

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")


@dataclass(frozen=True)
class Group:
    """The chips taking part in one collective: their mesh axis sizes (product = group size)."""

    axes: tuple[int, ...]

    @property
    def size(self) -> int:
        out = 1
        for a in self.axes:
            out *= a
        return out


def collective_time(kind: str, nbytes: float, group: Group, hw: Hardware) -> float:
    """Seconds for one collective of ``nbytes`` per chip over ``group`` on ``hw``."""
    if kind not in KINDS:
        raise ConfigError(f"collective: kind must be one of {KINDS}, got {kind!r}")
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
    factor = (k - 1) / k if hw.ring_factor else 1.0
    phase = steps * hw.alpha + nbytes * factor / bw
    if kind == "all_reduce":
        return 2 * phase
    if kind == "all_to_all":
        a2a = 1.0 if hw.topology == "switch" else 0.25
        return steps * hw.alpha + nbytes * factor / bw * a2a
    return phase
