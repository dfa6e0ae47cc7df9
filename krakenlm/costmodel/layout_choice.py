"""Which layouts run, and which runs fastest: the runtime's constraints on a layout for a model on ``tp``
ranks (check_layout, runnable) and the cost model's pick among the runnable ones (choose: what
``--layout auto`` and a plan's run command resolve to). Torch-free, so the planner and the engine share it.
"""

from __future__ import annotations

from krakenlm.config import ModelConfig
from krakenlm.costmodel.estimator import Layout as CostLayout
from krakenlm.costmodel.estimator import Workload, phase_estimate
from krakenlm.costmodel.hardware import Hardware
from krakenlm.costmodel.layouts import check_split, layer_pairs, make_mesh, split_2d_axes
from krakenlm.errors import ConfigError
from krakenlm.layout import ATTENTION, FFN_LAYOUTS, GATHERED_AXES, KRAKEN_LAYOUT, WS_LAYOUTS, Layout, PhaseLayout


def check_layout(config: ModelConfig, layout: Layout, tp: int) -> None:
    """Refuse, naming the constraint, a layout this model and number of ranks cannot run."""
    kraken = config.arch == "kraken"
    for phase in (layout.prefill, layout.decode):
        if kraken != (phase.ffn == KRAKEN_LAYOUT):
            raise ConfigError(f"layout: {phase} does not apply to arch={config.arch!r} (Kraken models run 'kraken': "
                              f"the sub-layer split, 1D inside a sub-layer when T = kN; gpt and parallel models one of "
                              f"{FFN_LAYOUTS})")
    if kraken:
        return
    if config.arch == "ladder" and layout != Layout.default(config):
        raise ConfigError(f"layout: {layout} does not apply to arch='ladder' (its modules' sums overlap the next "
                          f"module: Megatron, the default layout, only)")
    dec, pre = layout.decode, layout.prefill
    if dec.gathered:
        raise ConfigError(f"layout: {dec} for decode: weight-gathered layouts are for prefill (a decode step moves "
                          f"the weights of every layer for a handful of tokens); decode with 1d-ws or 2d-ws")
    if pre.gathered and pre.attention != "batch":
        raise ConfigError(f"layout: {pre}: weight-gathered layouts shard the batch, so attention is batch-sharded "
                          f"too; use {pre.ffn}/attn-batch")
    if pre != dec and not (pre.gathered and dec.attention == "batch"):
        raise ConfigError(f"layout: prefill {pre} and decode {dec} must share the stored weights and the KV cache: "
                          f"use one layout for both, or a weight-gathered prefill (wg-*/attn-batch) with an "
                          f"attn-batch decode")
    _check_divisible(config, dec, tp)
    if pre.gathered and tp > 1:
        _check_gather(config, pre, dec, tp)


def _check_divisible(config: ModelConfig, phase: PhaseLayout, tp: int) -> None:
    check_split(config, tp)
    hs, n = config.head_size, tp
    needs = [("ffn_size", config.ffn_size, "the FFN columns")]
    if phase.ffn == "2d-ws":
        needs.append(("n_embd", config.n_embd, "the residual stream's E chunks"))
    if phase.attention == "batch":
        needs += [("n_head * head_size", config.n_head * hs, "the q columns"),
                  ("n_kv_head * head_size", config.kv_heads * hs, "the k and v columns")]
    elif config.kv_heads % n and n % config.kv_heads:
        raise ConfigError(f"layout: attn-heads on {n} ranks needs n_kv_head={config.kv_heads} to divide or be a "
                          f"multiple of {n}; use attn-batch")
    elif config.n_head % n:
        raise ConfigError(f"layout: attn-heads on {n} ranks needs n_head={config.n_head} divisible by {n} (whole "
                          f"heads per rank); use attn-batch")
    for what, value, why in needs:
        if value % n:
            raise ConfigError(f"layout: {phase} on {n} ranks splits {why} evenly: {what}={value} is not divisible "
                              f"by {n}")


def _check_gather(config: ModelConfig, pre: PhaseLayout, dec: PhaseLayout, tp: int) -> None:
    """A weight-gathered prefill must receive whole rows of E from the decode's stored weights: it gathers
    the first mesh axes, so it must gather every axis the decode's 2d-ws storage splits E over."""
    if dec.ffn != "2d-ws":  # 1d-ws stores whole rows of E
        return
    dims = make_mesh(tp)
    axes = set(range(min(GATHERED_AXES[pre.ffn], len(dims))))
    names = ("block",) if config.arch == "parallel" else ("attn", "ffn")  # layer_pairs' order
    for name, pair in zip(names, layer_pairs(config), strict=True):
        x_axes = split_2d_axes(pair, dims)[0]
        if not set(x_axes) <= axes:
            raise ConfigError(f"layout: {pre} gathers mesh axes {sorted(axes)} of {dims}, but {dec} splits the "
                              f"{name} pair's E over axes {list(x_axes)}: gather those too (e.g. wg-xyz)")


def runnable(config: ModelConfig, tp: int) -> list[Layout]:
    """Every (prefill, decode) layout this model runs on ``tp`` ranks."""
    if config.arch == "kraken" or tp == 1:
        return [Layout.default(config)]
    out = []
    for dec in (PhaseLayout(f, a) for f in WS_LAYOUTS for a in ATTENTION):
        pres = [dec] + ([PhaseLayout(w, "batch") for w in GATHERED_AXES] if dec.attention == "batch" else [])
        for pre in pres:
            try:
                check_layout(config, Layout(pre, dec), tp)
            except ConfigError:
                continue
            out.append(Layout(pre, dec))
    return out


def choose(config: ModelConfig, tp: int, workload: Workload, hardware: Hardware) -> Layout:
    """The runnable layout the cost model predicts fastest for ``workload`` (prefill + all decode steps)."""
    best: tuple[float, Layout] | None = None
    for layout in runnable(config, tp):
        if config.arch == "kraken" or tp == 1:
            return layout
        if layout.prefill.gathered and workload.batch % tp:
            continue

        def seconds(phase: str, p: PhaseLayout) -> float:
            cost = CostLayout(p.ffn, p.attention, tp, head="replicated")
            return phase_estimate(config, hardware, workload, phase, cost).time_s

        total = seconds("prefill", layout.prefill)
        if workload.generate:
            total += workload.generate * seconds("decode", layout.decode)
        if best is None or total < best[0] * (1 - 1e-9):
            best = (total, layout)
    assert best is not None
    return best[1]
