"""PNG figures of a bench result: speedup over standard TP (paper Figs. 4-5), runtime breakdown per
category (Figs. 6-7), and TTFT against link bandwidth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from krakenlm.bench.breakdown import CATEGORIES  # noqa: E402
from krakenlm.bench.timing import geometric_mean  # noqa: E402


def _link(cell: dict[str, Any]) -> str:
    return f"{cell['link_gbps']:g} Gbit/s" if cell["link_gbps"] else "loopback"


def _cell_label(cell: dict[str, Any]) -> str:
    return f"{cell['shape']}\nT={cell['prompt_len']} B={cell['batch']}\n{cell['dtype']}"


def speedup(result: dict[str, Any], path: Path) -> Path:
    """Speedup over standard TP (standard / x, median of per-round ratios), one panel per link, with
    the geometric mean over the panel's configurations."""
    links = sorted({_link(c) for c in result["cells"]}, key=lambda s: (s != "loopback", s))
    fig, axes = plt.subplots(len(links), 1, figsize=(max(6, 1.6 * len(result["cells"]) / len(links) + 3),
                                                      3.2 * len(links)), squeeze=False)
    for ax, link in zip(axes[:, 0], links, strict=True):
        cells = [c for c in result["cells"] if _link(c) == link]
        labels = [_cell_label(c) for c in cells] + ["geomean"]
        for k, (name, ratio) in enumerate([("parallel", "parallel/gpt"), ("kraken", "kraken/gpt")]):
            if not all(ratio in c["ratios"]["prefill"] for c in cells):  # e.g. a sweep of trained checkpoints
                continue
            values = [1 / c["ratios"]["prefill"][ratio]["median"] for c in cells]
            values.append(geometric_mean(values))
            ax.bar([i + 0.38 * (k - 0.5) for i in range(len(values))], values, width=0.38, label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylabel("TTFT speedup over standard")
        ax.set_title(f"{link}, tp={cells[0]['tp']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def breakdown(result: dict[str, Any], path: Path) -> Path:
    """Stacked per-category prefill time (profiled rank 0, seconds) for each cell and architecture."""
    bars = [(c, arch) for c in result["cells"] if "breakdown" in c for arch in c["breakdown"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(bars) + 2), 4.5))
    bottoms = [0.0] * len(bars)
    for cat in CATEGORIES:
        values = [c["breakdown"][arch][cat] * 1e3 for c, arch in bars]
        ax.bar(range(len(bars)), values, bottom=bottoms, label=cat)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    ax.set_xticks(range(len(bars)), [f"{arch}\n{_link(c)} {c['shape']}\nT={c['prompt_len']} {c['dtype']}"
                                     for c, arch in bars], fontsize=6, rotation=90)
    ax.set_ylabel("prefill time on rank 0 (ms, profiled)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def bandwidth(result: dict[str, Any], path: Path) -> Path | None:
    """TTFT against link bandwidth per architecture (loopback dashed), one panel per workload."""
    shaped = [c for c in result["cells"] if c["link_gbps"]]
    if not shaped:
        return None
    keys = sorted({(c["shape"], c["prompt_len"], c["batch"], c["dtype"], c["tp"]) for c in shaped}, key=str)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        cells = sorted([c for c in result["cells"] if (c["shape"], c["prompt_len"], c["batch"], c["dtype"], c["tp"])
                        == key], key=lambda c: c["link_gbps"] or float("inf"))
        for k, arch in enumerate(("gpt", "parallel", "kraken", "kraken/no-comm")):
            if not all(arch in c["variants"] for c in cells):
                continue
            pts = [(c["link_gbps"], c["variants"][arch]["prefill"]["median"] * 1e3) for c in cells if c["link_gbps"]]
            line = ax.plot(*zip(*pts, strict=True), marker="o", label=arch, color=f"C{k}")[0]
            for c in cells:
                if not c["link_gbps"]:
                    ax.axhline(c["variants"][arch]["prefill"]["median"] * 1e3, ls="--", lw=0.8,
                               color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("link bandwidth (Gbit/s); dashed: loopback")
        ax.set_ylabel("TTFT (ms)")
        ax.set_title("{} T={} B={} {} tp={}".format(*key), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(result: dict[str, Any], out_dir: Path) -> list[Path]:
    paths = [speedup(result, out_dir / "bench_speedup.png"), breakdown(result, out_dir / "bench_breakdown.png"),
             bandwidth(result, out_dir / "bench_bandwidth.png")]
    return [p for p in paths if p is not None]
