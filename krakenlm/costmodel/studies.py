"""Reproductions of published numbers: Pope et al. Tables 1-2, the layout switch points, and the
Kraken paper's A100 TTFT study (20 configurations). Tests and docs/costmodel.md use these."""

from __future__ import annotations

import math
from dataclasses import dataclass

from krakenlm.config import ModelConfig
from krakenlm.costmodel.estimator import Workload, estimate, max_context
from krakenlm.costmodel.hardware import Hardware, load_hardware
from krakenlm.costmodel.layouts import MatPair, make_mesh, switch_points
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

    ``phase="decode"`` gives the per-token decode latency after the prompt instead (not studied in
    the paper)."""
    hw = hw or load_hardware("a100-40gb-nvswitch")
    rows = []
    for size in KRAKEN_SIZES:
        for prompt in (128, 2048):
            for tp in (4, 8):
                wl = Workload(batch=1, prompt=prompt, generate=0 if phase == "prefill" else 1, dtype=dtype)
                ests = [estimate(get_preset(f"{a}-{size}"), hw, wl, tp) for a in ("gpt", "parallel", f"kraken{tp}")]
                rows.append(KrakenRow(size, prompt, tp, *(e.ttft_s if phase == "prefill" else e.per_token_s
                                                          for e in ests)))
    return rows


def geomean(values: list[float]) -> float:
    """Geometric mean, the paper's way of averaging speedups."""
    return math.exp(sum(math.log(v) for v in values) / len(values))


def table2_records() -> list[dict]:
    """Table 2's four latencies as calibration records (decode: seconds per step over 64 steps
    after a 1984-token prompt, so the context ends at 2048)."""
    base = {"arch": "parallel", "preset": "palm-540b", "tp": 64, "link_gbps": None}
    return [
        dict(base, batch=1, prompt_len=2048, dtype="int8", phase="prefill", seconds=0.29, layout="2d-ws/attn-heads"),
        dict(base, batch=64, prompt_len=1984, generate=64, dtype="int8", phase="decode", seconds=1.82 / 64,
             layout="2d-ws/attn-batch"),
        dict(base, batch=512, prompt_len=2048, dtype="bf16", phase="prefill", seconds=85.2, layout="wg-xyz/attn-batch"),
        dict(base, batch=512, prompt_len=1984, generate=64, dtype="bf16", phase="decode", seconds=6.0 / 64,
             layout="2d-ws/attn-batch"),
    ]
