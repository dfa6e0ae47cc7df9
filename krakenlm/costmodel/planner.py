"""Planner: search tensor-parallel degree x pipeline stages x Kraken degree x batch limit, with the best
layout (and micro-batching) per phase, for a latency, cost or throughput objective under a memory
limit, and say why the winner won."""

from __future__ import annotations

from dataclasses import dataclass, field

from krakenlm.config import ModelConfig, size_kraken
from krakenlm.costmodel.estimator import Estimate, Workload, check_context, estimate, format_bytes
from krakenlm.costmodel.hardware import Hardware
from krakenlm.costmodel.layouts import check_split
from krakenlm.costmodel.pipeline import Pipeline, divisors
from krakenlm.errors import ConfigError

OBJECTIVES = ("cost", "latency", "throughput")
MAX_PLAN_CHIPS = 1 << 20


@dataclass(frozen=True)
class Candidate:
    """One point of the search, with the model variant it used and how many copies of it the chip
    budget holds (data-parallel replicas, counted by the throughput objective)."""

    config: ModelConfig
    estimate: Estimate
    replicas: int = 1

    @property
    def tokens_per_s(self) -> float:
        """Tokens (prompt + generated) per second of all replicas in steady state."""
        e = self.estimate
        return self.replicas * e.requests_per_s * (e.workload.prompt + e.workload.generate)

    @property
    def label(self) -> str:
        e, wl = self.estimate, self.estimate.workload
        batch = f"{wl.batch}" if wl.decode_batch is None else f"{wl.batch}/{wl.decode_batch}"
        dec = f", decode {e.decode.layout}" if e.decode else ""
        return f"{deployment_label(self.config, e.chips, e.stages)}, batch {batch}: prefill {e.prefill.layout}{dec}"


def deployment_label(config: ModelConfig, chips: int, stages: int) -> str:
    """``name on N chip(s) (TP t x PP s)``."""
    return f"{config.name or config.arch} on {chips} chip(s) (TP {chips // stages} x PP {stages})"


@dataclass(frozen=True)
class Plan:
    """The chosen candidate, the feasible ones ranked, and a human-readable explanation."""

    best: Candidate
    ranked: list[Candidate]
    rejected: dict[str, int] = field(default_factory=dict)
    explanation: str = ""


def kraken_variants(config: ModelConfig, degrees: tuple[int, ...] | None = None) -> list[ModelConfig]:
    """The config plus equal-parameters-per-layer Kraken models of other degrees (size_kraken rule)."""
    if config.arch != "kraken":
        return [config]
    total_heads = config.total_heads
    if degrees is None:
        degrees = tuple(d for d in (2, 4, 8, 16) if total_heads % d == 0)
    for deg in degrees:
        if not isinstance(deg, int) or isinstance(deg, bool) or deg < 1:
            raise ConfigError(f"kraken degree: must be a positive integer, got {deg!r}")
        if total_heads % deg:
            raise ConfigError(f"kraken degree: {deg} does not divide the {total_heads} total heads")
    mult = config.ffn_size / config.n_embd
    if mult != int(mult):
        raise ConfigError(f"ffn_hidden: Kraken re-sizing needs an integer FFN multiple, got {mult}")
    budget = config.n_sub * (4 + 2 * int(mult)) * config.n_embd ** 2
    out = [config]
    base = config.name or "kraken"
    for deg in degrees:
        if deg == config.n_sub:
            continue
        sized = size_kraken(budget, config.n_layer, total_heads, deg, per_layer=True, ffn_mult=int(mult),
                            vocab_size=config.vocab_size, block_size=config.block_size)
        out.append(config.replace(n_sub=deg, n_embd=sized.n_embd, n_head=sized.n_head, head_dim=None,
                                  ffn_hidden=None if config.ffn_hidden is None else int(mult) * sized.n_embd,
                                  name=f"{base}-as-{deg}way"))
    return out


def splits(config: ModelConfig, chips: int, stages: tuple[int, ...] | None = None) -> list[tuple[int, int]]:
    """(total chips, pipeline stages) pairs to try within ``chips``: every divisor n of it, every stage
    count S dividing n (at most n_layer, or those in ``stages``)."""
    out = []
    for n in divisors(chips):
        for s in divisors(n):
            if s <= config.n_layer and (stages is None or s in stages):
                out.append((n, s))
    return out


def deployments(config: ModelConfig, hw: Hardware, chips: int, kraken_degrees: tuple[int, ...] | None = None,
                stages: tuple[int, ...] | None = None) -> tuple[list[tuple[ModelConfig, int, int]], int]:
    """Every (model variant, chips, stages) of ``kraken_variants`` x ``splits`` that is a valid split on
    ``hw`` (layouts.check_split), and how many were not."""
    valid, invalid = [], 0
    for variant in kraken_variants(config, kraken_degrees):
        for n, s in splits(variant, chips, stages):
            try:
                check_split(variant, n // s, s, hw.chips_per_node)
            except ConfigError:
                invalid += 1
                continue
            valid.append((variant, n, s))
    return valid, invalid


def _workloads(workload: Workload, batches: tuple[int, ...] | None) -> list[Workload]:
    """The workload at each batch limit: both phases' batch, or only the decode batch when it is set."""
    if not batches:
        return [workload]
    if workload.decode_batch is None:
        return [Workload(b, workload.prompt, workload.generate, workload.dtype) for b in batches]
    return [Workload(workload.batch, workload.prompt, workload.generate, workload.dtype, b) for b in batches]


def _check_plan_args(chips: int, objective: str, target_latency: float | None, memory_limit: float | None) -> None:
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective: must be one of {OBJECTIVES}, got {objective!r}")
    if not isinstance(chips, int) or isinstance(chips, bool) or not 1 <= chips <= MAX_PLAN_CHIPS:
        raise ConfigError(f"chips: must be an integer in [1, {MAX_PLAN_CHIPS}], got {chips!r}")
    for key, value in (("target latency", target_latency), ("memory limit", memory_limit)):
        if value is not None and not (isinstance(value, (int, float)) and 0 < value < float("inf")):
            raise ConfigError(f"{key}: must be a positive finite number, got {value!r}")


def plan(config: ModelConfig, hw: Hardware, workload: Workload, chips: int, target_latency: float | None = None,
         objective: str = "cost", batches: tuple[int, ...] | None = None,
         kraken_degrees: tuple[int, ...] | None = None, overlap: str = "none",
         stages: tuple[int, ...] | None = None, memory_limit: float | None = None) -> Plan:
    """Search for the best way to serve ``workload`` on up to ``chips`` chips.

    Candidates: every (chips n, stages S) of ``splits`` x every batch limit in ``batches`` (default:
    the workload's; it sets the decode batch when the workload has its own) x every Kraken degree
    (kraken configs only), each with the fastest layout and micro-batching per phase. Infeasible: not a
    valid split (layouts.check_split), over ``memory_limit`` bytes per chip (default: the HBM), or
    total latency over ``target_latency``. ``objective`` "cost" minimises chip-seconds per token,
    "latency" total latency, "throughput" maximises tokens/s of all the replicas the budget holds.
    """
    _check_plan_args(chips, objective, target_latency, memory_limit)
    for key, values in (("batches", batches), ("stages", stages), ("kraken degrees", kraken_degrees)):
        if values is not None and not values:
            raise ConfigError(f"{key}: give at least one value to try (or None for the default)")
    limit = memory_limit or hw.memory_bytes
    feasible: list[Candidate] = []
    rejected = {"split": 0, "memory": 0, "latency": 0}
    loads = _workloads(workload, batches)
    for wl in loads:
        check_context(config, wl)
    valid, invalid = deployments(config, hw, chips, kraken_degrees, stages)
    rejected["split"] = invalid * len(loads)
    for variant, n, s in valid:
        for wl in loads:
            est = estimate(variant, hw, wl, n, overlap=overlap, pipeline=Pipeline(stages=s))
            if est.memory_per_chip_bytes > limit:
                rejected["memory"] += 1
            elif target_latency is not None and est.total_s > target_latency:
                rejected["latency"] += 1
            else:
                feasible.append(Candidate(variant, est, replicas=chips // n))
    if not feasible:
        why = ", ".join(f"{n} {reason}" for reason, n in (("out of memory", rejected["memory"]), (
            f"over the latency target {target_latency} s", rejected["latency"]), ("not a valid split",
                                                                                  rejected["split"])) if n)
        raise ConfigError(f"plan: nothing fits on up to {chips} x {hw.name} within {format_bytes(limit)} per chip "
                          f"({why or 'no candidate'}); allow more chips, int8 weights or a looser target")

    def key(c: Candidate) -> tuple[float, float]:
        e = c.estimate
        if objective == "cost":
            return e.chip_seconds_per_token, e.total_s
        if objective == "latency":
            return e.total_s, e.chip_seconds_per_token
        return -c.tokens_per_s, e.total_s

    ranked = sorted(feasible, key=key)
    return Plan(best=ranked[0], ranked=ranked, rejected=rejected,
                explanation=_explain(ranked, rejected, objective, target_latency))


def _explain(ranked: list[Candidate], rejected: dict[str, int], objective: str, target: float | None) -> str:
    best = ranked[0].estimate
    goal = {"cost": "lowest chip-seconds per token", "latency": "lowest total latency",
            "throughput": "highest tokens/s over the chip budget"}[objective]
    lines = [f"Chosen: {ranked[0].label}" + (f", {ranked[0].replicas} replicas" if objective == "throughput" else "")
             + ".",
             f"Objective: {goal}" + (f" within {target:g} s total latency." if target else "."),
             f"It predicts TTFT {best.ttft_s * 1e3:.2f} ms (prefill {best.prefill.bound}-bound, "
             f"MFU {best.prefill.mfu:.0%})"
             + (f", {best.per_token_s * 1e3:.2f} ms per decode step ({best.decode.bound}-bound, "
                f"MFU {best.decode.mfu:.0%})" if best.decode else "")
             + f", whole-request MFU {best.mfu:.0%}, {best.chip_seconds_per_token:.3g} chip-s/token, "
               f"{format_bytes(best.memory_per_chip_bytes)} per chip.",
             f"Searched {len(ranked) + sum(rejected.values())} candidates: {len(ranked)} feasible, "
             f"{rejected['memory']} out of memory, {rejected['latency']} over the latency target, "
             f"{rejected['split']} not a valid split."]
    for runner in ranked[1:3]:
        e = runner.estimate
        lines.append(f"Runner-up: {runner.label} -> {e.total_s * 1e3:.2f} ms total, "
                     f"{e.chip_seconds_per_token:.3g} chip-s/token.")
    return "\n".join(lines)
