"""Planner: search chips (TP degree) x Kraken degree x batch, with the best layout per phase, for a
latency target or the lowest cost, and say why the winner won."""

from __future__ import annotations

from dataclasses import dataclass, field

from krakenlm.config import ModelConfig, size_kraken
from krakenlm.costmodel.estimator import Estimate, Workload, estimate
from krakenlm.costmodel.hardware import Hardware
from krakenlm.errors import ConfigError

OBJECTIVES = ("cost", "latency")


@dataclass(frozen=True)
class Candidate:
    """One point of the search, with the model variant it used."""

    config: ModelConfig
    estimate: Estimate

    @property
    def label(self) -> str:
        e = self.estimate
        dec = f", decode {e.decode.layout}" if e.decode else ""
        return (f"{self.config.name or self.config.arch} on {e.chips} chip(s), batch {e.workload.batch}: "
                f"prefill {e.prefill.layout}{dec}")


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
    mult = config.ffn_size / config.n_embd
    if mult != int(mult):
        raise ConfigError(f"ffn_hidden: Kraken re-sizing needs an integer FFN multiple, got {mult}")
    budget = config.n_sub * (4 + 2 * int(mult)) * config.n_embd ** 2
    out = [config]
    base = config.name or "kraken"
    for deg in degrees:
        if deg == config.n_sub:
            continue
        if total_heads % deg:
            raise ConfigError(f"kraken degree: {deg} does not divide the {total_heads} total heads")
        sized = size_kraken(budget, config.n_layer, total_heads, deg, per_layer=True, ffn_mult=int(mult),
                            vocab_size=config.vocab_size, block_size=config.block_size)
        out.append(config.replace(n_sub=deg, n_embd=sized.n_embd, n_head=sized.n_head, head_dim=None,
                                  ffn_hidden=None if config.ffn_hidden is None else int(mult) * sized.n_embd,
                                  name=f"{base}-as-{deg}way"))
    return out


def _chip_options(config: ModelConfig, max_chips: int) -> list[int]:
    opts = [c for c in range(1, max_chips + 1) if max_chips % c == 0]
    if config.arch == "kraken":
        opts = [c for c in opts if c % config.n_sub == 0 or config.n_sub % c == 0]
    return opts


def plan(config: ModelConfig, hw: Hardware, workload: Workload, chips: int, target_latency: float | None = None,
         objective: str = "cost", batches: tuple[int, ...] | None = None,
         kraken_degrees: tuple[int, ...] | None = None, overlap: str = "none") -> Plan:
    """Search for the best way to serve ``workload`` on up to ``chips`` chips.

    Candidates: every divisor of ``chips`` (Kraken: compatible with the degree) x every batch in
    ``batches`` (default: the workload's) x every Kraken degree (kraken configs only), each with the
    fastest layout per phase. Infeasible: does not fit in memory, or total latency over
    ``target_latency``. ``objective`` "cost" minimises chip-seconds per token, "latency" total latency.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective: must be one of {OBJECTIVES}, got {objective!r}")
    if not isinstance(chips, int) or chips < 1:
        raise ConfigError(f"chips: must be a positive integer, got {chips!r}")
    if target_latency is not None and target_latency <= 0:
        raise ConfigError(f"target latency: must be positive seconds, got {target_latency}")
    batches = batches or (workload.batch,)
    feasible: list[Candidate] = []
    rejected = {"memory": 0, "latency": 0}
    for variant in kraken_variants(config, kraken_degrees):
        for n in _chip_options(variant, chips):
            for b in batches:
                wl = Workload(batch=b, prompt=workload.prompt, generate=workload.generate, dtype=workload.dtype)
                est = estimate(variant, hw, wl, n, overlap=overlap)
                if not est.fits:
                    rejected["memory"] += 1
                elif target_latency is not None and est.total_s > target_latency:
                    rejected["latency"] += 1
                else:
                    feasible.append(Candidate(variant, est))
    if not feasible:
        raise ConfigError(f"plan: nothing fits on up to {chips} x {hw.name} "
                          f"({rejected['memory']} candidates out of memory, {rejected['latency']} over the "
                          f"latency target {target_latency}); allow more chips, int8 weights or a looser target")

    def key(c: Candidate) -> tuple[float, float]:
        e = c.estimate
        return (e.chip_seconds_per_token, e.total_s) if objective == "cost" else (e.total_s, e.chip_seconds_per_token)

    ranked = sorted(feasible, key=key)
    return Plan(best=ranked[0], ranked=ranked, rejected=rejected,
                explanation=_explain(ranked, rejected, objective, target_latency))


def _explain(ranked: list[Candidate], rejected: dict[str, int], objective: str, target: float | None) -> str:
    best = ranked[0].estimate
    goal = "lowest chip-seconds per token" if objective == "cost" else "lowest total latency"
    lines = [f"Chosen: {ranked[0].label}.",
             f"Objective: {goal}" + (f" within {target:g} s total latency." if target else "."),
             f"It predicts TTFT {best.ttft_s * 1e3:.2f} ms (prefill {best.prefill.bound}-bound, "
             f"MFU {best.prefill.mfu:.0%})"
             + (f", {best.per_token_s * 1e3:.2f} ms per decode step ({best.decode.bound}-bound, "
                f"MFU {best.decode.mfu:.0%})" if best.decode else "")
             + f", {best.chip_seconds_per_token:.3g} chip-s/token, "
               f"{best.memory_per_chip_bytes / 2**30:.1f} GiB per chip.",
             f"Searched {len(ranked) + sum(rejected.values())} candidates: {len(ranked)} feasible, "
             f"{rejected['memory']} out of memory, {rejected['latency']} over the latency target."]
    for runner in ranked[1:3]:
        e = runner.estimate
        lines.append(f"Runner-up: {runner.label} -> {e.total_s * 1e3:.2f} ms total, "
                     f"{e.chip_seconds_per_token:.3g} chip-s/token.")
    return "\n".join(lines)
