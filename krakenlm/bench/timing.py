"""Timing discipline for shared, noisy CPUs: idle wait, per-round CPU accounting, robust statistics.

Timings on this kind of machine vary by +-30% run to run, so absolute numbers are weak and
*paired* ratios are what we trust: every configuration is run once per round, the rounds are
interleaved, and the ratio of two configurations is taken inside each round before the median.
Rounds during which other processes used the CPU are dropped and counted, never silently kept.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from krakenlm.cpuload import CLK_TCK, other_busy_cores


def wait_for_idle(own_pids: list[int], threshold_cores: float, max_wait_s: float) -> tuple[float, float]:
    """Block until other processes use less than ``threshold_cores`` (or ``max_wait_s`` passed).

    Returns (seconds waited, the last measured busy cores); a caller that timed out still runs the
    round, and the round's own accounting decides whether it is kept.
    """
    start = time.monotonic()
    busy = other_busy_cores(own_pids)
    while busy > threshold_cores and time.monotonic() - start < max_wait_s:
        time.sleep(0.5)
        busy = other_busy_cores(own_pids)
    return time.monotonic() - start, busy


@dataclass
class Stats:
    median: float
    min: float
    max: float
    n: int

    @staticmethod
    def of(samples: list[float]) -> Stats:
        return Stats(statistics.median(samples), min(samples), max(samples), len(samples))


@dataclass
class RoundLog:
    """What happened in each round: kept or dropped, and how much CPU other processes used."""

    other_cpu_s: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    idle_wait_s: list[float] = field(default_factory=list)
    kept: list[bool] = field(default_factory=list)

    def add(self, other_cpu_s: float, wall_s: float, idle_wait_s: float, max_other_cores: float) -> bool:
        keep = other_cpu_s <= max_other_cores * wall_s + 2 / CLK_TCK  # /proc/stat counts in ticks
        self.other_cpu_s.append(other_cpu_s)
        self.wall_s.append(wall_s)
        self.idle_wait_s.append(idle_wait_s)
        self.kept.append(keep)
        return keep

    @property
    def n_kept(self) -> int:
        return sum(self.kept)

    def to_dict(self) -> dict[str, object]:
        return {"kept": self.n_kept, "dropped": len(self.kept) - self.n_kept, "other_cpu_s": self.other_cpu_s,
                "wall_s": self.wall_s, "idle_wait_s": self.idle_wait_s, "kept_mask": self.kept}


def paired_ratio(numerator: list[float], denominator: list[float]) -> Stats:
    """Statistics of the per-round ratio numerator[i] / denominator[i] (same rounds, same order)."""
    return Stats.of([a / b for a, b in zip(numerator, denominator, strict=True)])


def geometric_mean(values: list[float]) -> float:
    return statistics.geometric_mean(values) if values else float("nan")
