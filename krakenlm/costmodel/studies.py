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
    comm_elements,
    continuous_ws_elements,
    make_mesh,
    pair_ops,
    switch_points,
)
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
    cpu, rows = cpu or cpu_calibration(), kraken_study()
    return {"table1": table1_markdown(), "table2": table2_markdown(), "crossover": crossover_markdown(),
            "switch-points": switch_points_markdown(), "param-counts": param_counts_markdown(),
            "tpu-table2-fit": table2_fit_markdown(),
            "kraken-study": kraken_study_markdown(rows), "kraken-grid": kraken_speedup_grid_markdown(rows),
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
