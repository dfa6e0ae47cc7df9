"""CPU time accounting from /proc: the whole machine's busy seconds, one process's, and the cores other
processes keep busy. The primitive under both the benchmark's timing discipline (krakenlm.bench.timing)
and the machine probes' idle check (krakenlm.machine), so it sits below both."""

from __future__ import annotations

import os
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")  # /proc counts CPU time in these ticks


def system_busy_seconds() -> float:
    """CPU seconds spent in user, nice and system mode by the whole machine since boot.

    irq/softirq are left out on purpose: loopback and veth traffic of our own ranks is handled
    there and cannot be attributed to a process.
    """
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system = (int(v) for v in fields[1:4])
    return (user + nice + system) / CLK_TCK


def process_cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of one process, all its threads included."""
    with open(f"/proc/{pid}/stat") as f:
        after_name = f.read().rsplit(")", 1)[1].split()
    return (int(after_name[11]) + int(after_name[12])) / CLK_TCK


def other_busy_cores(own_pids: list[int], interval: float = 0.25) -> float:
    """Average number of cores that processes other than ``own_pids`` kept busy over ``interval``."""
    def own() -> float:
        total = 0.0
        for pid in own_pids:
            try:
                total += process_cpu_seconds(pid)
            except (FileNotFoundError, ProcessLookupError):
                continue
        return total

    sys0, own0, t0 = system_busy_seconds(), own(), time.perf_counter()
    time.sleep(interval)
    sys1, own1, t1 = system_busy_seconds(), own(), time.perf_counter()
    return max(0.0, (sys1 - sys0) - (own1 - own0)) / (t1 - t0)
