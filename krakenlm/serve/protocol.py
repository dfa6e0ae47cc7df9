"""The OpenAI completions protocol: a request body parsed into a typed request (every problem one
400 with an OpenAI-style error body naming the field), and the response, chunk and error bodies.

Supported: prompt (text or token ids), max_tokens, temperature, top_p, seed, stop, stream,
stream_options.include_usage, n=1, user, model; vLLM's extensions top_k and ignore_eos. Known fields
that would change the output in ways this server does not implement (echo, logprobs, suffix, best_of,
logit_bias, penalties, n > 1) are refused by name rather than silently ignored.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from krakenlm.errors import KrakenError
from krakenlm.jsonio import parse_json
from krakenlm.validation import is_finite_number

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_SEED = (1 << 63) - 1
_SUPPORTED = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
              "stream_options", "n", "user", "ignore_eos"}
# Fields of the OpenAI API (and vLLM's repetition_penalty, which `vllm bench serve` sends) that are accepted
# only at their no-op value.
_NO_OP = {"echo": False, "logprobs": None, "suffix": None, "best_of": 1, "logit_bias": None,
          "presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1}


class ApiError(KrakenError):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CompletionRequest:
    """One validated /v1/completions request (prompt limits against the model are checked by the server)."""

    prompt: str | tuple[int, ...]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    model: str | None = None


def decode_body(body: bytes) -> dict[str, Any]:
    """The request's JSON object, read by the reader every file goes through (krakenlm.jsonio); 400 for
    non-UTF-8, malformed JSON, NaN/Infinity, nesting deeper than jsonio.MAX_DEPTH, strings that are not
    Unicode text (a lone surrogate, \\ud800) or a non-object."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {err.start})") from None
    data = parse_json(text, "request body", partial(ApiError, 400))
    try:  # every string must be text a tokenizer and a response can carry: no lone surrogates anywhere
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise ApiError(400, f"request body holds a string that is not valid Unicode ({err.reason}: "
                       f"{err.object[err.start:err.end]!a})") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
    return data


def parse_completion(data: dict[str, Any]) -> CompletionRequest:
    """A CompletionRequest from a decoded body; the first problem found is raised as a 400."""
    unknown = sorted(set(data) - _SUPPORTED - set(_NO_OP))
    if unknown:
        raise _bad(unknown[0], f"unknown field (supported: {', '.join(sorted(_SUPPORTED))})")
    for key, no_op in _NO_OP.items():
        if key in data and data[key] != no_op:
            raise _bad(key, f"not supported by this server (only {json.dumps(no_op)})")
    if data.get("n") is not None and (not _is_int(data["n"]) or data["n"] != 1):
        raise _bad("n", f"only n=1 (the integer) is supported, got {json.dumps(data['n'])}")
    _optional_str(data, "user")
    if "prompt" not in data:
        raise _bad("prompt", "required")
    return CompletionRequest(
        prompt=_prompt(data["prompt"]), max_tokens=_int(data, "max_tokens", 16, 1),
        temperature=_number(data, "temperature", 1.0, 0.0, 2.0), top_p=_optional_top_p(data),
        top_k=_optional_int(data, "top_k", 1), seed=_optional_int(data, "seed", -MAX_SEED - 1, MAX_SEED),
        stop=_stop(data.get("stop")), stream=_bool(data, "stream"), include_usage=_include_usage(data),
        ignore_eos=_bool(data, "ignore_eos"), model=_optional_str(data, "model"))


def _prompt(value: Any) -> str | tuple[int, ...]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one prompt
    if isinstance(value, str):
        if not value:
            raise _bad("prompt", "must not be empty")
        return value
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        return tuple(value)
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        raise _bad("prompt", "batched prompts are not supported: send one prompt per request")
    raise _bad("prompt", "must be a non-empty string or a non-empty list of token ids")


def _int(data: dict[str, Any], key: str, default: int, low: int, high: int | None = None) -> int:
    value = data.get(key, default)
    if value is None:
        value = default
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise _bad(key, f"must be an integer {bound}, got {json.dumps(value)}")
    return value


def _optional_int(data: dict[str, Any], key: str, low: int, high: int | None = None) -> int | None:
    return None if data.get(key) is None else _int(data, key, 0, low, high)


def _number(data: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = data.get(key, default)
    if value is None:
        value = default
    if not is_finite_number(value) or not low <= value <= high:
        raise _bad(key, f"must be a number in [{low:g}, {high:g}], got {json.dumps(value)}")
    return float(value)


def _optional_top_p(data: dict[str, Any]) -> float | None:
    value = data.get("top_p")
    if value is None:
        return None
    if not is_finite_number(value) or not 0 < value <= 1:
        raise _bad("top_p", f"must be a number in (0, 1], got {json.dumps(value)}")
    return float(value)


def _bool(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(key, f"must be true or false, got {json.dumps(value)}")
    return value


def _optional_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise _bad(key, f"must be a string, got {json.dumps(value)}")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise _bad("stop", f"must be a non-empty string or a list of at most {MAX_STOP} non-empty strings")
    return tuple(stops)


def _include_usage(data: dict[str, Any]) -> bool:
    options = data.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _bad("stream_options", "must be an object with only include_usage")
    if not data.get("stream"):
        raise _bad("stream_options", "only allowed with stream: true")
    return _bool(options, "include_usage")


# Response bodies ---------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request_id: str, model: str, created: int, text: str, finish_reason: str | None,
                    counts: dict[str, int] | None) -> dict[str, Any]:
    """A text_completion object: the whole response, or (``counts`` None) one streamed chunk."""
    body: dict[str, Any] = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}
    if counts is not None:
        body["usage"] = counts
    return body


def usage_chunk(request_id: str, model: str, created: int, counts: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": [],
            "usage": counts}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` (or the literal ``[DONE]``) and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def now() -> int:
    return int(time.time())
