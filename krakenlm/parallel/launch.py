"""Start ranks: under torchrun (use its environment) or locally (spawn one process per rank).

The local launcher watches its children: when one fails, the others get ``grace`` seconds to exit
on their own (their collectives time out or see the closed connection) and are then terminated,
so a run never hangs on a dead rank.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from krakenlm.errors import KrakenError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _entry(worker: Callable[[Any], int], rank: int, world: int, port: int, payload: Any) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        code = worker(payload)
    except KrakenError as err:
        print(f"krakenlm rank {rank}: error: {err}", file=sys.stderr, flush=True)
        code = 2
    except Exception:  # a bug: show it, but still exit so the launcher can stop the others
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    os._exit(code or 0)


def spawn(worker: Callable[[Any], int], world: int, payload: Any, grace: float = 30.0) -> int:
    """Run ``worker(payload)`` on ``world`` local ranks; return 0 or the first failing rank's code."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(worker, r, world, port, payload), daemon=False) for r in range(world)]
    for p in procs:
        p.start()
    failed_at, code = None, 0
    try:
        while any(p.is_alive() for p in procs):
            for r, p in enumerate(procs):
                if p.exitcode not in (None, 0) and failed_at is None:
                    failed_at, code = time.monotonic(), p.exitcode
                    print(f"krakenlm: rank {r} exited with code {p.exitcode}; waiting up to {grace:.0f}s "
                          "for the other ranks", file=sys.stderr)
            if failed_at is not None and time.monotonic() - failed_at > grace:
                for r, p in enumerate(procs):
                    if p.is_alive():
                        print(f"krakenlm: terminating rank {r} (still running {grace:.0f}s after a peer failed)",
                              file=sys.stderr)
                        p.kill()
            time.sleep(0.05)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if not code:
        code = next((p.exitcode for p in procs if p.exitcode), 0)
    return code if code > 0 else (1 if code else 0)


def run_ranks(worker: Callable[[Any], int], world: int, payload: Any, grace: float) -> int:
    """Under torchrun this process *is* a rank; otherwise spawn ``world`` local ranks."""
    if under_torchrun():
        return worker(payload)
    return spawn(worker, world, payload, grace)


def _generate_worker(payload: dict[str, Any]) -> int:
    from krakenlm.cli import DTYPES, print_result
    from krakenlm.parallel.runtime import Runtime
    from krakenlm.tokenizer import default_tokenizer_for, get_tokenizer

    runtime = Runtime(payload["source"], payload["tp"], dtype=DTYPES[payload["dtype"]], no_comm=payload["no_comm"],
                      timeout=payload["timeout"], agree_on={"prompts": payload["prompts"]})
    try:
        tokenizer = get_tokenizer(payload["tokenizer"] or default_tokenizer_for(runtime.config.vocab_size))
        ids = [tokenizer.encode(p) for p in payload["prompts"]]
        runtime.comm.timeline.enabled = True  # prefill and every decode step
        result = runtime.generate(ids, payload["max_new_tokens"], payload["sampling"], stop_token=tokenizer.eot_token)
        if payload["trace"]:
            os.makedirs(payload["trace"], exist_ok=True)
            runtime.comm.timeline.chrome_trace(os.path.join(payload["trace"], f"rank{runtime.rank}.json"),
                                               runtime.rank)
        if runtime.rank == 0:
            print_result(result, payload["prompts"], tokenizer, runtime.world)
            hidden = runtime.comm.timeline.hidden_fraction()
            if hidden == hidden:  # not NaN: this model has overlapped exchanges
                print(f"[tp={runtime.world}] Kraken AllReduce time hidden behind attention: {hidden:.0%}",
                      file=sys.stderr)
        runtime.barrier()
    finally:
        runtime.close()
    return 0


def generate_tp(args: argparse.Namespace, sampling) -> int:
    """Check everything that can be checked before spawning (plan, prompts), then run the ranks."""
    from krakenlm.cli import model_source
    from krakenlm.generate import validate_prompts
    from krakenlm.parallel.plan import ParallelPlan
    from krakenlm.parallel.runtime import source_config
    from krakenlm.tokenizer import default_tokenizer_for, get_tokenizer

    config = source_config(model_source(args))
    ParallelPlan(config, args.tp)
    tokenizer = get_tokenizer(args.tokenizer or default_tokenizer_for(config.vocab_size))
    validate_prompts([tokenizer.encode(p) for p in args.prompt], config.vocab_size, config.block_size,
                     args.max_new_tokens)
    payload = {"source": model_source(args), "tp": args.tp, "dtype": args.dtype, "no_comm": args.no_comm,
               "timeout": args.timeout, "prompts": args.prompt, "tokenizer": args.tokenizer, "trace": args.trace,
               "max_new_tokens": args.max_new_tokens, "sampling": sampling}
    return run_ranks(_generate_worker, args.tp, payload, grace=args.timeout)
