"""Plots of the cost model (matplotlib, Agg): Kraken speedup bars (one A100 node, and H100 clusters),
roofline, latency vs chips, MFU vs tokens per batch, memory vs context. ``make_plots(outdir)`` writes
them all."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from krakenlm.costmodel.estimator import (  # noqa: E402
    DECODE_LAYOUTS,
    PREFILL_LAYOUTS,
    Layout,
    Workload,
    kv_cache_bytes_per_chip,
    phase_estimate,
    weights_per_chip,
)
from krakenlm.costmodel.hardware import Hardware, load_hardware  # noqa: E402
from krakenlm.costmodel.studies import (  # noqa: E402
    CLUSTER_DEGREES,
    CLUSTER_NODES,
    PAPER_KRAKEN_SPEEDUP,
    PLACEMENTS,
    cluster_study,
    geomean,
    kraken_study,
)
from krakenlm.presets import get_preset  # noqa: E402


def plot_kraken_speedup(path: str | Path, hw: Hardware | None = None) -> float:
    """Bars of predicted TTFT speedup over standard TP (Kraken and parallel block) for the 20
    latency-study configurations, with the geometric mean beside the paper's 35.6%. Returns the
    Kraken geometric-mean speedup."""
    hw = hw or load_hardware("a100-40gb-nvswitch")
    rows = kraken_study(hw)
    labels = [f"{r.size}\nL{r.prompt} TP{r.tp}" for r in rows]
    kr = [r.speedup for r in rows]
    par = [r.parallel_speedup for r in rows]
    g_kr, g_par = geomean(kr), geomean(par)
    fig, ax = plt.subplots(figsize=(14, 4.8))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], par, 0.4, label=f"parallel block (geo-mean {g_par:.3f}x)", color="#999999")
    ax.bar([x + 0.2 for x in xs], kr, 0.4, label=f"Kraken (geo-mean {g_kr:.3f}x)", color="#1f77b4")
    paper = 1 + PAPER_KRAKEN_SPEEDUP
    ax.axhline(paper, color="#d62728", ls="--", label=f"paper geo-mean {paper:.3f}x")
    ax.axhline(g_kr, color="#1f77b4", ls=":")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("TTFT speedup over standard TP")
    ax.set_title(f"Predicted TTFT speedup over standard TP, {hw.name}, fp16, batch 1")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return g_kr


def plot_roofline(path: str | Path, hw: Hardware | None = None, model: str = "palm-62b", chips: int = 8) -> None:
    """Per-phase roofline: achieved FLOP/s per chip vs arithmetic intensity, prefill and decode
    points over batch size, against the spec's compute and memory ceilings."""
    hw = hw or load_hardware("tpu-v4")
    cfg = get_preset(model)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    peak, bw = hw.flop_rate("bf16"), hw.memory_rate("bf16")
    xs = [2 ** i for i in range(-2, 20)]
    ax.loglog(xs, [min(peak, x * bw) for x in xs], "k-", label="roofline")
    for phase, marker in (("prefill", "o"), ("decode", "s")):
        pts = []
        for b in (1, 4, 16, 64, 256):
            wl = Workload(batch=b, prompt=1984 if phase == "prefill" else 512, generate=64)
            est = phase_estimate(cfg, hw, wl, phase, Layout("2d-ws", "batch", chips))
            pts.append((est.flops_per_chip / est.bytes_per_chip, est.flops_per_chip / est.time_s))
        ax.loglog(*zip(*pts, strict=True), marker=marker, ls="--", label=f"{phase} (B = 1..256)")
    ax.set_xlabel("arithmetic intensity (FLOP / HBM byte)")
    ax.set_ylabel("achieved FLOP/s per chip")
    ax.set_title(f"Roofline: {model} on {chips} x {hw.name}, 2D WS")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency_vs_chips(path: str | Path, hw: Hardware | None = None, model: str = "palm-540b") -> None:
    """Per-layout latency against chip count, prefill (B=1, 2048 tokens) and a decode step (B=64, context
    1984-2048); chip counts that split PaLM's 48 heads whole or pad them to one per chip."""
    hw = hw or load_hardware("tpu-v4")
    cfg = get_preset(model)
    chips = [16, 48, 64, 128, 256]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, phase, layouts, wl in (
            (axes[0], "prefill", PREFILL_LAYOUTS, Workload(batch=1, prompt=2048, dtype="int8")),
            (axes[1], "decode", DECODE_LAYOUTS, Workload(batch=64, prompt=1984, generate=64, dtype="int8"))):
        for lay in layouts:
            ys = [phase_estimate(cfg, hw, wl, phase, Layout(lay, "batch", n)).time_s * 1e3 for n in chips]
            ax.loglog(chips, ys, marker="o", label=lay)
        ax.set_xticks(chips, [str(n) for n in chips])
        ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
        ax.set_xlabel("chips")
        ax.set_ylabel("ms" + (" per step" if phase == "decode" else ""))
        ax.set_title(f"{model} {phase} ({'B=1, 2048 tokens' if phase == 'prefill' else 'B=64'}), int8")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_mfu_vs_tokens(path: str | Path, hw: Hardware | None = None, model: str = "palm-540b", chips: int = 64) -> None:
    """Prefill MFU against tokens per batch for each FFN layout (the shape of Pope Figure 7)."""
    hw = hw or load_hardware("tpu-v4")
    cfg = get_preset(model)
    batches = [2 ** i for i in range(0, 11)]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for lay in PREFILL_LAYOUTS:
        ys = [phase_estimate(cfg, hw, Workload(batch=b, prompt=2048), "prefill", Layout(lay, "batch", chips)).mfu
              for b in batches]
        ax.semilogx([b * 2048 for b in batches], ys, marker="o", label=lay)
    ax.set_xlabel("tokens per batch")
    ax.set_ylabel("MFU")
    ax.set_title(f"Prefill MFU, {model} on {chips} x {hw.name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory_vs_context(path: str | Path, hw: Hardware | None = None, model: str = "palm-540b",
                           chips: int = 64, batch: int = 128) -> None:
    """Per-chip memory (weights + KV cache) against context for each attention sharding."""
    hw = hw or load_hardware("tpu-v4")
    cfg = get_preset(model)
    contexts = [2 ** i for i in range(7, 17)]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    w = weights_per_chip(cfg, chips, "bf16")
    for attention in ("heads", "batch"):
        ys = [(w + kv_cache_bytes_per_chip(cfg, batch, c, chips, attention, 2)) / 2 ** 30 for c in contexts]
        ax.loglog(contexts, ys, marker="o", label=f"multiquery, attention over {attention}")
    ax.axhline(hw.memory_bytes / 2 ** 30, color="black", ls="--", label="HBM capacity")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("GiB per chip")
    ax.set_title(f"Memory per chip, {model}, {chips} chips, batch {batch}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cluster_kraken(path: str | Path, hw: Hardware | None = None) -> None:
    """Kraken's predicted TTFT speedup over standard TP on 2 and 4 nodes of 8 H100, per degree, with the
    exchange across nodes (one TP group over all chips) or inside a node (TP 8, a pipeline stage per node)."""
    hw = hw or load_hardware("h100-sxm")
    rows = cluster_study(hw)
    fig, axes = plt.subplots(1, len(CLUSTER_NODES), figsize=(14, 4.8), sharey=True)
    colors = {(4, "across"): "#9ecae1", (4, "inside"): "#3182bd", (8, "across"): "#fdae6b", (8, "inside"): "#e6550d"}
    for ax, nodes in zip(axes, CLUSTER_NODES, strict=True):
        sub = [r for r in rows if r.nodes == nodes]
        xs = range(len(sub))
        for i, (degree, place) in enumerate((d, p) for d in CLUSTER_DEGREES for p in PLACEMENTS):
            ys = [r.speedup(degree, place) or 0.0 for r in sub]
            ax.bar([x + (i - 1.5) * 0.2 for x in xs], ys, 0.2, color=colors[(degree, place)],
                   label=f"Kraken-{degree}, exchange {'across nodes' if place == 'across' else 'inside a node'}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(list(xs), [f"{r.size}\nL{r.prompt}" for r in sub], fontsize=8)
        ax.set_title(f"{nodes} nodes x {hw.chips_per_node} {hw.name}, batch 1, fp16 (no bar: heads do not split)")
    axes[0].set_ylabel("TTFT speedup over standard TP, same placement")
    axes[0].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_plots(outdir: str | Path) -> list[Path]:
    """Write every plot as ``costmodel_*.png`` into ``outdir``; returns the paths."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"costmodel_{n}.png" for n in
             ("a100_kraken_speedup", "roofline", "latency_vs_chips", "mfu_vs_tokens", "memory_vs_context",
              "h100_cluster_kraken")]
    plot_kraken_speedup(paths[0])
    plot_roofline(paths[1])
    plot_latency_vs_chips(paths[2])
    plot_mfu_vs_tokens(paths[3])
    plot_memory_vs_context(paths[4])
    plot_cluster_kraken(paths[5])
    return paths
