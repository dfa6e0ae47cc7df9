"""The one launcher: rank processes for every verb (generate, eval, bench, serve, the demo, tests).

A launched rank is ``python -m krakenlm.parallel.rank PAYLOAD.json``: it reads its payload (JSON,
never pickle), imports the target ``"package.module:function"`` and calls it with the payload's
arguments. The torchrun-style environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...) tells it
who it is, so a target runs unchanged under this launcher and under torchrun. A command prefix per
rank (e.g. ``ip netns exec NS``) runs ranks inside network namespaces with shaped links.

Ranks started on this host (no command prefix) meet at a TCPStore this process hosts on a port the
kernel picked, as torchrun's agent does (``TORCHELASTIC_USE_AGENT_STORE``): the port is held from
before any rank starts until the last one ends, so no other program can take it between a port probe
and rank 0's bind, and a rank that stops early cannot take the rendezvous down with it.

The launcher watches its children: when one fails, the others get ``grace`` seconds to exit on their
own (their collectives time out or see the closed connection) and are then killed, so a run never
hangs on a dead rank.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch.distributed as dist

from krakenlm.errors import DistributedError
from krakenlm.parallel.rank import LAUNCHER_PID, call, started_key

Prefix = Callable[[int], list[str]]
Env = Callable[[int], dict[str, str]]


def host_store(world: int) -> dist.TCPStore:
    """A rendezvous store served by this process on a free loopback port (``.port``)."""
    return dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    """Whether this process is already a rank (started by torchrun or by this launcher)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


class Ranks:
    """Rank processes started by this process (all of a world, or the followers of an in-process rank 0)."""

    def __init__(self, target: str, args: dict[str, Any], world: int, ranks: Iterable[int] | None = None, *,
                 master_addr: str = "127.0.0.1", port: int | None = None, prefix: Prefix | None = None,
                 env: Env | None = None) -> None:
        self.world = world
        # ranks in other network namespaces (a prefix) cannot reach this process's loopback
        self.store = host_store(world) if port is None and prefix is None else None
        self.port = self.store.port if self.store is not None else port or free_port()
        hosted = {"TORCHELASTIC_USE_AGENT_STORE": str(self.store is not None), LAUNCHER_PID: str(os.getpid())}
        self.ranks = list(range(world) if ranks is None else ranks)
        self.payloads: list[str] = []  # one per rank, which removes it once read (a killed launcher leaves none)
        self.procs: list[subprocess.Popen] = []
        try:
            for rank in self.ranks:
                rank_env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": master_addr,
                            "MASTER_PORT": str(self.port)} | hosted | (env(rank) if env else {})
                self.payloads.append(_write_payload(target, args))
                command = (prefix(rank) if prefix else []) + [sys.executable, "-m", "krakenlm.parallel.rank",
                                                               self.payloads[-1]]
                # a session of its own: a terminal's Ctrl-C reaches this process, which stops the ranks
                self.procs.append(subprocess.Popen(command, env=os.environ | rank_env, start_new_session=True))
        except BaseException:
            self.stop(0.0)
            raise

    def await_started(self, timeout: float) -> None:
        """Wait until every rank has started its target (it checks in at the hosted store), polling for
        ranks that exit first: a rank killed during start-up fails the launch at once, not at the
        rendezvous timeout. A no-op without a hosted store (ranks in other namespaces)."""
        if self.store is None:
            return
        deadline = time.monotonic() + timeout
        while not self.store.check([started_key(r) for r in self.ranks]):
            gone = [r for r, p in zip(self.ranks, self.procs, strict=True) if p.poll() is not None]
            if gone:
                raise DistributedError(f"rank {gone[0]} exited during start-up, before joining")
            if time.monotonic() > deadline:
                raise DistributedError(f"ranks did not start within {timeout:g}s")
            time.sleep(0.05)

    def failed(self) -> int | None:
        """The exit code of the first rank that failed, if any."""
        return next((p.returncode for p in self.procs if p.poll() not in (None, 0)), None)

    def wait(self, timeout: float | None = None, grace: float = 30.0) -> int:
        """0 when every rank succeeds; else the first failure's code (the others stopped after ``grace``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs):
            code = self.failed()
            if code is not None or (deadline is not None and time.monotonic() > deadline):
                self.stop(grace)
                if code is None:
                    raise DistributedError(f"ranks still running after {timeout:.0f}s; stopped them")
                return code if code > 0 else 1
            time.sleep(0.05)
        self.stop(0.0)
        code = self.failed()
        return 0 if code is None else (code if code > 0 else 1)

    def kill(self) -> None:
        """Stop every rank now (an interrupted or failed leader: nobody will talk to them again)."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        self.stop(grace=2.0)

    def stop(self, grace: float) -> None:
        """Give running ranks ``grace`` seconds to end on their own, then kill them; remove the payload."""
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.store = None  # every rank has ended (an in-process rank 0's group keeps its own reference)
        for payload in self.payloads:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(payload)


def _write_payload(target: str, args: dict[str, Any]) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="krakenlm-ranks-", delete=False) as f:
        json.dump({"target": target, "args": args}, f)
    return f.name


def run_ranks(target: str, world: int, args: dict[str, Any], *, timeout: float | None = None, grace: float = 30.0,
              prefix: Prefix | None = None, env: Env | None = None, master_addr: str = "127.0.0.1",
              port: int | None = None) -> int:
    """Run ``target(args)`` on ``world`` ranks: as this process under torchrun, else as child processes.
    Returns 0 or the first failing rank's exit code."""
    if under_torchrun():
        return call(target, args)
    ranks = Ranks(target, args, world, master_addr=master_addr, port=port, prefix=prefix, env=env)
    try:
        return ranks.wait(timeout, grace)
    except BaseException:  # Ctrl-C or a deadline: leave no rank behind
        ranks.kill()
        raise
