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


def _shape_size(cell: dict[str, Any]) -> tuple[int, int, str]:
    """Order shapes by the standard model's width, then depth (a depth-truncated shape keeps its width)."""
    cfg = cell["variants"].get("gpt", {}).get("config") or {}
    return cfg.get("n_embd", 0), cfg.get("n_layer", 0), cell["shape"]


def _grid_panel(ax: Any, cells: list[dict[str, Any]], shapes: list[str], prompts: list[int]) -> Any:
    """One heatmap: model shape (rows) x prompt length (columns), Kraken's TTFT speedup over standard
    (and over the parallel block, second line) in each measured cell; unmeasured cells stay blank."""
    grid = [[float("nan")] * len(prompts) for _ in shapes]
    for c in cells:
        i, j = shapes.index(c["shape"]), prompts.index(c["prompt_len"])
        ratios = c["ratios"]["prefill"]
        if "kraken/gpt" not in ratios:
            continue
        grid[i][j] = 1 / ratios["kraken/gpt"]["median"]
        text = f"{grid[i][j]:.2f}x"
        if "kraken/parallel" in ratios:
            text += f"\nvs par {1 / ratios['kraken/parallel']['median']:.2f}x"
        ax.text(j, i, text, ha="center", va="center", fontsize=6)
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.5, vmax=1.5, aspect="auto")
    ax.set_xticks(range(len(prompts)), [f"T={t}" for t in prompts], fontsize=7)
    return image


def speedup_grid(result: dict[str, Any], path: Path) -> Path:
    """Kraken's TTFT speedup over standard TP on the paper's grid (model size x prompt length, Figs. 4-5):
    one heatmap per link (columns) and dtype / batch / TP degree (rows); 1.0 = parity."""
    links = sorted({c["link_gbps"] or 0.0 for c in result["cells"]})
    rows = sorted({(c["dtype"], c["batch"], c["tp"]) for c in result["cells"]})
    shapes = [s for _, s in sorted({(_shape_size(c), c["shape"]) for c in result["cells"]})]
    prompts = sorted({c["prompt_len"] for c in result["cells"]})
    size = (0.9 * len(links) * len(prompts) + 1.2, 2.2 * len(rows) + 0.6)  # room for two lines per cell
    fig, axes = plt.subplots(len(rows), len(links), figsize=size, squeeze=False, layout="constrained")
    image = None
    for r, (dtype, batch, tp) in enumerate(rows):
        for k, link in enumerate(links):
            ax = axes[r, k]
            cells = [c for c in result["cells"] if (c["link_gbps"] or 0.0) == link
                     and (c["dtype"], c["batch"], c["tp"]) == (dtype, batch, tp)]
            if not cells:
                ax.axis("off")
                continue
            image = _grid_panel(ax, cells, shapes, prompts)
            ax.set_yticks(range(len(shapes)), shapes, fontsize=7)
            ax.set_title(f"{_link(cells[0])}, {dtype} B={batch} tp={tp}", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="Kraken TTFT speedup over standard TP")
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


def overlap(result: dict[str, Any], path: Path) -> Path | None:
    """Kraken's TTFT speedup over each standard-TP variant, blocking and system-overlapped (variant / Kraken,
    median of per-round ratios), per cell, one panel per link; None without overlap variants."""
    cells = [c for c in result["cells"] if any(v.get("overlap") for v in c["variants"].values())]
    if not cells:
        return None
    links = sorted({_link(c) for c in cells}, key=lambda s: (s != "loopback", s))
    fig, axes = plt.subplots(len(links), 1, figsize=(8, 3.2 * len(links)), squeeze=False)
    for ax, link in zip(axes[:, 0], links, strict=True):
        panel = [c for c in cells if _link(c) == link]
        names = list(dict.fromkeys(f"kraken/{label.replace('/', '-')}" for c in panel for label, v in
                                   c["variants"].items() if v.get("overlap") or label in ("gpt", "parallel")))
        width, top = 0.8 / len(names), 1.0
        for k, name in enumerate(sorted(names, key=lambda n: (n.split("-")[0].split("/")[1], n))):
            values = [1 / c["ratios"]["prefill"][name]["median"] if name in c["ratios"]["prefill"] else 0
                      for c in panel]
            top = max(top, *values)
            ax.bar([i + width * (k - (len(names) - 1) / 2) for i in range(len(panel))], values, width=width,
                   label="over " + name.split("/", 1)[1].replace("-", "/", 1))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylim(0, 1.3 * top)  # room for the legend
        ax.set_xticks(range(len(panel)), [_cell_label(c) for c in panel], fontsize=7)
        ax.set_ylabel("Kraken TTFT speedup")
        ax.set_title(f"{link}, tp={panel[0]['tp']}: Kraken vs blocking and overlapped standard TP", fontsize=9)
        ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(result: dict[str, Any], out_dir: Path) -> list[Path]:
    paths = [speedup(result, out_dir / "bench_speedup.png"), breakdown(result, out_dir / "bench_breakdown.png"),
             bandwidth(result, out_dir / "bench_bandwidth.png"), overlap(result, out_dir / "bench_overlap.png")]
    return [p for p in paths if p is not None]
