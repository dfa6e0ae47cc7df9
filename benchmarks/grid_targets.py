"""Issue 17's machine-independent targets, evaluated on a `krakenlm bench` result (one sweep or a merge).

Each target is a paired ratio from one cell; every cell that measures it is listed with its value,
whether it is met, and for a miss the categories of the bench's profiled forward that make it up:

- compute: (Kraken no-comm / standard no-comm) / their FLOP ratio <= 1.05, at T=512 and 2048, per dtype;
  a miss is split into Kraken's time per category minus FLOP ratio x standard's (breakdown, ms);
- limit: no-comm prefill >= 60% of the GEMM throughput measured at the model's shapes, T=512, gpt and
  Kraken; a miss lists each category's time over its FLOP floor (attention and GEMM at the peak);
- overlap: Kraken / its no-comm ceiling <= 1.03 over 1 Gbit/s; a miss is split into the AllReduce
  still exposed and the GEMMs slowed while the exchange is in flight (GEMM + overlapped GEMM minus
  the blocking variant's GEMM);
- TTFT: Kraken / standard <= 0.60 over 1 Gbit/s and <= 0.90 on loopback, 124M T=512.

    python benchmarks/grid_targets.py docs/results/bench-grid.json [--markdown]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from krakenlm.bench.results import mfu, per_flop, ratio

Cell = dict[str, Any]


@dataclass(frozen=True)
class Target:
    name: str
    limit: float
    at_most: bool  # met when value <= limit (else >= limit)
    applies: Callable[[Cell], bool]
    value: Callable[[Cell], float | None]
    why: Callable[[Cell], str]

    def met(self, value: float) -> bool:
        return value <= self.limit if self.at_most else value >= self.limit


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:+.0f}"


def _gemm(breakdown: dict[str, float]) -> float:
    """All GEMM time of a profiled forward, overlapped with an exchange or not."""
    return breakdown.get("GEMM", 0) + breakdown.get("overlapped GEMM", 0)


def _compute_why(cell: Cell) -> str:
    kraken, gpt = cell.get("breakdown", {}).get("kraken"), cell.get("breakdown", {}).get("gpt")
    flops = cell.get("flop_ratio", {}).get("kraken/gpt")
    if not (kraken and gpt and flops):
        return "no breakdown"
    excess = {"GEMM": _gemm(kraken) - flops * _gemm(gpt)}
    excess |= {c: kraken.get(c, 0) - flops * gpt.get(c, 0) for c in ("attention", "norm", "other")}
    return "Kraken minus FLOP ratio x standard, ms: " + ", ".join(f"{c} {_ms(s)}" for c, s in excess.items())


def _limit_why(arch: str) -> Callable[[Cell], str]:
    def why(cell: Cell) -> str:
        roof = cell.get("roofline", {}).get(arch)
        if not roof or "category" not in roof:
            return "no breakdown"
        peak, cats = roof["peak_gemm_flops_per_s"], roof["category"]
        over = {c: cats[c]["seconds"] - roof["flops"][c] / peak for c in ("GEMM", "attention")}
        over |= {c: cats[c]["seconds"] for c in ("norm", "other")}
        return (f"floor {roof['floor_s'] * 1e3:.0f} ms; over it, ms: "
                + ", ".join(f"{c} {_ms(s)}" for c, s in sorted(over.items(), key=lambda kv: -kv[1])))
    return why


def _overlap_why(cell: Cell) -> str:
    kraken, blocking = cell.get("breakdown", {}).get("kraken"), cell.get("breakdown", {}).get("kraken/blocking")
    if not (kraken and blocking):
        return "no breakdown"
    slowed = _gemm(kraken) - _gemm(blocking)
    return f"exposed AllReduce {kraken.get('AllReduce', 0) * 1e3:.0f} ms, GEMMs slowed in flight {_ms(slowed)} ms"


def _ttft_why(cell: Cell) -> str:
    nc = ratio(cell, "kraken-nc/gpt-nc")
    gpt_comm, kraken_comm = ratio(cell, "gpt/no-comm"), ratio(cell, "kraken/no-comm")
    return (f"no-comm Kraken/std {nc:.3f}; std / its no-comm {gpt_comm:.3f}, Kraken / its no-comm "
            f"{kraken_comm:.3f}") if nc and gpt_comm and kraken_comm else "-"


def _at(prompts: tuple[int, ...], link: str = "any", shape: str | None = None,
        batch: int | None = 1) -> Callable[[Cell], bool]:
    def applies(c: Cell) -> bool:
        links = {"any": True, "loopback": c["link_gbps"] is None, "1": c["link_gbps"] == 1.0}
        return (c["prompt_len"] in prompts and links[link] and (shape is None or c["shape"] == shape)
                and (batch is None or c["batch"] == batch))
    return applies


TARGETS = [
    Target("compute: no-comm Kraken/std per FLOP", 1.05, True, _at((512, 2048)), per_flop, _compute_why),
    Target("limit: gpt MFU", 0.60, False, _at((512,)), lambda c: mfu(c, "gpt"), _limit_why("gpt")),
    Target("limit: Kraken MFU", 0.60, False, _at((512,)), lambda c: mfu(c, "kraken"), _limit_why("kraken")),
    Target("overlap: Kraken / its no-comm, 1 Gbit/s", 1.03, True, _at((128, 512, 1024, 2048), "1", batch=None),
           lambda c: ratio(c, "kraken/no-comm"), _overlap_why),
    Target("TTFT Kraken/std, 1 Gbit/s, 124M T=512", 0.60, True, _at((512,), "1", "124m"),
           lambda c: ratio(c, "kraken/gpt"), _ttft_why),
    Target("TTFT Kraken/std, loopback, 124M T=512", 0.90, True, _at((512,), "loopback", "124m"),
           lambda c: ratio(c, "kraken/gpt"), _ttft_why),
]


def evaluate(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (target, cell that measures it)."""
    rows = []
    for target in TARGETS:
        for cell in result["cells"]:
            value = target.value(cell) if target.applies(cell) else None
            if value is None:
                continue
            link = "loopback" if cell["link_gbps"] is None else f"{cell['link_gbps']:g} Gbit/s"
            met = target.met(value)
            rows.append({"target": f"{target.name} {'<=' if target.at_most else '>='} {target.limit:g}",
                         "cell": f"{cell['shape']} T={cell['prompt_len']} B={cell['batch']} {cell['dtype']} {link}",
                         "value": value, "met": met, "why": "" if met else target.why(cell)})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | cell | value | met | behind a miss |", "|---|---|---|---|---|"]
    lines += [f"| {r['target']} | {r['cell']} | {r['value']:.3f} | {'yes' if r['met'] else 'no'} | {r['why']} |"
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="bench.json of `krakenlm bench` (or a merge)")
    parser.add_argument("--json", action="store_true", help="rows as JSON instead of a Markdown table")
    args = parser.parse_args()
    rows = evaluate(json.loads(args.result.read_text()))
    print(json.dumps(rows, indent=1) if args.json else markdown(rows))
    for name in dict.fromkeys(r["target"] for r in rows):
        mine = [r for r in rows if r["target"] == name]
        print(f"{name}: met in {sum(r['met'] for r in mine)} of {len(mine)} cells")


if __name__ == "__main__":
    main()
