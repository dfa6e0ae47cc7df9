"""`krakenlm loadtest`: streaming completions against OpenAI-compatible servers at the arrival times of a
``LoadSpec`` (krakenlm.batching.workload: Poisson, constant or a trace; the simulator reads the same load),
summarised by krakenlm.batching.report (TTFT, TPOT, ITL, e2e percentiles, throughput, goodput).

Each request sends its ``prompt_len`` random token ids (seeded, so every server gets the same prompts)
and asks for exactly its ``output_len`` tokens (``ignore_eos``), greedy, streamed with the usage chunk. A
request's arrival is the moment it is sent; each streamed chunk is one token (the server sends one
chunk per token), so chunk times are token times. Several rates run one after another; several
servers (``compare``) run each rate in turn, so slow drift of the machine hits them alike.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from krakenlm.batching.report import RequestRecord, check_slo, summarize
from krakenlm.batching.workload import Arrival, Lengths, LoadSpec
from krakenlm.errors import ConfigError
from krakenlm.validation import check_float, check_output_file

DEFAULT_TIMEOUT_S = 600.0  # seconds one request may take


def prompt_ids(load: list[Arrival], vocab: int, seed: int) -> list[list[int]]:
    """Each request's prompt: random token ids below ``vocab - 1`` (the last id is usually end-of-text), seeded
    apart from the arrivals, so every server gets the same prompts."""
    rng = random.Random(seed + 1)
    return [[rng.randrange(max(1, vocab - 1)) for _ in range(a.prompt_len)] for a in load]


@dataclass(frozen=True)
class Target:
    """A server under test: its name in reports and its base URL (http://host:port)."""

    name: str
    url: str
    api_key: str | None = None

    def __post_init__(self) -> None:
        check_url(self.url, f"{self.name} url")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def check_url(url: str, what: str = "url") -> None:
    """An http(s) URL with a host and a port in 0-65535, checked before any connection (a bad port made the
    connecting task group fail with an exception group, not a message)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise ConfigError(f"{what}: not a valid URL {url!r} ({err})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what}: expected http://HOST:PORT, got {url!r}")
    if port == 0:
        raise ConfigError(f"{what}: port 0 is not a server's port, got {url!r}")


def parse_targets(text: str, api_key: str | None = None) -> list[Target]:
    """'kraken=http://127.0.0.1:8000,gpt=http://127.0.0.1:8001' -> targets."""
    targets = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, url = part.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ConfigError(f"compare: expected NAME=http://HOST:PORT items, got {part!r}")
        targets.append(Target(name, url.rstrip("/"), api_key))
    if len({t.name for t in targets}) != len(targets) or not targets:
        raise ConfigError(f"compare: expected distinct NAME=URL items, got {text!r}")
    return targets


async def _vocab(client: httpx.AsyncClient, target: Target) -> int:
    """The server's vocabulary size from /v1/models (a server that does not say: bytes)."""
    try:
        reply = await client.get(f"{target.url}/v1/models", headers=target.headers)
        reply.raise_for_status()
        return int(reply.json()["data"][0].get("vocab_size", 256))
    except (httpx.HTTPError, KeyError, IndexError, ValueError, TypeError) as err:
        raise ConfigError(f"{target.name}: cannot read {target.url}/v1/models: {err}") from None


async def _request(client: httpx.AsyncClient, target: Target, prompt: list[int], output_len: int,
                   errors: Counter[str]) -> RequestRecord:
    """One streamed completion; its record on the perf_counter clock (ok=False when it failed)."""
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    arrival, times, tokens = time.perf_counter(), [], None
    try:
        async with client.stream("POST", f"{target.url}/v1/completions", json=body, headers=target.headers) as reply:
            if reply.status_code != 200:
                await reply.aread()
                errors[f"HTTP {reply.status_code}: {reply.text[:200]}"] += 1
                return RequestRecord(arrival, ok=False)
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    errors[str(chunk["error"].get("message"))[:200]] += 1
                    return RequestRecord(arrival, ok=False)
                if chunk.get("choices"):
                    times.append(time.perf_counter())
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        errors[f"{type(err).__name__}: {err}"[:200]] += 1
        return RequestRecord(arrival, ok=False)
    if not times:
        errors["stream ended without a token"] += 1
        return RequestRecord(arrival, ok=False)
    return RequestRecord(arrival, times[0], tuple(times), times[-1], tokens if tokens is not None else len(times))


async def _run(target: Target, spec: LoadSpec, slo: dict[str, float], timeout: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    load = spec.generate()
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout)) as client:
        prompts = prompt_ids(load, await _vocab(client, target), spec.seed)
        errors: Counter[str] = Counter()
        start = time.perf_counter()

        async def send(a: Arrival, prompt: list[int]) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + a.time - time.perf_counter()))
            return await _request(client, target, prompt, a.output_len, errors)

        records = await asyncio.gather(*(send(a, p) for a, p in zip(load, prompts, strict=True)))
        duration = time.perf_counter() - start
    report = summarize(records, spec.offered_rate, slo, duration)
    offered = spec.arrivals if spec.trace else "inf" if math.isinf(spec.rate) else spec.rate
    return {"server": target.name, "url": target.url, "offered_rate": offered, "prompt_len": _lengths(spec.prompt),
            "output_len": _lengths(spec.output), "seed": spec.seed, "errors": dict(errors)} | report


def _lengths(lengths: Lengths) -> int | str:
    return lengths.low if lengths.low == lengths.high else str(lengths)


def run_load(target: Target, spec: LoadSpec, slo: dict[str, float] | None = None,
             timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """One load against one server: the report of krakenlm.batching.report plus what was offered."""
    check_float(timeout, "timeout", minimum=0, exclusive=True)
    return asyncio.run(_run(target, spec, check_slo(slo), timeout))


def run_loads(targets: list[Target], specs: list[LoadSpec], slo: dict[str, float] | None = None,
              timeout: float = DEFAULT_TIMEOUT_S) -> list[dict]:
    """Every load against every server, load by load (servers in turn within a load)."""
    return [run_load(target, spec, slo, timeout) for spec in specs for target in targets]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def _per_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


ROWS = [("TTFT p50 (ms)", "ttft_s", "p50", _ms), ("TTFT p99 (ms)", "ttft_s", "p99", _ms),
        ("TPOT p50 (ms)", "tpot_s", "p50", _ms), ("TPOT p99 (ms)", "tpot_s", "p99", _ms),
        ("ITL p99 (ms)", "itl_s", "p99", _ms), ("e2e p99 (ms)", "e2e_s", "p99", _ms),
        ("throughput (req/s)", "throughput_rps", None, _per_s),
        ("output tokens/s", "output_tokens_per_s", None, _per_s),
        ("goodput (req/s)", "goodput_rps", None, _per_s), ("failed", "failed", None, str)]


def table(reports: list[dict[str, Any]]) -> str:
    """Markdown: one block of rows per offered rate, one column per server."""
    servers = list(dict.fromkeys(r["server"] for r in reports))
    lines = ["| rate (req/s) | metric | " + " | ".join(servers) + " |", "|---|---|" + "---|" * len(servers)]
    for rate in dict.fromkeys(r["offered_rate"] for r in reports):
        by_server = {r["server"]: r for r in reports if r["offered_rate"] == rate}
        for label, key, stat, fmt in ROWS:
            cells = [fmt(by_server[s][key][stat] if stat else by_server[s][key]) if s in by_server else "-"
                     for s in servers]
            lines.append(f"| {rate} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(reports: list[dict[str, Any]], path: str | Path) -> Path:
    """Latency percentiles (p50 solid, p99 dashed) against offered rate: TTFT, TPOT and e2e panels, one
    colour per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(dict.fromkeys(r["offered_rate"] for r in reports))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (metric, title) in zip(axes, [("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "end to end")],
                                   strict=True):
        for i, server in enumerate(dict.fromkeys(r["server"] for r in reports)):
            mine = {r["offered_rate"]: r for r in reports if r["server"] == server}
            xs = [k for k, rate in enumerate(rates) if rate in mine]
            for stat, style in (("p50", "-"), ("p99", "--")):
                ys = [mine[rates[k]][metric][stat] for k in xs]
                ax.plot(xs, [float("nan") if y is None else y * 1e3 for y in ys], style, marker="o", color=f"C{i}",
                        label=f"{server} {stat}")
        ax.set_xticks(range(len(rates)), [str(r) for r in rates])
        ax.set_xlabel("offered rate (requests/s)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = check_output_file(path, "plot")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
