"""Quality at equal parameters and equal tokens: the four architectures (mini-gpt, mini-parallel,
mini-kraken-2way / -4way, mini-ladder) on the Shakespeare plays (GPT-2 BPE), same windows in the same
order, same schedule.

Writes val-loss curves of every run into one PNG and one JSON and prints a Markdown table (the runs'
own directories keep their metrics.jsonl, loss.png and checkpoints). Finished runs are resumed, not
redone, so models can be trained one per invocation (``--models``) and tabulated together at the end.

    python benchmarks/train_quality.py [--tokens 600000] [--out runs/train_quality] [--models a,b]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from krakenlm.data import META_FILE, prepare
from krakenlm.presets import get_preset
from krakenlm.train.trainer import METRICS_FILE, TrainConfig, plot_losses, read_metrics, train

MODELS = ("mini-gpt", "mini-parallel", "mini-kraken-2way", "mini-kraken-4way", "mini-ladder")
BASELINE = "mini-gpt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=600_000, help="training tokens per model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--evals", type=int, default=10, help="val evaluations per run")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--data", default="runs/data/shakespeare-gpt2")
    parser.add_argument("--out", default="runs/train_quality")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()

    if not (Path(args.data) / META_FILE).exists():
        prepare(args.data, tokenizer="gpt2", val_fraction=0.1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = max(1, args.tokens // (args.batch * args.block))
    base = TrainConfig(data=args.data, steps=steps, lr=args.lr, warmup_steps=max(1, steps // 10),
                       batch_size=args.batch, block_size=args.block, dtype=args.dtype, seed=0,
                       eval_interval=max(1, steps // args.evals), eval_windows=args.eval_windows,
                       checkpoint_interval=steps, keep_checkpoints=1)
    summary: dict[str, dict] = {}
    curves: dict[str, list[dict]] = {}
    for name in args.models.split(","):
        config = get_preset(name)
        run_dir = out / name
        start = time.perf_counter()
        result = train(base.replace(out=str(run_dir)), config, resume=True)  # resume: rerun finishes a killed one
        seconds = _add_wall(run_dir, time.perf_counter() - start)
        curves[name] = read_metrics(run_dir / METRICS_FILE)
        speeds = [r["tokens_per_s"] for r in curves[name]]
        final = [r for r in curves[name] if "val_loss" in r][-1]["val_loss"]
        summary[name] = {"params": config.num_params(), "arch": config.arch, "n_sub": config.n_sub,
                         "steps": result.step, "tokens": result.step * args.batch * args.block,
                         "final_val_loss": final, "final_val_ppl": math.exp(final),
                         "median_tokens_per_s": sorted(speeds)[len(speeds) // 2], "wall_seconds": seconds,
                         "val_curve": [[r["tokens"], r["val_loss"]] for r in curves[name] if "val_loss" in r]}
        print(f"{name}: {config.num_params() / 1e6:.2f}M params, val loss {final:.4f} (ppl {math.exp(final):.1f}) "
              f"after {summary[name]['tokens']:,} tokens, {seconds:.0f} s")
    meta = {"train": base.to_dict(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    (out / "quality.json").write_text(json.dumps({"config": meta, "models": summary}, indent=2))
    millions = steps * args.batch * args.block / 1e6
    plot_losses(curves, out / "quality.png", f"Shakespeare, GPT-2 BPE, {millions:.2f}M tokens, equal params",
                x="tokens")
    print(table(summary))
    print(f"wrote {out / 'quality.json'} and {out / 'quality.png'}")


def _add_wall(run_dir: Path, seconds: float) -> float:
    """Wall seconds of a run summed over the invocations that trained it (a finished run adds ~0)."""
    file = run_dir / "wall.json"
    total = (json.loads(file.read_text())["seconds"] if file.exists() else 0.0) + seconds
    file.write_text(json.dumps({"seconds": total}))
    return total


def table(summary: dict[str, dict]) -> str:
    """The runs as a Markdown table, val loss relative to the gpt baseline when it ran."""
    base = summary.get(BASELINE, {}).get("final_val_loss")
    lines = ["| model | arch | params | val loss | vs gpt | val ppl | tokens/s | wall |", "|---" * 8 + "|"]
    for name, s in summary.items():
        rel = f"{(s['final_val_loss'] / base - 1) * 100:+.2f}%" if base and name != BASELINE else "-"
        lines.append(f"| {name} | {s['arch']} | {s['params'] / 1e6:.2f}M | {s['final_val_loss']:.4f} | {rel} | "
                     f"{s['final_val_ppl']:.1f} | {s['median_tokens_per_s']:.0f} | {s['wall_seconds']:.0f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
