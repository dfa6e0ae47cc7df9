"""Pope's layouts on this CPU: measured prefill and decode times against the cost model's prediction,
and int8 vs bf16 decode per token (one device and 2 ranks).

Runs `krakenlm bench` with the layouts and int8 as variants (2 gloo ranks, loopback), then:
- refits the cpu-gloo spec (krakenlm.costmodel.calibrate) on this run's Megatron / Kraken / one-device
  records only, and predicts every layout and int8 variant with it (held out: none of them is fitted);
- reports the committed cpu-gloo spec's predictions as they are, too;
- prints per layout and phase: measured ms, predicted ms, error; and the median |error|.

    flock -x /tmp/krakenlm-timing.lock python benchmarks/layouts_vs_costmodel.py [--out docs/results/layouts-cpu.json]
    python benchmarks/layouts_vs_costmodel.py --from docs/results/layouts-cpu.json   # tables only
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from krakenlm.bench import results
from krakenlm.bench.sweep import Options, run_sweep
from krakenlm.costmodel.calibrate import FIT_FIELDS, calibrate, evaluate
from krakenlm.costmodel.hardware import load_hardware
from krakenlm.machine import cpu_model

LAYOUTS = ["1d-ws/attn-batch", "2d-ws/attn-heads", "2d-ws/attn-batch", "wg-xy/attn-batch,2d-ws/attn-batch",
           "wg-xy/attn-batch,1d-ws/attn-batch"]


def measure(args: argparse.Namespace) -> dict:
    opts = replace(Options(), shapes=[args.shape], prompts=[args.prompt], batches=[args.batch], dtypes=args.dtypes,
                   tps=[2], links=[None], rounds=args.rounds, max_rounds=3 * args.rounds, decode_steps=16,
                   peer=False, breakdown=False, layouts=LAYOUTS, int8=True, max_other_cores=0.5)
    sweep = run_sweep(opts, progress=lambda m: print(m, flush=True))
    return results.build(opts, sweep, ["benchmarks/layouts_vs_costmodel.py"]) | {"cpu": cpu_model()}


def compare(data: dict) -> dict:
    """Held-out predictions of the layout records by a spec fitted to the other records."""
    records = results.records(data["cells"], data["options"]["decode_steps"])
    held = [r for r in records if r.get("variant")]  # the layouts and int8
    train = [r for r in records if not r.get("variant")]
    fit = calibrate(load_hardware("cpu-gloo-nominal"), train, fields=FIT_FIELDS)
    rows = []
    for rec, refit, committed in zip(held, evaluate(fit.hardware, held), evaluate(load_hardware("cpu-gloo"), held),
                                     strict=True):
        rows.append({"layout": rec["variant"], "phase": rec["phase"], "dtype": rec["dtype"],
                     "measured_ms": rec["seconds"] * 1e3, "predicted_ms": refit["predicted"] * 1e3,
                     "error_pct": refit["error_pct"], "committed_spec_ms": committed["predicted"] * 1e3,
                     "committed_error_pct": committed["error_pct"]})
    return {"rows": rows, "fit": fit.fitted, "fit_mdape": fit.mdape_after,
            "mdape": statistics.median(abs(r["error_pct"]) for r in rows),
            "committed_mdape": statistics.median(abs(r["committed_error_pct"]) for r in rows)}


def int8_ratios(data: dict) -> list[dict]:
    """Decode per token, int8 over the same model in bf16 (paired rounds), one device and 2 ranks."""
    out = []
    for cell in data["cells"]:
        if cell["dtype"] != "bf16":
            continue
        for name, a, b in (("one device", "gpt/single-int8", "gpt/single"), ("2 ranks", "gpt/int8", "gpt")):
            va, vb = cell["variants"][a]["decode"], cell["variants"][b]["decode"]
            ratios = [x / y for x, y in zip(va["samples"], vb["samples"], strict=True)]
            out.append({"where": name, "int8_ms": va["median"] * 1e3, "bf16_ms": vb["median"] * 1e3,
                        "ratio": statistics.median(ratios)})
    return out


def markdown(cmp: dict, int8: list[dict], cpu: str) -> str:
    lines = ["| layout | phase | dtype | measured ms | predicted ms | error | committed spec ms | error |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in cmp["rows"]:
        lines.append(f"| {r['layout']} | {r['phase']} | {r['dtype']} | {r['measured_ms']:.2f} | "
                     f"{r['predicted_ms']:.2f} | {r['error_pct']:+.1f}% | {r['committed_spec_ms']:.2f} | "
                     f"{r['committed_error_pct']:+.1f}% |")
    lines.append(f"| median \\|error\\| | | | | | {cmp['mdape']:.1f}% | | {cmp['committed_mdape']:.1f}% |")
    lines += ["", f"CPU: {cpu}. Refit on the run's Megatron / Kraken / one-device points (median |error| "
              f"{cmp['fit_mdape']:.1f}% on them); no layout or int8 point was fitted.", "",
              "| int8 vs bf16 decode | int8 ms/step | bf16 ms/step | int8 / bf16 (paired) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['where']} | {r['int8_ms']:.2f} | {r['bf16_ms']:.2f} | {r['ratio']:.2f} |" for r in int8]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="124m")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="divisible by 2: weight-gathered prefills shard it")
    parser.add_argument("--dtypes", type=lambda t: t.split(","), default=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("layouts-cpu.json"))
    parser.add_argument("--from", dest="source", type=Path, help="tables from an earlier run's JSON")
    args = parser.parse_args()
    data = json.loads(args.source.read_text()) if args.source else measure(args)
    cmp, int8 = compare(data), int8_ratios(data)
    if not args.source:
        args.out.write_text(json.dumps(data | {"comparison": cmp, "int8": int8}, indent=1))
        print(f"wrote {args.out}")
    print(markdown(cmp, int8, data.get("cpu", "?")))


if __name__ == "__main__":
    main()
