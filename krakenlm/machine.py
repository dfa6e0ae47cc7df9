"""The running machine, as measurements are keyed: its identity and a small cache of what was measured.

Choices made by measurement (the dtype for ``--dtype auto``, the attention kernel per shape, the
roofline probe, the cost model's spec calibrated here) are measured once and kept in JSON files
under ``$KRAKENLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/krakenlm``, else ``~/.cache/krakenlm``, keyed
by the processor (CPU model or GPU name), the torch version and the thread count: machines change
between sessions, and a number measured on one must never steer another. A cache never fails a run:
an unreadable or corrupt file is ignored with a warning, an unwritable directory only costs a
re-measurement next time.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from krakenlm.cpuload import other_busy_cores


def cache_dir() -> Path:
    """Where measurements are kept (created on first write)."""
    if os.environ.get("KRAKENLM_CACHE_DIR"):
        return Path(os.environ["KRAKENLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "krakenlm"


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo states it (what every figure is recorded with)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def processor(device: torch.device) -> str:
    """The processor a device runs on: the GPU's name, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def machine_key(device: torch.device) -> str:
    """Identity of measurements on ``device`` with the current thread count."""
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return f"{processor(device)}|torch {torch.__version__}|{device.type}|threads {threads}"


class MeasurementCache:
    """One JSON object {key: value} in the cache directory, read once per process.

    Writes go through a temporary file and a rename, so concurrent processes (the ranks of one run)
    never read half a file; the last writer wins, and an entry lost that way is measured again.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._entries: dict[str, Any] | None = None

    @property
    def path(self) -> Path:
        return cache_dir() / f"{self.name}.json"

    def _load(self) -> dict[str, Any]:
        if self._entries is None:
            self._entries = {}
            if self.path.exists():
                try:
                    data = json.loads(self.path.read_text())
                    if not isinstance(data, dict):
                        raise ValueError("not a JSON object")
                    self._entries = data
                except (OSError, ValueError) as err:
                    warnings.warn(f"krakenlm: ignoring the unreadable measurement cache {self.path} ({err}); "
                                  "measuring again", RuntimeWarning, stacklevel=3)
        return self._entries

    def get(self, key: str) -> Any:
        """The cached value, or None."""
        return self._load().get(key)

    def put(self, key: str, value: Any) -> None:
        """Remember ``value`` in this process and, where the directory is writable, on disk."""
        entries = self._load()
        entries[key] = value
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.name}.")
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as err:
            warnings.warn(f"krakenlm: cannot write the measurement cache {self.path} ({err})", RuntimeWarning,
                          stacklevel=2)

    def forget(self) -> None:
        """Drop the in-process copy (the file is read again on next use)."""
        self._entries = None


class MeasuredChoice:
    """Which of several exact implementations is fastest here, per key: measured on first use (``measure``
    returns seconds per candidate), then read from memory or the cache file."""

    def __init__(self, name: str) -> None:
        self.cache = MeasurementCache(name)
        self._memo: dict[str, str] = {}

    def pick(self, key: str, measure: Callable[[], dict[str, float]], candidates: tuple[str, ...] | None = None
             ) -> str:
        """The fastest candidate for ``key``; a cached entry that measured other ``candidates`` (a form added
        since) is measured again."""
        if key not in self._memo:
            entry = self.cache.get(key)
            seconds = entry.get("seconds") if isinstance(entry, dict) else None
            seconds = seconds if isinstance(seconds, dict) else {}
            if (not isinstance(entry, dict) or entry.get("choice") not in seconds
                    or (candidates is not None and set(seconds) != set(candidates))):
                seconds = measure()
                entry = {"choice": min(seconds, key=seconds.__getitem__), "seconds": seconds}
                self.cache.put(key, entry)
            self._memo[key] = entry["choice"]
        return self._memo[key]

    def forget(self) -> None:
        """Drop what this process remembers (the next pick reads the file again)."""
        self._memo.clear()
        self.cache.forget()


MACHINE_SPECS = MeasurementCache("hardware")  # cost-model specs calibrated here (krakenlm/bench/spec.py)


def spec_key() -> str:
    """A calibrated spec's key: the CPU and torch version (its ranks run one thread each)."""
    return f"{cpu_model()}|torch {torch.__version__}"


def machine_spec() -> dict[str, Any] | None:
    """The cost-model spec calibrated on this machine (a Hardware dict), if one was made."""
    spec = MACHINE_SPECS.get(spec_key())
    return spec if isinstance(spec, dict) else None


def _other_cores_busy(device: torch.device) -> bool:
    """Whether other processes keep the CPU busy right now (a shared machine's noise)."""
    if device.type != "cpu":
        return False
    try:
        return other_busy_cores([os.getpid()], 0.05) > 0.3
    except OSError:
        return False


# A call this long (e.g. a bf16 GEMM at 1.3B shapes on a CPU without bf16 instructions, ~60x slower than
# fp32) is timed once: its one-time costs are negligible, and repeating it would cost minutes.
LONG_CALL_S = 1.0


def fastest_seconds(run: Callable[[], object], device: torch.device, repeats: int = 5, budget_s: float = 0.03,
                    idle_wait_s: float = 2.0) -> float:
    """Best seconds per call of ``run`` over ``repeats`` timed batches of about ``budget_s`` each; a call
    that takes ``LONG_CALL_S`` or more is timed once.

    The minimum is the right statistic for a capability (noise only ever adds time). On a CPU with
    one compute thread the clock is that thread's CPU time, which other processes sharing the core
    cannot inflate; otherwise wall time, after waiting up to ``idle_wait_s`` for the CPU to go idle.
    """
    one_thread = device.type == "cpu" and torch.get_num_threads() == 1
    clock = time.thread_time if one_thread else time.perf_counter

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed() -> float:
        start = clock()
        run()
        sync()
        return clock() - start

    first = timed()  # warm-up: allocations, kernel selection
    if first >= 2 * LONG_CALL_S:
        return first
    second = timed()
    if second >= LONG_CALL_S:
        return second
    calls = max(1, int(budget_s / max(second, 1e-6)))
    best = float("inf")
    for _ in range(repeats):
        deadline = time.monotonic() + (0.0 if one_thread else idle_wait_s)
        while time.monotonic() < deadline and _other_cores_busy(device):
            time.sleep(0.05)
        start = clock()
        for _ in range(calls):
            run()
        sync()
        best = min(best, (clock() - start) / calls)
    return best


@contextlib.contextmanager
def busy_cores(count: int, dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """``count`` threads doing one-thread GEMMs while the caller measures: a run with one rank per core
    has every core computing at once (shared caches and memory bandwidth; on a VM perhaps one physical
    core's hyperthreads), which a probe on otherwise idle cores never sees. Torch releases the GIL inside
    each GEMM, so the threads run in parallel with the caller."""
    stop = threading.Event()

    def spin() -> None:
        a = torch.randn(384, 384).to(dtype)
        while not stop.is_set():
            torch.mm(a, a)

    threads = [threading.Thread(target=spin, name=f"krakenlm-busy-{i}", daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join()
