"""`krakenlm serve`: the engine on every rank, the HTTP front end and the engine loop on rank 0.

Start-up: launch the engine (rank 0 here, followers as child processes or torchrun ranks), allocate
the serving cache, warm up one step, bind the socket (so a busy port is one clear error), then run
uvicorn. SIGTERM or SIGINT: uvicorn stops accepting, waits up to ``drain_timeout`` for in-flight
requests, the runner drains, then the engine closes and the follower ranks exit; nothing is left
listening.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
from dataclasses import dataclass
from types import FrameType

import uvicorn

from krakenlm.engine import Engine, EngineOptions
from krakenlm.errors import ConfigError
from krakenlm.serve.app import FrontEnd, create_app
from krakenlm.serve.metrics import ServeMetrics
from krakenlm.serve.runner import Runner
from krakenlm.serve.scheduler import BatchingPolicy
from krakenlm.source import ModelSource
from krakenlm.tokenizer import default_tokenizer_for, get_tokenizer
from krakenlm.validation import check_int


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

    def __post_init__(self) -> None:
        check_int(self.port, "port", minimum=0, maximum=65535)
        check_int(self.max_body_bytes, "max_body_bytes")
        if not self.drain_timeout > 0:
            raise ConfigError(f"drain_timeout: must be > 0 seconds, got {self.drain_timeout!r}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("api_key: must not be empty")
        self.policy(1)  # the batching limits, checked before any rank starts (the context is not known yet)

    def policy(self, context: int) -> BatchingPolicy:
        return BatchingPolicy(self.max_batch, self.max_tokens or self.max_batch * context, self.max_queue,
                              prefill_chunk=self.prefill_chunk)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), or ConfigError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


class _Server(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and sockets:
            host, port = sockets[0].getsockname()[:2]
            print(f"krakenlm serve: listening on http://{host}:{port}", flush=True)


def _exit_after_drain(sig: int, frame: FrameType | None) -> None:
    """uvicorn re-raises the signal that stopped it once it has drained: exit cleanly then."""
    raise SystemExit(0)


def serve(source: ModelSource, options: EngineOptions, config: ServeConfig) -> int:
    """Run the server until SIGTERM/SIGINT; 0 after a clean drain."""
    engine = Engine.launch(source, options)
    if not engine.is_driver:  # a torchrun rank >= 1 followed rank 0 until it closed
        return 0
    with contextlib.ExitStack() as stack:
        stack.callback(engine.close)
        tokenizer = get_tokenizer(config.tokenizer or default_tokenizer_for(engine.config.vocab_size))
        policy = config.policy(engine.config.block_size)
        engine.open_serving(config.max_batch, vocab_limit=min(tokenizer.vocab_size, engine.config.vocab_size))
        runner = Runner(engine, policy, ServeMetrics())
        runner.warmup()
        name = config.model_name or source.describe()
        front = FrontEnd(name, tokenizer, config.api_key, config.max_body_bytes)
        sock = stack.enter_context(bind(config.host, config.port))
        uv = uvicorn.Config(create_app(runner, front), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=config.drain_timeout, lifespan="on")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _exit_after_drain)
        print(f"krakenlm serve: {name} on {engine.world} rank(s), {engine.device.type}, max batch "
              f"{policy.max_batch}, queue {policy.max_queue}", file=sys.stderr, flush=True)
        _Server(uv).run(sockets=[sock])
    return 0
