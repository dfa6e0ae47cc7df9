"""Reproductions of published numbers: Pope et al. Tables 1-2, the layout switch points, parameter
counts, the Kraken paper's A100 TTFT study (20 configurations), and the calibration of this machine
against our own benchmark records. Tests use the numbers; the ``*_markdown`` functions render the
tables of docs/costmodel.md and the README between ``<!-- costmodel:NAME -->`` markers
(``python -m krakenlm.costmodel.studies --write`` refreshes them), so the numbers are generated, never typed."""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

from krakenlm.batching.scheduler import BatchingPolicy
from krakenlm.batching.workload import Lengths, arrivals
from krakenlm.config import ModelConfig
from krakenlm.costmodel.calibrate import (
    FIT_FIELDS,
    Calibration,
    calibrate,
    evaluate,
    leave_one_out,
    load_records,
    markdown,
    mdape,
)
from krakenlm.costmodel.estimator import Workload, estimate, max_context
from krakenlm.costmodel.hardware import Hardware, load_hardware
from krakenlm.costmodel.layouts import (
    MatPair,
    check_split,
    comm_elements,
    continuous_ws_elements,
    make_mesh,
    pair_ops,
    switch_points,
)
from krakenlm.costmodel.simulate import CostModelTimes, simulate
from krakenlm.errors import ConfigError
from krakenlm.presets import get_preset

PAPER_KRAKEN_SPEEDUP = 0.356  # Kraken paper: geometric-mean TTFT improvement over standard TP
PALM_540B_PARAMS = 540e9  # the nominal count Pope et al. use for MFU

# Pope Table 1: (variant, attention sharding, d_head) -> max context at B=128, B=512
TABLE1 = {
    "multihead": (1320, 330),
    "multiquery-heads": (660, 165),
    "multiquery-batch": (43_000, 10_700),
}
# Pope Table 2: column -> (tokens per chip-group forward, seconds, MFU %)
TABLE2 = {
    "low-latency prefill": (1 * 2048, 0.29, 43),
    "low-latency decode": (64 * 64, 1.82, 14),
    "high-throughput prefill": (512 * 2048, 85.2, 76),
    "high-throughput decode": (512 * 64, 6.0, 33),
}
KRAKEN_SIZES = ("1.3b", "6.7b", "13b", "65b", "175b")
PAPER_SWITCH_POINTS = (18_432, 73_728, 1_179_648)  # Pope: 2D-WS -> WG-X -> WG-XY -> WG-XYZ, tokens
PAPER_PARAMS = {"palm-8b": 8.6e9, "palm-62b": 62.5e9, "palm-540b": 540e9, "mt-nlg-530b": 530e9}
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"  # the shipped benchmark records
DOCS = (ROOT / "docs" / "costmodel.md", ROOT / "README.md")  # files with generated blocks (see fill_blocks)


def table1_variant(name: str) -> tuple[ModelConfig, str]:
    """PaLM 540B as each Table 1 row: (config, attention sharding)."""
    palm = get_preset("palm-540b")
    if name == "multihead":
        return palm.replace(n_kv_head=None, head_dim=128, name="palm-540b-multihead"), "heads"
    return palm, name.split("-")[1]


def table1(hw: Hardware | None = None, chips: int = 64, kv_fraction: float = 0.3) -> dict[str, tuple[int, int]]:
    """Max context for each Table 1 row at B=128 and B=512 (30% of HBM for the KV cache).

    Reproduces the table with: 32 GiB (binary) HBM, bf16 cache, heads padded to a multiple of the
    64 chips (48 multihead heads -> one per chip, i.e. the 64-head padding), multiquery K/V
    replicated on every chip when sharded over heads, ceil(B/64) sequences per chip over batch.
    """
    hw = hw or load_hardware("tpu-v4")
    out = {}
    for name in TABLE1:
        config, attention = table1_variant(name)
        out[name] = tuple(max_context(config, hw, chips, b, attention, "bf16", kv_fraction) for b in (128, 512))
    return out


def mfu_from_latency(params: float, tokens: int, seconds: float, chips: int = 64, peak: float = 275e12) -> float:
    """MFU = 2 N tokens / (chips * peak * seconds), the paper's definition."""
    return 2 * params * tokens / (chips * peak * seconds)


def table2_mfu(params: float = PALM_540B_PARAMS) -> dict[str, float]:
    """Table 2's MFU recomputed from its own latencies (percent)."""
    return {k: 100 * mfu_from_latency(params, tok, sec) for k, (tok, sec, _) in TABLE2.items()}


def palm_switch_points() -> list[tuple[float, str, str]]:
    """Pope's weight-gathered switch points for PaLM 540B's FFN on a 4x4x4 slice.

    The paper's analysis counts two E x F matrices (W_in, W_out) per FFN, which this pair encodes.
    """
    palm = get_preset("palm-540b")
    return switch_points(MatPair(palm.n_embd, palm.ffn_size, palm.ffn_size), make_mesh(64, (4, 4, 4)))


@dataclass(frozen=True)
class KrakenRow:
    """One latency-study configuration: predicted TTFT (s) of each architecture."""

    size: str
    prompt: int
    tp: int
    standard: float
    parallel: float
    kraken: float

    @property
    def speedup(self) -> float:
        """Standard TTFT / Kraken TTFT."""
        return self.standard / self.kraken

    @property
    def parallel_speedup(self) -> float:
        return self.standard / self.parallel


def kraken_study(hw: Hardware | None = None, dtype: str = "fp16", phase: str = "prefill") -> list[KrakenRow]:
    """Predicted TTFT for the Kraken paper's 20 configurations (5 sizes x prompt 128/2048 x TP 4/8),
    batch 1, Kraken degree = TP degree, equal parameters per layer (presets gpt-/parallel-/krakenN-).

    ``phase="decode"`` gives the per-token decode latency at that context instead (not studied in the
    paper): the step after prompt - 1 tokens, so the context stays within the models' 2048."""
    hw = hw or load_hardware("a100-40gb-nvswitch")
    rows = []
    for size in KRAKEN_SIZES:
        for prompt in (128, 2048):
            for tp in (4, 8):
                wl = (Workload(batch=1, prompt=prompt, dtype=dtype) if phase == "prefill"
                      else Workload(batch=1, prompt=prompt - 1, generate=1, dtype=dtype))
                ests = [estimate(get_preset(f"{a}-{size}"), hw, wl, tp) for a in ("gpt", "parallel", f"kraken{tp}")]
                rows.append(KrakenRow(size, prompt, tp, *(e.ttft_s if phase == "prefill" else e.per_token_s
                                                          for e in ests)))
    return rows


def geomean(values: list[float]) -> float:
    """Geometric mean, the paper's way of averaging speedups."""
    return math.exp(sum(math.log(v) for v in values) / len(values))


def table2_records() -> list[dict]:
    """Table 2's four latencies as calibration records (decode: seconds per step over 64 steps
    after a 1984-token prompt, so the context ends at 2048; the LM head split over the chips)."""
    base = {"arch": "parallel", "preset": "palm-540b", "tp": 64, "link_gbps": None, "lm_head": "sharded"}
    return [
        dict(base, batch=1, prompt_len=2048, dtype="int8", phase="prefill", seconds=0.29, layout="2d-ws/attn-heads"),
        dict(base, batch=64, prompt_len=1984, generate=64, dtype="int8", phase="decode", seconds=1.82 / 64,
             layout="2d-ws/attn-batch"),
        dict(base, batch=512, prompt_len=2048, dtype="bf16", phase="prefill", seconds=85.2, layout="wg-xyz/attn-batch"),
        dict(base, batch=512, prompt_len=1984, generate=64, dtype="bf16", phase="decode", seconds=6.0 / 64,
             layout="2d-ws/attn-batch"),
    ]


# Markdown renderings ------------------------------------------------------------------------------
def _pct(ours: float, paper: float) -> str:
    return f"{100 * (ours - paper) / paper:+.1f}%"


def table1_markdown() -> str:
    """Pope Table 1 (max context, PaLM 540B, 64 chips, 30% of HBM for KV): ours vs paper."""
    lines = ["| variant | B=128 ours | paper | diff | B=512 ours | paper | diff |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, ours in table1().items():
        cells = [f"{o:,} | {p:,} | {_pct(o, p)}" for o, p in zip(ours, TABLE1[name], strict=True)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table2_markdown() -> str:
    """Pope Table 2's MFU recomputed from its printed latencies (N = 540e9) vs the printed MFU."""
    lines = ["| column | tokens | latency | MFU recomputed | paper |", "|---|---:|---:|---:|---:|"]
    for name, mfu in table2_mfu().items():
        tokens, seconds, paper = TABLE2[name]
        lines.append(f"| {name} | {tokens:,} | {seconds} s | {mfu:.2f}% | {paper}% |")
    return "\n".join(lines)


def crossover_chips(f_over_e: float, e: int = 18432) -> float:
    """Chips at which 2D weight-stationary traffic (continuous optimum X) falls to 1D's, by bisection."""
    f = f_over_e * e

    def gap(n: float) -> float:
        return continuous_ws_elements("2d-ws", e, f, n, 1.0) - continuous_ws_elements("1d-ws", e, f, n, 1.0)

    lo, hi = 1.0, 1e6
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if gap(mid) > 0 else (lo, mid)
    return hi


def crossover_markdown() -> str:
    """Where 2D beats 1D weight-stationary: the continuous crossover vs the paper's n = 4F/E, and the
    per-token traffic of an F = 4E pair on discrete meshes."""
    lines = ["| F/E | 2D = 1D at n (ours) | paper 4F/E |", "|---:|---:|---:|"]
    lines += [f"| {r} | {crossover_chips(r):.2f} | {4 * r} |" for r in (3, 4, 8)]
    lines += ["", "| chips | mesh | 1D elements/token | 2D elements/token | 2D / 1D |", "|---:|---|---:|---:|---:|"]
    pair = MatPair(4096, 16384, 16384)
    for n in (8, 16, 64):
        mesh = make_mesh(n, (4, 4, 4) if n == 64 else ())
        one, two = (comm_elements(pair_ops(lay, pair, 1.0, mesh)) for lay in ("1d-ws", "2d-ws"))
        lines.append(f"| {n} | {'x'.join(map(str, mesh))} | {one:,.0f} | {two:,.0f} | {two / one:.2f} |")
    return "\n".join(lines)


def switch_points_markdown() -> str:
    """Pope's weight-gathered switch points (PaLM 540B FFN, 4x4x4): ours vs paper, in tokens per batch."""
    lines = ["| switch | tokens (ours) | paper |", "|---|---:|---:|"]
    for (tokens, a, b), paper in zip(palm_switch_points(), PAPER_SWITCH_POINTS, strict=True):
        lines.append(f"| {a} -> {b} | {tokens:,.0f} | {paper:,} |")
    return "\n".join(lines)


def palm_param_formula(config: ModelConfig) -> int:
    """Pope's PaLM count: n_layers*(3EF + 2E*H*d_head + 2E*d_head) + 256000*E (norms excluded)."""
    e, f, hd = config.n_embd, config.ffn_size, config.head_size
    return config.n_layer * (3 * e * f + 2 * e * config.n_head * hd + 2 * e * hd) + 256000 * e


def param_counts_markdown() -> str:
    """ModelConfig.num_params for the paper's models vs Pope's formula (PaLM) and the published sizes."""
    lines = ["| model | num_params (ours) | Pope formula | published | diff |", "|---|---:|---:|---:|---:|"]
    for name, paper in PAPER_PARAMS.items():
        config = get_preset(name)
        n = config.num_params()
        formula = f"{palm_param_formula(config) / 1e9:.2f}e9" if name.startswith("palm") else "-"
        lines.append(f"| {name} | {n / 1e9:.2f}e9 | {formula} | {paper / 1e9:g}e9 | {_pct(n, paper)} |")
    return "\n".join(lines)


def table2_fit_markdown() -> str:
    """tpu-v4 (ideal factors) fitted to Table 2's four latencies: per point and the fitted factors."""
    fit = calibrate(load_hardware("tpu-v4"), table2_records())
    return (markdown(fit.rows) + f"\n\nMedian |error| {fit.mdape_before:.1f}% with the ideal spec, "
            f"{fit.mdape_after:.1f}% fitted: {fit.factors()}.")


def kraken_study_markdown(rows: list[KrakenRow] | None = None) -> str:
    """The 20 A100 configurations: predicted TTFT per architecture and speedups, with geometric means."""
    rows = rows or kraken_study()
    lines = ["| size | prompt | TP | standard ms | parallel ms | Kraken ms | parallel speedup | Kraken speedup |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.size} | {r.prompt} | {r.tp} | {r.standard * 1e3:.3f} | {r.parallel * 1e3:.3f} | "
              f"{r.kraken * 1e3:.3f} | {r.parallel_speedup:.3f}x | {r.speedup:.3f}x |" for r in rows]
    lines.append(f"| geometric mean | | | | | | {geomean([r.parallel_speedup for r in rows]):.3f}x | "
                 f"{geomean([r.speedup for r in rows]):.3f}x (paper {1 + PAPER_KRAKEN_SPEEDUP:.3f}x) |")
    return "\n".join(lines)


def kraken_speedup_grid_markdown(rows: list[KrakenRow] | None = None) -> str:
    """Predicted Kraken TTFT speedups as a size x (prompt, TP) grid; the paper's per-configuration values
    are only in its figures (reference/kraken.md gives the geometric mean), so that is the comparison."""
    rows = rows or kraken_study()
    cols = [(p, t) for p in (128, 2048) for t in (4, 8)]
    by = {(r.size, r.prompt, r.tp): r.speedup for r in rows}
    lines = ["| size | " + " | ".join(f"L{p} TP{t}" for p, t in cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {s} | " + " | ".join(f"{by[(s, p, t)]:.2f}x" for p, t in cols) + " |" for s in KRAKEN_SIZES]
    lines.append(f"\nGeometric mean {geomean(list(by.values())):.3f}x; paper (measured, TensorRT-LLM): "
                 f"{1 + PAPER_KRAKEN_SPEEDUP:.3f}x.")
    return "\n".join(lines)


# Kraken on H100 clusters: the exchange across nodes vs inside a node -------------------------------
CLUSTER_NODES = (2, 4)
CLUSTER_DEGREES = (4, 8)
PLACEMENTS = ("across", "inside")  # one TP group over every node's chips / TP8 per node, nodes as pipeline stages


@dataclass(frozen=True)
class ClusterRow:
    """Predicted TTFT (s, None where the split is not valid) of standard TP and Kraken of each degree, on
    ``nodes`` nodes of 8 chips: ``across`` = tensor parallel over all 8 x nodes chips (standard TP's
    all-reduces and Kraken's exchange cross nodes; Kraken T = k N keeps each sub-layer's k shards in one
    node), ``inside`` = tensor parallel over the 8 chips of a node, one pipeline stage per node."""

    size: str
    prompt: int
    nodes: int
    standard: dict[str, float | None]
    kraken: dict[tuple[int, str], float | None]

    def speedup(self, degree: int, placement: str) -> float | None:
        """Standard TTFT / Kraken TTFT in the same placement."""
        std, kr = self.standard[placement], self.kraken[(degree, placement)]
        return None if std is None or kr is None else std / kr


def _ttft(config: ModelConfig, hw: Hardware, wl: Workload, chips: int, stages: int = 1,
          overlap: str = "none") -> float | None:
    """TTFT, or None where the split is not valid."""
    try:
        check_split(config, chips // stages, stages, hw.chips_per_node)
    except ConfigError:
        return None
    return estimate(config, hw, wl, chips, pipeline=stages, overlap=overlap).ttft_s


def cluster_study(hw: Hardware | None = None, dtype: str = "fp16") -> list[ClusterRow]:
    """The paper's sizes and prompts (batch 1, fp16) on 2 and 4 nodes of 8 H100, each placement."""
    hw = hw or load_hardware("h100-sxm")
    rows = []
    for size in KRAKEN_SIZES:
        for prompt in (128, 2048):
            wl = Workload(batch=1, prompt=prompt, dtype=dtype)
            for nodes in CLUSTER_NODES:
                chips = hw.chips_per_node * nodes
                splits = {"across": (chips, 1), "inside": (chips, nodes)}
                standard = {k: _ttft(get_preset(f"gpt-{size}"), hw, wl, *v) for k, v in splits.items()}
                kraken = {(d, k): _ttft(get_preset(f"kraken{d}-{size}"), hw, wl, *v)
                          for d in CLUSTER_DEGREES for k, v in splits.items()}
                rows.append(ClusterRow(size, prompt, nodes, standard, kraken))
    return rows


def cluster_markdown(rows: list[ClusterRow] | None = None) -> str:
    """The cluster study as a table: standard TTFT per placement and Kraken's speedup per degree and
    placement, with geometric means (n/a: the heads do not split over that many chips)."""
    rows = rows or cluster_study()

    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v * 1e3:.3f}"

    def x(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}x"

    cols = [(d, p) for d in CLUSTER_DEGREES for p in PLACEMENTS]
    lines = ["| size | prompt | nodes | standard across ms | standard inside ms | "
             + " | ".join(f"Kraken-{d} {p}" for d, p in cols) + " |", "|---|---:|---:|---:|---:|" + "---:|" * len(cols)]
    lines += [f"| {r.size} | {r.prompt} | {r.nodes} | {ms(r.standard['across'])} | {ms(r.standard['inside'])} | "
              + " | ".join(x(r.speedup(d, p)) for d, p in cols) + " |" for r in rows]
    means = [geomean([v for r in rows if (v := r.speedup(d, p)) is not None]) for d, p in cols]
    lines.append("| geometric mean | | | | | " + " | ".join(f"{m:.3f}x" for m in means) + " |")
    return "\n".join(lines)


def pipeline_markdown(hw: Hardware | None = None, model: str = "gpt-175b") -> str:
    """TP x PP on 2 and 4 H100 nodes: TTFT at batch 1 and decode at batch 64 (fastest micro-batching)."""
    hw = hw or load_hardware("h100-sxm")
    config = get_preset(model)
    wl = Workload(batch=1, prompt=1984, generate=64, dtype="fp16", decode_batch=64)
    lines = ["| chips | TP x PP | TTFT ms | prefill bubble | decode step ms | decode micro-batches | decode tokens/s "
             "| GiB per chip |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for nodes in CLUSTER_NODES:
        chips = hw.chips_per_node * nodes
        for stages in (1, 2, 4, 8):
            est = estimate(config, hw, wl, chips, pipeline=stages)
            assert est.decode is not None
            lines.append(f"| {chips} | {est.tp} x {stages} | {est.ttft_s * 1e3:.2f} | "
                         f"{est.prefill.bubble_s / est.ttft_s:.0%} | {est.per_token_s * 1e3:.2f} | "
                         f"{est.decode.microbatches} | {64 / est.per_token_s:,.0f} | "
                         f"{est.memory_per_chip_bytes / 2 ** 30:.1f} |")
    return "\n".join(lines)


# Kraken vs system-overlapped standard TP (issue 25) --------------------------------------------------
@dataclass(frozen=True)
class OverlapPlatform:
    """A deployment of the overlap study: a bundled spec, the chips of one TP group, and the link swept
    (``link_field`` in GB/s per chip per direction; the first value is the spec's own)."""

    name: str
    hardware: str
    chips: int
    link_field: str
    links_gbs: tuple[float, ...]


OVERLAP_PLATFORMS = (
    OverlapPlatform("8x A100 NVSwitch", "a100-40gb-nvswitch", 8, "link_bw", (300, 100, 25)),
    OverlapPlatform("8x H100 NVSwitch", "h100-sxm", 8, "link_bw", (450, 150, 50)),
    OverlapPlatform("2x8 H100, TP 16 over IB", "h100-sxm", 16, "inter_node_bw", (50, 25, 12.5)),
)
OVERLAP_PROMPTS = (128, 512, 2048, 4096)
STANDARD_OVERLAPS = ("none", "chunked:2", "chunked:4", "chunked:8", "chunked:16", "collective-matmul")
RIVALS = ("parallel", "ladder", "kraken")  # architectures that overlap (or halve) the all-reduces themselves


@dataclass(frozen=True)
class OverlapRow:
    """Prefill TTFT (s) at one platform, link speed, size and prompt: the best standard TP over
    STANDARD_OVERLAPS (``mode`` names the winner) and each rival architecture on its own schedule
    (None where its heads do not split over the chips)."""

    platform: str
    link_gbs: float
    size: str
    prompt: int
    standard: float
    mode: str
    rivals: dict[str, float | None]

    def speedup(self, arch: str) -> float | None:
        """Best overlapped standard TTFT / the rival's: above 1 the architecture wins."""
        t = self.rivals[arch]
        return None if t is None else self.standard / t


def _study_config(name: str, prompt: int) -> ModelConfig:
    """The preset with a context long enough for ``prompt`` (time does not depend on block_size)."""
    config = get_preset(name)
    return config.replace(block_size=max(config.block_size, prompt))


def _overlap_row(platform: OverlapPlatform, hw: Hardware, link: float, size: str, prompt: int) -> OverlapRow | None:
    """One cell of the study, None where standard TP's heads do not split over the chips."""
    wl, n = Workload(batch=1, prompt=prompt, dtype="fp16"), platform.chips
    gpt = _study_config(f"gpt-{size}", prompt)
    standard = [(t, mode) for mode in STANDARD_OVERLAPS if (t := _ttft(gpt, hw, wl, n, overlap=mode)) is not None]
    if not standard:
        return None
    best, mode = min(standard)
    names = {"parallel": f"parallel-{size}", "ladder": f"ladder-{size}", "kraken": f"kraken{min(n, 8)}-{size}"}
    rivals = {arch: _ttft(_study_config(name, prompt), hw, wl, n) for arch, name in names.items()}
    return OverlapRow(platform.name, link, size, prompt, best, mode, rivals)


def overlap_study(platforms: tuple[OverlapPlatform, ...] = OVERLAP_PLATFORMS) -> list[OverlapRow]:
    """Prefill TTFT, batch 1, fp16, of the Kraken paper's sizes at OVERLAP_PROMPTS on each platform and
    link speed: the best system-overlapped standard TP vs parallel, ladder and Kraken (degree 8; on 16
    chips each Kraken sub-layer is sharded over 2 chips of a node and the exchange crosses nodes); sizes
    whose heads do not split over the chips are left out."""
    rows = []
    for platform in platforms:
        base = load_hardware(platform.hardware)
        for link in platform.links_gbs:
            hw = base.with_factors(**{platform.link_field: link * 1e9})
            cells = [_overlap_row(platform, hw, link, size, prompt) for prompt in OVERLAP_PROMPTS
                     for size in KRAKEN_SIZES]
            rows += [r for r in cells if r is not None]
    return rows


def _short(mode: str) -> str:
    return {"none": "none", "collective-matmul": "cm"}.get(mode, mode.replace("chunked:", "c"))


def overlap_markdown(rows: list[OverlapRow] | None = None) -> str:
    """Per platform, link and prompt: the winning standard overlap per size and each rival's geometric-mean
    speedup over the best overlapped standard TP, with the sizes Kraken wins."""
    rows = rows or overlap_study()
    lines = ["| platform | link GB/s | prompt | best standard overlap per size | "
             + " | ".join(RIVALS) + " | Kraken wins |", "|---|---:|---:|---|" + "---:|" * (len(RIVALS) + 1)]
    groups: dict[tuple[str, float, int], list[OverlapRow]] = {}
    for r in rows:
        groups.setdefault((r.platform, r.link_gbs, r.prompt), []).append(r)
    for (platform, link, prompt), group in groups.items():
        means = []
        for arch in RIVALS:
            ups = [v for r in group if (v := r.speedup(arch)) is not None]
            means.append(f"{geomean(ups):.2f}x" if ups else "n/a")
        wins = [r for r in group if (v := r.speedup("kraken")) is not None and v > 1]
        valid = [r for r in group if r.rivals["kraken"] is not None]
        modes = ", ".join(f"{r.size} {_short(r.mode)}" for r in group)
        lines.append(f"| {platform} | {link:g} | {prompt} | {modes} | "
                     + " | ".join(means) + f" | {len(wins)}/{len(valid)} |")
    return "\n".join(lines)


def overlap_grid_markdown(rows: list[OverlapRow] | None = None) -> str:
    """Kraken's speedup over the best overlapped standard TP per size and prompt, at each platform's own link."""
    rows = rows or overlap_study()
    nominal = {p.name: p.links_gbs[0] for p in OVERLAP_PLATFORMS}
    lines = ["| platform | size | " + " | ".join(f"T={p}" for p in OVERLAP_PROMPTS) + " |",
             "|---|---|" + "---:|" * len(OVERLAP_PROMPTS)]
    by = {(r.platform, r.size, r.prompt): r for r in rows if r.link_gbs == nominal[r.platform]}
    for platform in nominal:
        for size in KRAKEN_SIZES:
            cells = [r.speedup("kraken") if (r := by.get((platform, size, p))) else None for p in OVERLAP_PROMPTS]
            lines.append(f"| {platform} | {size} | " + " | ".join("n/a" if v is None else f"{v:.2f}x" for v in cells)
                         + " |")
    return "\n".join(lines)


SERVING_RATES = (5, 20, 40, 80)


def serving_markdown(hw: Hardware | None = None, size: str = "6.7b") -> str:
    """The simulator at rising request rates: standard TP vs Kraken-8 on one 8 x A100 node, fp16, Poisson
    arrivals (seed 0, 200 requests), prompts 256-1024 and outputs 32-128 tokens (uniform), max_batch 16."""
    hw = hw or load_hardware("a100-40gb-nvswitch")
    lines = ["| model | rate req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | throughput req/s "
             "| mean decode batch |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in (f"gpt-{size}", f"kraken8-{size}"):
        config = get_preset(name)
        times = CostModelTimes(config, hw, 8, dtype="fp16")
        for rate in SERVING_RATES:
            load = arrivals("poisson", rate, 200, Lengths(256, 1024), Lengths(32, 128), seed=0)
            sim = simulate(load, BatchingPolicy(max_batch=16, max_tokens=16 * 1152), config.block_size, times,
                           rate=rate)
            r = sim.report
            lines.append(f"| {name} | {rate} | {r['ttft_s']['p50'] * 1e3:.1f} | {r['ttft_s']['p99'] * 1e3:.1f} | "
                         f"{r['tpot_s']['p50'] * 1e3:.2f} | {r['tpot_s']['p99'] * 1e3:.2f} | "
                         f"{r['throughput_rps']:.1f} | {sim.mean_decode_batch:.1f} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class HeldOut:
    """A fit to one part of the records scored on the rest, which it never saw."""

    name: str
    fit: Calibration
    rows: list[dict]


@dataclass(frozen=True)
class CpuCalibration:
    """This machine's calibration: ``fit`` is cpu-gloo-nominal fitted to the merged records
    (bench-124m-t512.json; the bundled cpu-gloo spec), ``loo`` each of its points predicted by a fit
    without it, ``held_out`` fits to part of the data predicting another part."""

    fit: Calibration
    loo: list[dict]
    held_out: list[HeldOut]

    def fit_markdown(self) -> str:
        """Per point: measured, fitted and leave-one-out ms, then the medians and fitted factors."""
        return (markdown(self.fit.rows, self.loo, "leave-one-out") + "\n\n"
                + f"Median |error|: {self.fit.mdape_after:.1f}% in-sample (the nominal spec before fitting: "
                  f"{self.fit.mdape_before:.1f}%), {mdape(self.loo):.1f}% leave-one-out; held out: "
                + "; ".join(f"{h.name} {mdape(h.rows):.1f}%" for h in self.held_out)
                + f". Fitted: {self.fit.factors()}.")

    def held_out_markdown(self) -> str:
        """One table per held-out split."""
        return "\n\n".join(f"Held out, {h.name} (in-sample {h.fit.mdape_after:.1f}%, held out "
                             f"{mdape(h.rows):.1f}%):\n\n{markdown(h.rows)}" for h in self.held_out)


def cpu_calibration(results: Path = RESULTS) -> CpuCalibration:
    """Fit and validate the cpu-gloo spec on the shipped records (records of cells without a clean round
    dropped). Held out: (1) the loopback run (run2) predicting run1's 1 Gbit/s cells, comm_eff left at 1
    since loopback alone cannot tell link bandwidth from link efficiency; (2) gpt and parallel points
    predicting every Kraken point."""
    nominal = load_hardware("cpu-gloo-nominal")
    merged = load_records(results / "bench-124m-t512.json", clean_only=True)
    loopback = load_records(results / "bench-124m-t512-run2-loopback.json", clean_only=True)
    shaped = [r for r in load_records(results / "bench-124m-t512-run1.json", clean_only=True) if r["link_gbps"]]
    held = []
    for name, train, test, fields in (
            ("fitted to the loopback run, predicting the 1 Gbit/s cells", loopback, shaped,
             tuple(f for f in FIT_FIELDS if f != "comm_eff")),
            ("fitted to gpt and parallel, predicting Kraken", [r for r in merged if r["arch"] != "kraken"],
             [r for r in merged if r["arch"] == "kraken"], FIT_FIELDS)):
        fit = calibrate(nominal, train, fields=fields)
        held.append(HeldOut(name, fit, evaluate(fit.hardware, test)))
    return CpuCalibration(calibrate(nominal, merged, fields=FIT_FIELDS),
                          leave_one_out(nominal, merged, fields=FIT_FIELDS), held)


def doc_blocks(cpu: CpuCalibration | None = None) -> dict[str, str]:
    """Every generated table, by the marker name that delimits it in docs/costmodel.md and README.md
    (``cpu``: an already computed cpu_calibration())."""
    cpu, rows, overlap = cpu or cpu_calibration(), kraken_study(), overlap_study()
    return {"table1": table1_markdown(), "table2": table2_markdown(), "crossover": crossover_markdown(),
            "switch-points": switch_points_markdown(), "param-counts": param_counts_markdown(),
            "tpu-table2-fit": table2_fit_markdown(),
            "kraken-study": kraken_study_markdown(rows), "kraken-grid": kraken_speedup_grid_markdown(rows),
            "cluster-kraken": cluster_markdown(), "overlap-study": overlap_markdown(overlap),
            "overlap-grid": overlap_grid_markdown(overlap), "pipeline": pipeline_markdown(),
            "serving": serving_markdown(),
            "cpu-fit": cpu.fit_markdown(), "cpu-held-out": cpu.held_out_markdown()}


def fill_blocks(text: str, blocks: dict[str, str]) -> str:
    """``text`` with everything between ``<!-- costmodel:NAME -->`` and ``<!-- /costmodel:NAME -->``
    replaced by ``blocks[NAME]`` (text outside the markers is never touched)."""
    for name, body in blocks.items():
        tag = re.escape(name)
        pattern = re.compile(rf"(<!-- costmodel:{tag} -->\n)(?:.*?\n)?(<!-- /costmodel:{tag} -->)", re.DOTALL)
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Print the generated tables, or (--write) refresh them inside docs/costmodel.md and README.md."""
    parser = argparse.ArgumentParser(prog="python -m krakenlm.costmodel.studies", description=main.__doc__)
    parser.add_argument("--write", action="store_true", help="update the marked blocks of the docs in place")
    args = parser.parse_args(argv)
    blocks = doc_blocks()
    if not args.write:
        print("\n\n".join(f"<!-- costmodel:{k} -->\n{v}\n<!-- /costmodel:{k} -->" for k, v in blocks.items()))
        return 0
    for path in DOCS:
        text = path.read_text()
        new = fill_blocks(text, blocks)
        if new != text:
            path.write_text(new)
            print(f"updated {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
