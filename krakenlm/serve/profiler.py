"""Measuring a running server's step-time profile (krakenlm.batching.profile) over HTTP, with the load
generator: the measuring half lives with the server, the profile itself below the engine and the cost model."""

from __future__ import annotations

import math
import statistics

import httpx

from krakenlm.batching.profile import EngineProfile, engine_widths
from krakenlm.batching.workload import Lengths, LoadSpec
from krakenlm.errors import ConfigError
from krakenlm.serve.loadtest import Target, run_load
from krakenlm.validation import check_int


def server_max_batch(target: Target) -> int:
    """The server's batch limit, from its /health."""
    try:
        reply = httpx.get(f"{target.url}/health", headers=target.headers, timeout=30.0)
        return int(reply.json()["max_batch"])
    except (httpx.HTTPError, KeyError, ValueError, TypeError) as err:
        raise ConfigError(f"{target.name}: cannot read max_batch from {target.url}/health: {err}") from None


def measure_profiles(targets: list[Target], prompt_lengths: Lengths, output_lengths: Lengths,
                     reps: int = 4) -> dict[str, EngineProfile]:
    """Each server's profile for a load of these lengths, the servers in turn so that drift of a shared
    machine hits them alike, after a warm-up request: a lone 2-token request at the low, middle and high
    prompt length 2 * ``reps`` times, and ``w`` requests of the middle prompt and output length at once
    per engine width, ``reps`` times; medians of the p50s."""
    check_int(reps, "profile: reps")
    prompt = (prompt_lengths.low + prompt_lengths.high) // 2
    prompts = tuple(sorted({prompt_lengths.low, prompt, prompt_lengths.high}))
    output = max(2, (output_lengths.low + output_lengths.high) // 2)  # a gap needs two tokens
    widths = {t.name: engine_widths(server_max_batch(t)) for t in targets}
    for t in targets:
        run_load(t, LoadSpec(math.inf, 1, Lengths(prompt, prompt), Lengths(output, output), seed=100))
    ttft: dict[str, dict[int, list[float]]] = {t.name: {p: [] for p in prompts} for t in targets}
    itl: dict[str, dict[int, list[float]]] = {t.name: {w: [] for w in widths[t.name]} for t in targets}
    for rep in range(2 * reps):
        for p in prompts:
            for t in targets:
                alone = run_load(t, LoadSpec(math.inf, 1, Lengths(p, p), Lengths(2, 2), seed=rep))
                ttft[t.name][p].append(alone["ttft_s"]["p50"])
    for rep in range(reps):
        for t in targets:
            for w in widths[t.name]:
                burst = run_load(t, LoadSpec(math.inf, w, Lengths(prompt, prompt), Lengths(output, output),
                                             seed=10 + rep))
                itl[t.name][w].append(burst["itl_s"]["p50"])
    return {t.name: EngineProfile(prompt, output, prompts,
                                  tuple(statistics.median(ttft[t.name][p]) for p in prompts), widths[t.name],
                                  tuple(statistics.median(itl[t.name][w]) for w in widths[t.name]))
            for t in targets}
