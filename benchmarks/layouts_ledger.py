"""What each layout moves and holds per rank, measured (the engine's ledger) against the cost model.

One prefill (batch x prompt tokens) and one decode step per layout on --tp gloo ranks; prints per
layout the collectives of one layer (prefill), the layers' bytes per rank in prefill and decode
(measured / cost model), and the weights and KV cache per rank. Byte counts, not timings: no lock
beyond the shared one is needed. Run from the repository root:

    python benchmarks/layouts_ledger.py --preset gpt2-124m --tp 2
    python benchmarks/layouts_ledger.py --config cfg.json --tp 4 --layouts "2d-ws/attn-heads;2d-ws/attn-batch"
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from krakenlm.config import ModelConfig
from krakenlm.costmodel.layout_choice import runnable
from krakenlm.engine import Engine, EngineOptions
from krakenlm.layout import Layout
from krakenlm.parallel.launch import run_ranks
from krakenlm.parallel.ledger import predicted
from krakenlm.presets import get_preset
from krakenlm.source import ModelSource


def measure(payload: dict) -> int:
    """Rank program: every layout's ledger of one prefill and one decode step; rank 0 writes them."""
    config, world = ModelConfig.from_dict(payload["config"]), int(os.environ["WORLD_SIZE"])
    batch, prompt, out, engines = payload["batch"], payload["prompt"], {}, []
    for layout in payload["layouts"]:
        engine = Engine(ModelSource(config=config, seed=0),
                        EngineOptions(tp=world, device="cpu", dtype=payload["dtype"], layout=layout, threads=1))
        engines.append(engine)
        idx = torch.randint(0, 200, (batch, prompt), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            with engine.record() as pre:
                cache = engine.new_cache(batch, prompt + 1)
                engine.forward(idx, cache=cache, logits_at="last")
            slots = torch.full((batch,), prompt)
            with engine.record() as dec:
                engine.decode_step(idx[:, -1], slots, slots, cache)
        mine = {"prefill": pre.to_dict() | {"layer0": pre.per_layer(0)}, "decode": dec.to_dict()}
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        out[layout] = everyone
    if int(os.environ["RANK"]) == 0:
        Path(payload["out"]).write_text(json.dumps(out))
    engines[0].close()
    return 0


def row(config: ModelConfig, layout: str, tp: int, ranks: list[dict], batch: int, prompt: int, dtype: str) -> str:
    lay = Layout.parse(layout)
    pre, dec = ranks[0]["prefill"], ranks[0]["decode"]
    kinds = Counter(f"{k.replace('all_', 'A').replace('reduce_scatter', 'RS').replace('to_all', '2A')}"
                    for k, _, _ in pre["layer0"])
    per_layer = " + ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    cost = {p: predicted(config, str(lay.phase(p)), tp, batch, prompt, p, dtype, cache_len=prompt + 1)
            for p in ("prefill", "decode")}
    mib = 2 ** 20
    return (f"| {layout} | {per_layer} | {pre['layer_volume'] / mib:.2f} / {cost['prefill']['comm'] / mib:.2f} | "
            f"{dec['layer_volume'] / 1024:.1f} / {cost['decode']['comm'] / 1024:.1f} | "
            f"{pre['stats_volume'] / 1024:.1f} | "
            f"{pre['weights_bytes'] / mib:.1f} / {cost['decode']['weights'] / mib:.1f}"
            f" | {pre['kv_bytes'] / mib:.2f} / {cost['decode']['kv'] / mib:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset")
    src.add_argument("--config", type=Path)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--layouts", help="';'-separated (default: every layout this model runs on --tp ranks)")
    args = parser.parse_args()
    config = get_preset(args.preset) if args.preset else ModelConfig.from_json(args.config)
    layouts = args.layouts.split(";") if args.layouts else [str(x) for x in runnable(config, args.tp)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ledgers.json"
        payload = {"config": config.to_dict(), "layouts": layouts, "batch": args.batch, "prompt": args.prompt,
                   "dtype": args.dtype, "out": str(out)}
        if run_ranks("benchmarks.layouts_ledger:measure", args.tp, payload, grace=60) != 0:
            raise SystemExit("a rank failed")
        data = json.loads(out.read_text())
    print(f"{config.name or config.arch} on {args.tp} ranks, batch {args.batch} x {args.prompt} tokens, {args.dtype} "
          f"(per rank: measured / cost model; rank 0)")
    print("| layout | collectives per layer (prefill) | prefill MiB | decode KiB | norm stats KiB | weights MiB | "
          "KV MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for layout, ranks in data.items():
        print(row(config, layout, args.tp, ranks, args.batch, args.prompt, args.dtype))


if __name__ == "__main__":
    main()
