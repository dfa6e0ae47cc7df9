"""`krakenlm serve`: the engine on every rank, the HTTP front end and the engine loop on rank 0.

Start-up: launch the engine (rank 0 here, followers as child processes or torchrun ranks), allocate
the serving cache, warm up one step, bind the socket (so a busy port is one clear error), then run
uvicorn. SIGTERM or SIGINT: uvicorn stops accepting, waits up to ``drain_timeout`` for in-flight
requests, the runner drains, then the engine closes and the follower ranks exit; nothing is left
listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from types import FrameType

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from krakenlm.batching.scheduler import BatchingPolicy
from krakenlm.engine import Engine, EngineOptions
from krakenlm.errors import ConfigError
from krakenlm.serve.app import FrontEnd, create_app
from krakenlm.serve.metrics import ServeMetrics
from krakenlm.serve.runner import Runner
from krakenlm.source import ModelSource
from krakenlm.tokenizer import default_tokenizer_for, get_tokenizer
from krakenlm.validation import check_float, check_int

DRAIN_FLUSH_S = 3.0  # after the drain deadline: time for the requests cut then to get their error to the client


@dataclass(frozen=True)
class ServeConfig:
    """Where the server listens and how much it takes at once (max_tokens None: every row may hold a
    full context)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_tokens: int | None = None
    max_queue: int = 256
    prefill_chunk: int = 0  # prompt tokens prefilled per step (0: whole prompts)
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    drain_timeout: float = 60.0
    tokenizer: str | None = None
    model_name: str | None = None
    read_timeout: float = 30.0  # a client must send a request's headers, and then its body, within this

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"host: must be an address (127.0.0.1 for loopback only, 0.0.0.0 for every "
                              f"interface), got {self.host!r}")
        check_int(self.port, "port", minimum=0, maximum=65535)
        check_float(self.read_timeout, "read_timeout", minimum=0, exclusive=True)
        check_int(self.max_body_bytes, "max_body_bytes")
        if not self.drain_timeout > 0:
            raise ConfigError(f"drain_timeout: must be > 0 seconds, got {self.drain_timeout!r}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("api_key: must not be empty")
        self.policy(1)  # the batching limits, checked before any rank starts (the context is not known yet)

    def policy(self, context: int) -> BatchingPolicy:
        tokens = self.max_batch * context if self.max_tokens is None else self.max_tokens
        return BatchingPolicy(self.max_batch, tokens, self.max_queue, prefill_chunk=self.prefill_chunk)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), or ConfigError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto is IPPROTO_TCP, and an
    # accepted socket inherits the listener's 0; with Nagle on, every response that goes out in two writes
    # waited for the client's delayed ACK: 44 ms per /health, per first token, per streamed chunk.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def read_timeout_protocol(read_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose next request's headers do not arrive within
    ``read_timeout`` seconds (a slow or silent client would hold it open forever; the body has its own
    deadline in the app)."""

    class TimedH11(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(transport)  # type: ignore[arg-type]
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            self._read_timer = self.loop.call_later(read_timeout, self._expired)

        def _expired(self) -> None:
            if self.cycle is None or self.cycle.response_complete:  # still waiting for a request's headers
                self.transport.close()

    return TimedH11


class _Server(uvicorn.Server):
    """uvicorn, plus: the listening address printed, and a drain that runs out of time ends the requests
    still in flight with an error the clients can read (an error chunk and [DONE], or a JSON 503) just
    before uvicorn cancels them."""

    def __init__(self, config: uvicorn.Config, runner: Runner, drain_timeout: float) -> None:
        super().__init__(config)
        self.runner, self.drain_timeout = runner, drain_timeout
        self._deadline: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._deadline is None:
            reason = f"the server is shutting down (its drain timeout of {self.drain_timeout:g}s ran out)"
            self._deadline = threading.Timer(self.drain_timeout, self.runner.interrupt, (reason,))
            self._deadline.daemon = True
            self._deadline.start()
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and sockets:
            host, port = sockets[0].getsockname()[:2]
            print(f"krakenlm serve: listening on http://{host}:{port}", flush=True)


def served_name(source: ModelSource) -> str:
    """The model id clients send by default: the preset's name or the checkpoint path as given (as vLLM
    serves a model under the name it was started with); a config's name or architecture."""
    if source.config is not None:
        return source.config.name or source.config.arch
    return source.checkpoint or str(source.preset)


def _exit_after_drain(sig: int, frame: FrameType | None) -> None:
    """uvicorn re-raises the signal that stopped it once it has drained: exit cleanly then."""
    raise SystemExit(0)


def serve(source: ModelSource, options: EngineOptions, config: ServeConfig) -> int:
    """Run the server until SIGTERM/SIGINT; 0 after a clean drain."""
    engine = Engine.launch(source, options)
    if not engine.is_driver:  # a torchrun rank >= 1 followed rank 0 until it closed
        return 0
    runner: Runner | None = None
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: _close(engine, runner))
        tokenizer = get_tokenizer(config.tokenizer or default_tokenizer_for(engine.config.vocab_size))
        policy = config.policy(engine.config.block_size)
        engine.open_serving(config.max_batch, vocab_limit=min(tokenizer.vocab_size, engine.config.vocab_size))
        runner = Runner(engine, policy, ServeMetrics())
        runner.warmup()
        name = config.model_name or served_name(source)
        front = FrontEnd(name, tokenizer, config.api_key, config.max_body_bytes, config.read_timeout)
        sock = stack.enter_context(bind(config.host, config.port))
        uv = uvicorn.Config(create_app(runner, front), log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=config.drain_timeout + DRAIN_FLUSH_S,
                            http=read_timeout_protocol(config.read_timeout))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _exit_after_drain)
        print(f"krakenlm serve: {name} on {engine.world} rank(s), {engine.device.type}, max batch "
              f"{policy.max_batch}, queue {policy.max_queue}; {engine.choices}", file=sys.stderr, flush=True)
        _Server(uv, runner, config.drain_timeout).run(sockets=[sock])
    return 0


def _close(engine: Engine, runner: Runner | None) -> None:
    """Close the engine; after it died (a collective timed out against a stalled rank) stop its followers and
    end the process without tearing gloo down, which then aborted it ("terminate called without an active
    exception", exit -6) in about half of such shutdowns. The socket is closed and the output flushed first."""
    if runner is None or runner.dead is None:
        engine.close()
        return
    engine.abandon()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
