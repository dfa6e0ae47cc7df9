"""The engine loop on rank 0: one thread steps the shared Scheduler and the Engine, so the HTTP event
loop never waits for a step.

Each iteration follows the scheduler's step semantics (krakenlm.batching.scheduler): requests that
finished or were cancelled leave at the boundary; the step's prompt chunks (newcomers, and long
prompts prefilled ``prefill_chunk`` tokens a step) are prefilled, the new requests' in one batched
forward, and each request whose prompt is complete has its first token published at once (TTFT);
then one decode step runs for the requests that were already running. Tokens become text (stop
strings included) here, so a request stops on the step that completes its stop string. Events go to
each request's consumer through ``publish``, one call per step's prefill and one per decode step.

A rank that dies (its process exits, or a collective fails or times out) fails every request with
503 and leaves the runner dead; /health reports why. ``stop`` drains: it refuses new requests and
returns once every admitted or waiting one has finished.
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from krakenlm.batching.scheduler import BatchingPolicy, QueueFull, Request, Scheduler, StepPlan
from krakenlm.engine import Engine
from krakenlm.errors import DistributedError
from krakenlm.generate import SamplingConfig
from krakenlm.serve.metrics import ServeMetrics
from krakenlm.serve.protocol import ApiError
from krakenlm.serve.text import TextStream

IDLE_POLL_S = 0.2  # how often an idle loop checks that the follower ranks still run


@dataclass(frozen=True)
class Event:
    """What a request's consumer receives: new text; ``finish`` ("stop" | "length") on its last event;
    or an ``error`` (then nothing follows)."""

    text: str = ""
    finish: str | None = None
    error: ApiError | None = None


@dataclass(eq=False)
class Job:
    """One request on its way through the loop: its tokens, settings and timings (perf_counter seconds).
    ``consumer`` is whatever the front end delivers events to (an asyncio queue)."""

    id: str
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    text: TextStream
    stop_tokens: tuple[int, ...] = ()
    consumer: Any = None
    arrival: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None
    produced: int = 0  # tokens of output (a stop token is not output)
    started: bool = False  # admitted into a row
    cancelled: bool = False
    finish: str | None = None

    @property
    def done(self) -> bool:
        return self.finish is not None or self.cancelled


Publish = Callable[[list[tuple[Job, Event]]], None]


class Runner:
    """Owns the Scheduler (under a lock shared with the front end) and the engine thread."""

    def __init__(self, engine: Engine, policy: BatchingPolicy, metrics: ServeMetrics) -> None:
        self.engine, self.metrics = engine, metrics
        self.scheduler = Scheduler(policy, engine.config.block_size)
        self.publish: Publish = lambda events: None
        self.dead: str | None = None
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self, publish: Publish) -> None:
        """Start the engine thread; ``publish`` delivers events (called from that thread)."""
        self.publish = publish
        self._thread = threading.Thread(target=self._loop, name="krakenlm-engine-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, let admitted and waiting ones finish, end the thread."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job: ApiError 503 when dead or draining; the scheduler's InputError / QueueFull pass on."""
        with self._lock:
            if self.dead is not None:
                raise ApiError(503, f"the engine is down: {self.dead}")
            if self._stopping:
                raise ApiError(503, "the server is shutting down")
            try:
                self.scheduler.submit(Request(job.id, len(job.prompt), job.max_new_tokens, payload=job))
            except QueueFull:
                self.metrics.outcome("queue_full")
                raise
            self._jobs[job.id] = job
            self.metrics.waiting(self.scheduler.waiting)
        self._wake.set()

    def cancel(self, job: Job) -> None:
        """The client is gone: drop a waiting job now; a running one's row is freed at the next boundary."""
        with self._lock:
            if job.done:
                return
            job.cancelled = True
            self.scheduler.cancel(job.id)
            if not job.started:
                self._jobs.pop(job.id, None)
            self.metrics.outcome("cancelled")

    def health(self) -> dict[str, Any]:
        """{"status": "ok" | "draining" | "unhealthy", ...} (polls the follower ranks, no collective)."""
        reason = self.dead or self.engine.peer_failure()
        status = "unhealthy" if reason else "draining" if self._stopping else "ok"
        with self._lock:
            counts = {"running": self.scheduler.running, "waiting": self.scheduler.waiting}
        return ({"status": status, "ranks": self.engine.world, "max_batch": self.scheduler.policy.max_batch, **counts}
                | ({"error": reason} if reason else {}))

    def warmup(self) -> None:
        """A prefill and decode steps of one row and of two before serving (allocations; a compiled step's
        graphs of both widths, krakenlm.batching.scheduler.decode_shape)."""
        rows = list(range(min(2, self.scheduler.policy.max_batch)))
        for row in rows:
            self.engine.prefill_row(row, [0])
        self.engine.decode_rows([0])
        if len(rows) > 1:
            self.engine.decode_rows(rows)

    # The engine thread -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while (plan := self._next_plan()) is not None:
                self._step(plan)
        except DistributedError as err:
            self._die(str(err))
        except BaseException as err:  # a bug: fail every request rather than leave them hanging
            traceback.print_exc()
            self._die(f"internal error: {type(err).__name__}: {err}")

    def _next_plan(self) -> StepPlan | None:
        """The next step's plan; waits while idle; None once stopping with nothing left."""
        while True:
            failure = self.engine.peer_failure()
            if failure is not None:
                raise DistributedError(f"rank 0: {failure}")
            with self._lock:
                plan = self.scheduler.plan()
                for departure in plan.left:
                    self._jobs.pop(str(departure.request.id), None)
                for request, _ in plan.admit:
                    request.payload.started = True
                self.metrics.waiting(self.scheduler.waiting)
                self.metrics.running(self.scheduler.running)
                if not plan.empty:
                    return plan
                if self._stopping:
                    return None
                self._wake.clear()
            self._wake.wait(IDLE_POLL_S)

    def _step(self, plan: StepPlan) -> None:
        chunks = [c for c in plan.prefill if not c.request.payload.cancelled]
        if chunks:
            jobs: list[Job] = [c.request.payload for c in chunks]
            tokens = self.engine.prefill_rows([c.row for c in chunks], [j.prompt[c.start:c.stop] for c, j in
                                              zip(chunks, jobs, strict=True)], [j.sampling for j in jobs],
                                              starts=[c.start for c in chunks], last=[c.last for c in chunks])
            firsts = [(job, token) for job, token in zip(jobs, tokens, strict=True) if token is not None]
            if firsts:
                self.publish(self._emit(firsts))
        live = [(request.payload, row) for request, row in plan.decode if not request.payload.cancelled]
        if live:
            tokens = self.engine.decode_rows([row for _, row in live])
            self.publish(self._emit([(job, token) for (job, _), token in zip(live, tokens, strict=True)]))

    def _emit(self, produced: list[tuple[Job, int]]) -> list[tuple[Job, Event]]:
        """Record one token per job (text, stop, finish, metrics) and the events to publish."""
        now, events = time.perf_counter(), []
        for job, token in produced:
            eos = token in job.stop_tokens
            text = "" if eos else job.text.push(token)
            job.produced += not eos
            stop = eos or job.text.stopped
            job.first = job.first if job.first is not None else now
            job.last = now
            with self._lock:
                if job.cancelled:
                    continue
                finished = self.scheduler.token(job.id, stop=stop)
                if finished:
                    job.finish = "stop" if stop else "length"
            if finished:
                text += job.text.flush()
                self.metrics.finished(job.arrival, job.first, job.last, job.produced, job.finish)
            events.append((job, Event(text, job.finish)))
        self.metrics.tokens(len(events), now)
        return events

    def interrupt(self, reason: str) -> None:
        """End every outstanding request now with a 503 naming ``reason`` and refuse new ones (a drain that ran
        out of time: clients get an error they can read, not a cut connection); the loop frees their rows."""
        with self._lock:
            self._stopping = True
            jobs = [job for job in self._jobs.values() if not job.done]
            for job in jobs:
                job.cancelled = True
                self.scheduler.cancel(job.id)
                if not job.started:
                    self._jobs.pop(job.id, None)
        self._fail(jobs, ApiError(503, reason), "interrupted")
        self._wake.set()

    def _die(self, reason: str) -> None:
        """Fail every outstanding request with 503 and refuse new ones; nothing runs or waits any more."""
        with self._lock:
            self.dead = reason
            jobs = [job for job in self._jobs.values() if not job.done]
            self._jobs.clear()
            self.scheduler = Scheduler(self.scheduler.policy, self.scheduler.context)  # /health counts nothing
        self.metrics.waiting(0)
        self.metrics.running(0)
        for job in jobs:
            job.finish = "error"
        self._fail(jobs, ApiError(503, f"the engine is down: {reason}"), "error")

    def _fail(self, jobs: list[Job], error: ApiError, outcome: str) -> None:
        for _ in jobs:
            self.metrics.outcome(outcome)
        self.publish([(job, Event(error=error)) for job in jobs])


def job_id() -> str:
    """A unique completion id, like OpenAI's ``cmpl-...``."""
    return f"cmpl-{uuid.uuid4().hex}"
