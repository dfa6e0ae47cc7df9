"""The iteration-level scheduler shared by the server and the simulator: admission, rows, departures."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from krakenlm.batching.scheduler import BatchingPolicy, QueueFull, Request, Scheduler
from krakenlm.errors import InputError, KrakenError


def _ids(pairs) -> list:
    return [r.id for r, _ in pairs]


def test_fifo_admission_rows_and_the_decode_set() -> None:
    s = Scheduler(BatchingPolicy(max_batch=2, max_tokens=100, max_queue=8), context=64)
    for i, new in enumerate((3, 2, 2)):
        s.submit(Request(f"r{i}", prompt_len=4, max_new_tokens=new))
    step = s.plan()
    assert [(r.id, row) for r, row in step.admit] == [("r0", 0), ("r1", 1)] and step.decode == []
    assert s.waiting == 1 and s.running == 2 and s.reserved_tokens == 7 + 6
    assert not s.token("r0") and not s.token("r1")  # first tokens, from the prefills
    step = s.plan()  # newcomers of the last step now decode; no free row for r2
    assert _ids(step.decode) == ["r0", "r1"] and step.admit == [] and step.left == []
    assert not s.token("r0") and s.token("r1")  # r1 reached max_new_tokens
    step = s.plan()
    assert [(d.request.id, d.row, d.reason, d.tokens) for d in step.left] == [("r1", 1, "finished", 2)]
    assert _ids(step.decode) == ["r0"] and [(r.id, row) for r, row in step.admit] == [("r2", 1)]  # row reused
    assert s.token("r0") and not s.token("r2")
    step = s.plan()
    assert [d.request.id for d in step.left] == ["r0"] and _ids(step.decode) == ["r2"]
    assert s.token("r2", stop=False)
    step = s.plan()
    assert step.empty and [d.reason for d in step.left] == ["finished"] and s.idle and s.reserved_tokens == 0


def test_admission_stops_at_the_first_request_that_does_not_fit() -> None:
    s = Scheduler(BatchingPolicy(max_batch=8, max_tokens=20), context=64)
    s.submit(Request("a", 8, 4))  # 12 tokens
    s.submit(Request("big", 8, 8))  # 16: does not fit next to a
    s.submit(Request("small", 2, 2))  # would fit, but stays behind big (no reordering)
    assert _ids(s.plan().admit) == ["a"]
    s.token("a")
    assert s.plan().admit == []
    for _ in range(3):
        s.token("a")
    step = s.plan()
    assert [d.request.id for d in step.left] == ["a"] and _ids(step.admit) == ["big", "small"]  # 16 + 4 <= 20


def test_prefills_per_step_cap() -> None:
    s = Scheduler(BatchingPolicy(max_batch=8, max_prefills_per_step=2), context=64)
    for i in range(5):
        s.submit(Request(i, 4, 4))
    assert _ids(s.plan().admit) == [0, 1]
    for i in (0, 1):
        s.token(i)
    step = s.plan()
    assert _ids(step.admit) == [2, 3] and _ids(step.decode) == [0, 1]


def _chunks(step) -> list[tuple]:
    return [(c.request.id, c.row, c.start, c.stop, c.last) for c in step.prefill]


def test_chunked_prefill_shares_a_token_budget_and_running_requests_keep_decoding() -> None:
    s = Scheduler(BatchingPolicy(max_batch=4, prefill_chunk=8), context=64)
    s.submit(Request("short", 3, 4))
    step = s.plan()
    assert _chunks(step) == [("short", 0, 0, 3, True)] and _ids(step.admit) == ["short"]
    s.token("short")
    s.submit(Request("long", 20, 2))
    s.submit(Request("next", 2, 2))
    step = s.plan()  # short decodes; long takes what is left of the budget, next waits for budget
    assert _ids(step.decode) == ["short"] and _chunks(step) == [("long", 1, 0, 8, False)] and s.waiting == 1
    with pytest.raises(InputError, match="not prefilled yet"):
        s.token("long")
    s.token("short")
    step = s.plan()  # long continues first; it is not in the decode set
    assert _ids(step.decode) == ["short"] and _chunks(step) == [("long", 1, 8, 16, False)]
    s.token("short")
    step = s.plan()  # long's last 4 tokens and next's whole prompt fit in 8
    assert _chunks(step) == [("long", 1, 16, 20, True), ("next", 2, 0, 2, True)] and _ids(step.admit) == ["next"]
    s.token("short"), s.token("long"), s.token("next")
    step = s.plan()
    assert [d.request.id for d in step.left] == ["short"] and _ids(step.decode) == ["long", "next"]
    assert step.prefill == []


def test_cancelled_request_leaves_mid_prefill() -> None:
    s = Scheduler(BatchingPolicy(max_batch=1, prefill_chunk=4), context=64)
    s.submit(Request("a", 10, 2))
    s.submit(Request("b", 3, 2))
    assert _chunks(s.plan()) == [("a", 0, 0, 4, False)]
    assert s.cancel("a")
    step = s.plan()
    assert [(d.request.id, d.reason, d.tokens) for d in step.left] == [("a", "cancelled", 0)]
    assert _chunks(step) == [("b", 0, 0, 3, True)] and s.reserved_tokens == 5


def test_one_token_requests_finish_at_their_prefill_and_stop_ends_early() -> None:
    s = Scheduler(BatchingPolicy(max_batch=4), context=64)
    s.submit(Request("one", 4, 1))
    s.submit(Request("stops", 4, 10))
    s.plan()
    assert s.token("one") and not s.token("stops")
    step = s.plan()
    assert [d.reason for d in step.left] == ["finished"] and _ids(step.decode) == ["stops"]
    assert s.token("stops", stop=True)
    assert [(d.reason, d.tokens) for d in s.plan().left] == [("stopped", 2)]
    with pytest.raises(InputError, match="not running"):
        s.token("stops")


def test_cancel_waiting_and_running() -> None:
    s = Scheduler(BatchingPolicy(max_batch=1), context=64)
    for rid in ("a", "b", "c"):
        s.submit(Request(rid, 4, 4))
    assert _ids(s.plan().admit) == ["a"]
    assert s.cancel("b") and s.waiting == 1  # dropped at once
    assert s.cancel("a")  # running: keeps its row until the boundary
    assert not s.token("a")  # a token of the current step may still arrive
    step = s.plan()
    assert [(d.request.id, d.reason, d.tokens) for d in step.left] == [("a", "cancelled", 1)]
    assert _ids(step.admit) == ["c"] and step.decode == []
    assert not s.cancel("a") and not s.cancel("nope")
    s.submit(Request("a", 4, 4))  # the id is free again


def test_refusals_are_typed() -> None:
    s = Scheduler(BatchingPolicy(max_batch=2, max_tokens=50, max_queue=2), context=32)
    with pytest.raises(InputError, match="exceed the context of 32"):
        s.submit(Request("long", 30, 3))
    s2 = Scheduler(BatchingPolicy(max_batch=2, max_tokens=20), context=32)
    with pytest.raises(InputError, match="max_tokens"):
        s2.submit(Request("long", 16, 8))
    s.submit(Request("a", 4, 4))
    with pytest.raises(InputError, match="already in use"):
        s.submit(Request("a", 4, 4))
    s.submit(Request("b", 4, 4))
    with pytest.raises(QueueFull, match="max_queue 2") as err:
        s.submit(Request("c", 4, 4))
    assert isinstance(err.value, KrakenError) and not isinstance(err.value, InputError)
    s.plan()
    s.submit(Request("c", 4, 4))  # admission made room in the queue
    for _ in range(4):
        s.token("a")
    with pytest.raises(InputError, match="already finished"):
        s.token("a")


@pytest.mark.parametrize("kwargs,field", [({"max_batch": 0}, "max_batch"), ({"max_tokens": -1}, "max_tokens"),
                                          ({"max_queue": 2.5}, "max_queue"), ({"max_batch": True}, "max_batch"),
                                          ({"max_prefills_per_step": -1}, "max_prefills_per_step"),
                                          ({"prefill_chunk": -1}, "prefill_chunk")])
def test_policy_validation(kwargs, field) -> None:
    with pytest.raises(InputError, match=field):
        BatchingPolicy(**kwargs)


@pytest.mark.parametrize("args,field", [(("x", 0, 4), "prompt_len"), (("x", 4, 0), "max_new_tokens"),
                                        ((None, 4, 4), "id"), (("x", 4.0, 4), "prompt_len")])
def test_request_validation(args, field) -> None:
    with pytest.raises(InputError, match=field):
        Request(*args)
    with pytest.raises(InputError, match="context"):
        Scheduler(BatchingPolicy(), context=0)


@pytest.mark.parametrize("chunk", [0, 5])
def test_random_operations_keep_the_invariants(chunk: int) -> None:
    rng = random.Random(7)
    policy = BatchingPolicy(max_batch=4, max_tokens=60, max_queue=6, max_prefills_per_step=2, prefill_chunk=chunk)
    s = Scheduler(policy, context=40)
    submitted, admitted, next_id, prefilled = [], [], 0, {}
    for _ in range(400):
        op = rng.random()
        if op < 0.35:
            req = Request(next_id, rng.randint(1, 20), rng.randint(1, 10))
            next_id += 1
            try:
                s.submit(req)
                submitted.append(req.id)
            except QueueFull:
                assert s.waiting == policy.max_queue
        elif op < 0.42 and submitted:
            s.cancel(rng.choice(submitted))
        else:
            step = s.plan()
            rows = [c.row for c in step.prefill] + [row for _, row in step.decode]
            assert len(rows) == len(set(rows)) and all(0 <= r < policy.max_batch for r in rows)
            assert s.running <= policy.max_batch and s.reserved_tokens <= policy.max_tokens
            assert len(step.admit) <= policy.max_prefills_per_step
            assert sum(c.stop - c.start for c in step.prefill) <= (chunk or 10**9)
            for c in step.prefill:  # each prompt's chunks are contiguous, from 0 to its end
                assert c.start == prefilled.get(c.request.id, 0) < c.stop
                prefilled[c.request.id] = c.stop
            admitted += _ids(step.admit)
            for req in [c.request for c in step.prefill if c.last] + [req for req, _ in step.decode]:
                s.token(req.id, stop=rng.random() < 0.05)
    assert admitted == sorted(admitted)  # FIFO: admitted in submission order


def test_scheduler_and_report_import_without_torch() -> None:
    code = ("import sys; import krakenlm.batching.scheduler, krakenlm.batching.report; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
