"""Iteration-level scheduler: which requests run in the next engine step, and in which KV-cache row.

A pure-Python state machine (no torch, no clock, no threads): the HTTP server drives it with the real
engine and the cost model's simulator with predicted step times, so both run the same admission code.

Step semantics (every driver implements exactly this):

1. At a step boundary the driver calls ``plan()``. Running requests that finished (their last token
   reported, or stopped) or were cancelled leave first, freeing their rows and reserved tokens; they
   are listed in ``StepPlan.left``.
2. ``StepPlan.decode`` holds every running request whose prompt is wholly in its row: all of them
   were running before this step. ``StepPlan.admit`` holds waiting requests in FIFO order that fit (a
   free row, their reserved tokens within ``max_tokens``, at most ``max_prefills_per_step`` of them,
   prefill budget left), stopping at the first request that does not fit (no reordering, so a large
   request is never starved by small ones behind it). Admitted requests take the lowest free rows.
3. ``StepPlan.prefill`` holds this step's prompt chunks: first the requests admitted earlier whose
   prompt is still partly prefilled, then the newcomers, oldest first, within ``prefill_chunk``
   prompt tokens per step (0: every prompt whole). The driver prefills them, all in one batched
   forward where it can; a chunk that ends its prompt (``Chunk.last``) yields the request's first token.
   So a long prompt is prefilled over several steps while the running requests keep decoding.
4. Then ONE decode step runs for the ``decode`` set: one token each. Requests whose prompt was
   finished by this step join decode from the next step.
5. The driver reports every token (the first comes from the last chunk) with ``token(id, stop=...)``;
   a request is finished when it has ``max_new_tokens`` tokens or the driver says stop (a stop
   token), and leaves at the next boundary.

``cancel(id)`` drops a waiting request at once; a running one keeps its row until the next boundary
(its tokens of the current step may still be reported). A request is refused at ``submit`` when it can
never run (prompt + max_new_tokens above the context or ``max_tokens``: ``InputError``) or when
``max_queue`` requests already wait (``QueueFull``, HTTP 429 for the server).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from krakenlm.errors import InputError, KrakenError

REASONS = ("finished", "stopped", "cancelled")
LIMIT = 1 << 40  # upper bound of every count: keeps arithmetic exact and rejects absurd values


class QueueFull(KrakenError):
    """The waiting queue is full: the request is refused now and may be retried (HTTP 429)."""


def _count(owner: str, key: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= LIMIT:
        raise InputError(f"{owner}: {key} must be an integer in [{minimum}, {LIMIT}], got {value!r}")


KEYS_FLOOR = 64  # the shortest key window a decode step attends over
KEYS_STEP = 16  # an eager step's key window grows in these steps (the keys past a row's length are masked reads)


def bucket(n: int, limit: int, floor: int = 1) -> int:
    """The smallest power of two >= n, within [floor, limit]: the engine's step shapes (few distinct shapes,
    so a compiled step keeps few graphs, while short batches and contexts do little wasted work)."""
    return min(limit, max(floor, 1 << max(0, n - 1).bit_length()))


def decode_shape(rows: list[int], lengths: list[int], batch: int, context: int, compiled: bool = False
                 ) -> tuple[int, int]:
    """The (rows, keys) an engine's decode step computes for running ``rows`` whose cached lengths are
    ``lengths``. Eager: every row up to the highest one in use (idle rows below it included), over the
    longest context rounded up to ``KEYS_STEP``, so a step reads little more cache than its rows hold (at
    8 rows of 140 tokens, GPT-2 fp32, a power-of-two window of 256 made attention 19 ms of a ~90 ms step
    on an Intel Xeon family 6 model 167, against 8 ms over 160). Compiled: row 0 alone, or else all
    ``batch`` rows (static shapes: a lone request does not pay for the batch, as it did at 125 ms a token
    against 45 eager for GPT-2 at batch 8), over a power-of-two window, so the step keeps few graphs."""
    longest = max(lengths) + 1
    if compiled:
        return 1 if max(rows) == 0 else batch, bucket(longest, context, floor=KEYS_FLOOR)
    return max(rows) + 1, min(context, max(KEYS_FLOOR, -(-longest // KEYS_STEP) * KEYS_STEP))


@dataclass(frozen=True)
class BatchingPolicy:
    """Limits of the engine's continuous batching.

    max_batch: running sequences (= KV-cache rows); max_tokens: KV tokens reserved by the running
    requests (each reserves prompt_len + max_new_tokens); max_queue: waiting requests before a submit
    is refused; max_prefills_per_step: newcomers admitted per step (0 = as many as fit);
    prefill_chunk: prompt tokens prefilled per step, over all requests (0 = whole prompts): a long
    prompt then takes several steps and does not stall the running requests' decoding for its whole prefill.
    """

    max_batch: int = 8
    max_tokens: int = 16384
    max_queue: int = 256
    max_prefills_per_step: int = 0
    prefill_chunk: int = 0

    def __post_init__(self) -> None:
        _count("batching policy", "max_batch", self.max_batch, 1)
        _count("batching policy", "max_tokens", self.max_tokens, 1)
        _count("batching policy", "max_queue", self.max_queue, 1)
        _count("batching policy", "max_prefills_per_step", self.max_prefills_per_step, 0)
        _count("batching policy", "prefill_chunk", self.prefill_chunk, 0)


@dataclass(frozen=True)
class Request:
    """A generation request as the scheduler sees it; ``payload`` carries the driver's own data
    (token ids, sampling settings, a response stream) untouched."""

    id: str | int
    prompt_len: int
    max_new_tokens: int
    payload: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.id, (str, int)) or isinstance(self.id, bool):
            raise InputError(f"request: id must be a string or an integer, got {self.id!r}")
        _count(f"request {self.id!r}", "prompt_len", self.prompt_len, 1)
        _count(f"request {self.id!r}", "max_new_tokens", self.max_new_tokens, 1)

    @property
    def tokens(self) -> int:
        """KV tokens the request reserves: prompt + every token it may generate."""
        return self.prompt_len + self.max_new_tokens


@dataclass(frozen=True)
class Departure:
    """A running request that left at a step boundary, its row now free."""

    request: Request
    row: int
    reason: str  # one of REASONS
    tokens: int  # tokens it produced


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens [start, stop) of a request to prefill into its row this step."""

    request: Request
    row: int
    start: int
    stop: int

    @property
    def last(self) -> bool:
        """This chunk ends the prompt: its logits give the request's first token."""
        return self.stop == self.request.prompt_len


@dataclass(frozen=True)
class StepPlan:
    """What the next step runs: the prompt chunks of ``prefill`` (``admit``: the requests that took a row
    this step), then one decode step of ``decode``."""

    admit: list[tuple[Request, int]]
    decode: list[tuple[Request, int]]
    left: list[Departure]
    prefill: list[Chunk] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Nothing to run (the driver waits for a submit)."""
        return not self.prefill and not self.decode


@dataclass
class _Running:
    request: Request
    row: int
    produced: int = 0
    prefilled: int = 0  # prompt tokens in the row (planned)
    done: str = ""  # "" while running, else the reason it will leave with


class Scheduler:
    """FIFO admission into ``policy.max_batch`` rows of ``context`` tokens (module docstring)."""

    def __init__(self, policy: BatchingPolicy, context: int) -> None:
        if not isinstance(policy, BatchingPolicy):
            raise InputError(f"scheduler: policy must be a BatchingPolicy, got {type(policy).__name__}")
        _count("scheduler", "context", context, 1)
        self.policy, self.context = policy, context
        self._waiting: deque[Request] = deque()
        self._waiting_ids: set[str | int] = set()
        self._running: dict[str | int, _Running] = {}
        self._free_rows: list[int] = []  # rows released by departed requests (a heap)
        self._next_row = 0  # rows never used yet start here (no list of max_batch rows is built)
        self._reserved = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def reserved_tokens(self) -> int:
        return self._reserved

    @property
    def idle(self) -> bool:
        """No request waiting or running."""
        return not self._waiting and not self._running

    def submit(self, request: Request) -> None:
        """Queue ``request``; InputError if it can never run or its id is in use, QueueFull if the queue is full."""
        if not isinstance(request, Request):
            raise InputError(f"scheduler: submit takes a Request, got {type(request).__name__}")
        limit = min(self.context, self.policy.max_tokens)
        if request.tokens > limit:
            what = "context" if self.context <= self.policy.max_tokens else "max_tokens"
            raise InputError(f"request {request.id!r}: prompt_len {request.prompt_len} + max_new_tokens "
                             f"{request.max_new_tokens} = {request.tokens} tokens exceed the {what} of {limit}")
        if request.id in self._running or request.id in self._waiting_ids:
            raise InputError(f"request {request.id!r}: id already in use")
        if len(self._waiting) >= self.policy.max_queue:
            raise QueueFull(f"request {request.id!r}: {len(self._waiting)} requests already wait "
                            f"(max_queue {self.policy.max_queue}); retry later")
        self._waiting.append(request)
        self._waiting_ids.add(request.id)

    def cancel(self, request_id: str | int) -> bool:
        """Drop a waiting request now, or free a running one's row at the next boundary; False if unknown
        or already finished."""
        if request_id in self._waiting_ids:
            self._waiting.remove(next(r for r in self._waiting if r.id == request_id))
            self._waiting_ids.discard(request_id)
            return True
        run = self._running.get(request_id)
        if run is None or run.done:
            return False
        run.done = "cancelled"
        return True

    def token(self, request_id: str | int, stop: bool = False) -> bool:
        """Record one token of a running request (``stop``: it ended generation); True when it is finished."""
        run = self._running.get(request_id)
        if run is None:
            raise InputError(f"request {request_id!r}: not running, cannot take a token")
        if run.prefilled < run.request.prompt_len:
            raise InputError(f"request {request_id!r}: its prompt is not prefilled yet, cannot take a token")
        if run.done in ("finished", "stopped"):
            raise InputError(f"request {request_id!r}: already finished after {run.produced} tokens")
        run.produced += 1
        if not run.done:
            if stop:
                run.done = "stopped"
            elif run.produced >= run.request.max_new_tokens:
                run.done = "finished"
        return run.done in ("finished", "stopped")

    def _take_row(self) -> int:
        """The lowest free row: released rows are all below the never-used ones."""
        if self._free_rows:
            return heapq.heappop(self._free_rows)
        self._next_row += 1
        return self._next_row - 1

    def plan(self) -> StepPlan:
        """Close the boundary (departures), then choose this step's decode set, admissions and chunks."""
        left = []
        for rid, run in list(self._running.items()):
            if run.done:
                del self._running[rid]
                heapq.heappush(self._free_rows, run.row)
                self._reserved -= run.request.tokens
                left.append(Departure(run.request, run.row, run.done, run.produced))
        decode = [(run.request, run.row) for run in self._running.values()
                  if run.prefilled == run.request.prompt_len]
        budget = self.policy.prefill_chunk or LIMIT
        prefill = []
        for run in self._running.values():  # chunked prompts continue first, oldest first
            if budget and run.prefilled < run.request.prompt_len:
                prefill.append(self._chunk(run, budget))
                budget -= prefill[-1].stop - prefill[-1].start
        admit: list[tuple[Request, int]] = []
        while budget and (run := self._admit(len(admit))) is not None:
            admit.append((run.request, run.row))
            prefill.append(self._chunk(run, budget))
            budget -= prefill[-1].stop - prefill[-1].start
        return StepPlan(admit=admit, decode=decode, left=left, prefill=prefill)

    def _chunk(self, run: _Running, budget: int) -> Chunk:
        """The next chunk of ``run``'s prompt within ``budget`` tokens (recorded as planned)."""
        start = run.prefilled
        run.prefilled = min(run.request.prompt_len, start + budget)
        return Chunk(run.request, run.row, start, run.prefilled)

    def _admit(self, admitted: int) -> _Running | None:
        """The first waiting request into the lowest free row, if it fits (FIFO: None stops admission)."""
        cap = self.policy.max_prefills_per_step or self.policy.max_batch
        if not self._waiting or len(self._running) >= self.policy.max_batch or admitted >= cap:
            return None
        request = self._waiting[0]
        if self._reserved + request.tokens > self.policy.max_tokens:
            return None
        self._waiting.popleft()
        self._waiting_ids.discard(request.id)
        run = self._running[request.id] = _Running(request, self._take_row())
        self._reserved += request.tokens
        return run
