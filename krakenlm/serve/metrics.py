"""Prometheus metrics of one server (its own registry, so several servers in one process never mix):
TTFT / TPOT / e2e histograms, queue depth, running batch size, tokens and tokens/s, outcomes."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

RATE_WINDOW_S = 10.0  # tokens/s is averaged over this window
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    """Updated by the engine thread and the front end; read by /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("krakenlm_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("krakenlm_time_per_output_token_seconds", "Mean gap between output tokens after "
                              "the first, per request", registry=r, buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("krakenlm_e2e_request_latency_seconds", "Arrival to last token", registry=r,
                             buckets=_LATENCY_BUCKETS)
        self.queue = Gauge("krakenlm_queue_depth", "Requests waiting for a batch row", registry=r)
        self.batch = Gauge("krakenlm_running_requests", "Requests in the running batch", registry=r)
        self.generated = Counter("krakenlm_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("krakenlm_requests", "Requests by outcome", ["outcome"], registry=r)
        rate = Gauge("krakenlm_generation_tokens_per_second", f"Tokens/s over the last {RATE_WINDOW_S:g} s",
                     registry=r)
        rate.set_function(self.tokens_per_second)
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def waiting(self, n: int) -> None:
        self.queue.set(n)

    def running(self, n: int) -> None:
        self.batch.set(n)

    def outcome(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def tokens(self, n: int, now: float) -> None:
        self.generated.inc(n)
        with self._lock:
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.perf_counter()
        with self._lock:
            return sum(n for t, n in self._recent if t >= now - RATE_WINDOW_S) / RATE_WINDOW_S

    def finished(self, arrival: float, first: float, last: float, tokens: int, outcome: str) -> None:
        self.ttft.observe(first - arrival)
        if tokens > 1:
            self.tpot.observe((last - first) / (tokens - 1))
        self.e2e.observe(last - arrival)
        self.outcome(outcome)

    def text(self) -> bytes:
        return generate_latest(self.registry)
