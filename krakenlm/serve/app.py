"""The HTTP front end (FastAPI): /v1/completions (whole or streamed as server-sent events), /v1/models,
/health, /metrics. Every error is an OpenAI-style JSON body with its status: 400 bad input, 401 no
or wrong API key, 404 unknown model or route, 413 body too large, 429 queue full, 503 engine down or
draining. Requests run on the Runner's engine thread; a client that disconnects is cancelled and its
row freed at the next step boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from krakenlm.batching.scheduler import QueueFull
from krakenlm.errors import InputError
from krakenlm.generate import SamplingConfig
from krakenlm.serve import protocol
from krakenlm.serve.metrics import CONTENT_TYPE
from krakenlm.serve.protocol import ApiError, CompletionRequest
from krakenlm.serve.runner import Event, Job, Runner, job_id
from krakenlm.serve.text import TextStream
from krakenlm.tokenizer import Tokenizer


@dataclass(frozen=True)
class FrontEnd:
    """What the front end needs besides the runner: the served model's name and tokenizer, limits, key."""

    model_name: str
    tokenizer: Tokenizer
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    read_timeout: float = 30.0  # seconds to receive a request's body


def create_app(runner: Runner, front: FrontEnd) -> FastAPI:
    """The ASGI app; its lifespan starts the runner's engine thread and drains it at shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        runner.start(lambda events: loop.call_soon_threadsafe(_deliver, events))
        yield
        await asyncio.to_thread(runner.stop)

    app = FastAPI(title="krakenlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    config = runner.engine.config

    @app.get("/health")
    async def health() -> JSONResponse:
        state = runner.health()
        return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(runner.metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _authorize(request, front.api_key)
        card = {"id": front.model_name, "object": "model", "created": 0, "owned_by": "krakenlm",
                "max_model_len": config.block_size, "vocab_size": front.tokenizer.vocab_size}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        _authorize(request, front.api_key)
        body = protocol.decode_body(await _read_body(request, front.max_body_bytes, front.read_timeout))
        req = protocol.parse_completion(body)
        if req.model is not None and req.model != front.model_name:
            raise ApiError(404, f"model {req.model!r} does not exist; this server serves {front.model_name!r}",
                           param="model", code="model_not_found")
        job = _job(req, front.tokenizer, config.vocab_size, config.block_size)
        job.consumer = asyncio.Queue()
        runner.submit(job)
        reply = _Reply(job, req, front.model_name, len(job.prompt))
        if req.stream:
            return StreamingResponse(reply.stream(runner), media_type="text/event-stream")
        return await reply.whole(runner, request)

    return app


def _deliver(events: list[tuple[Job, Event]]) -> None:
    for job, event in events:
        job.consumer.put_nowait(event)


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (declared or streamed) and with 408 when it has not
    all arrived within ``timeout`` seconds (a slow client must not hold a connection forever)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s") from None
    except ClientDisconnect:  # nobody to answer; not a server error to log
        raise CLIENT_GONE from None
    return b"".join(chunks)


def _job(req: CompletionRequest, tokenizer: Tokenizer, vocab_size: int, context: int) -> Job:
    """The request's tokens and settings, refused with 400 when the model cannot serve them."""
    prompt = tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
    if not prompt:
        raise ApiError(400, "prompt: encodes to no tokens", param="prompt")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ApiError(400, f"prompt: token ids {bad[:5]} are outside the vocabulary 0..{vocab_size - 1}",
                       param="prompt")
    if len(prompt) + req.max_tokens > context:
        raise ApiError(400, f"this model's context is {context} tokens, but {len(prompt) + req.max_tokens} were "
                       f"requested ({len(prompt)} in the prompt, {req.max_tokens} for the completion); reduce the "
                       "prompt or max_tokens", param="max_tokens", code="context_length_exceeded")
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    sampling = SamplingConfig(req.temperature, req.top_k, req.top_p, seed)
    stops = () if req.ignore_eos else (tokenizer.eot_token,)
    return Job(job_id(), prompt, req.max_tokens, sampling, TextStream(tokenizer.decode, req.stop), stops)


@dataclass
class _Reply:
    """One request's response: streamed chunks or the whole completion."""

    job: Job
    req: CompletionRequest
    model: str
    prompt_tokens: int

    def __post_init__(self) -> None:
        self.created = protocol.now()

    def _usage(self) -> dict[str, int]:
        return protocol.usage(self.prompt_tokens, self.job.produced)

    async def stream(self, runner: Runner) -> AsyncIterator[bytes]:
        """One chunk per token (the last carries finish_reason), the usage chunk if asked, then [DONE]."""
        try:
            while True:
                event: Event = await self.job.consumer.get()
                if event.error is not None:
                    yield protocol.sse(event.error.body())
                    break
                yield protocol.sse(protocol.completion_body(self.job.id, self.model, self.created, event.text,
                                                            event.finish, None))
                if event.finish is not None:
                    if self.req.include_usage:
                        yield protocol.sse(protocol.usage_chunk(self.job.id, self.model, self.created, self._usage()))
                    break
            yield protocol.sse("[DONE]")
        finally:
            runner.cancel(self.job)  # a no-op unless the client left before the end

    async def whole(self, runner: Runner, request: Request) -> Response:
        """Wait for the last token (cancelling the job if the client disconnects first)."""
        watcher = asyncio.create_task(_disconnected(request, self.job))
        parts = []
        try:
            while True:
                event: Event = await self.job.consumer.get()
                if event.error is not None:
                    raise event.error
                parts.append(event.text)
                if event.finish is not None:
                    break
        finally:
            watcher.cancel()
            runner.cancel(self.job)
        body = protocol.completion_body(self.job.id, self.model, self.created, "".join(parts), self.job.finish,
                                        self._usage())
        return JSONResponse(body)


CLIENT_GONE = ApiError(499, "the client disconnected")


async def _disconnected(request: Request, job: Job) -> None:
    """Wake the waiting handler when the client goes away (the handler then cancels the job)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.consumer.put_nowait(Event(error=CLIENT_GONE))


def _add_error_handlers(app: FastAPI) -> None:
    def reply(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return reply(err)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, err: QueueFull) -> JSONResponse:
        return reply(ApiError(429, str(err), code="queue_full"))

    @app.exception_handler(InputError)
    async def input_error(request: Request, err: InputError) -> JSONResponse:
        return reply(ApiError(400, str(err)))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return reply(ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}"))

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> JSONResponse:
        return reply(ApiError(500, f"internal error: {type(err).__name__}: {err}"))
