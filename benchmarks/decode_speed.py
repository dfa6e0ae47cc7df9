"""Single-device decode speed against this machine's floor and against transformers' GPT-2 `generate`.

The floor of one decode step is the bytes it must read (every weight once: the layers, the final
norm and the tied LM head, i.e. the whole token embedding; plus the KV cache at the current
context) divided by the read bandwidth one core measures streaming a buffer of those same bytes
again and again (a sum), as a decode step re-reads its weights every token: where they fit a large
last-level cache (a 480 MiB L3 holds GPT-2 124M in bf16) that is the cache's bandwidth, not DRAM's.
The 1 GiB figure (DRAM) is printed beside it. Everything runs on one thread, interleaved
round-robin in one process, so machine noise hits all variants alike; figures are medians and
per-round paired ratios, and the last lines are each dtype's step / floor for eager and compiled.

Variants: krakenlm eager, krakenlm compiled (torch.compile of the decode step), and (unless
--steps-only) transformers' GPT2LMHeadModel.generate with the same weights (greedy, 32 new tokens
forced) and Kraken 125M 2-way on one device beside GPT-2 124M.

    flock -x /tmp/krakenlm-timing.lock python benchmarks/decode_speed.py [--rounds 5] [--steps-only] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from krakenlm.checkpoint import export_hf_gpt2
from krakenlm.engine import Engine, EngineOptions
from krakenlm.machine import cpu_model
from krakenlm.source import ModelSource

PROMPT, NEW = 128, 32


def read_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes per second one thread streams from a buffer of ``nbytes`` (the best of a few sums after one
    that brings it into whatever cache holds it)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = min(_seconds(x.sum) for _ in range(repeats))
    return x.numel() * 4 / best


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_bytes(engine: Engine, context: int) -> int:
    """Bytes one decode step must read: every weight except the unused position rows, plus the KV cache."""
    model, cfg = engine.model, engine.config
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if name != "wpe.weight")
    weights += cfg.n_embd * model.wte.weight.element_size()  # one position row
    kv = 2 * cfg.n_layer * cfg.n_sub * cfg.kv_heads * cfg.head_size * context * model.wte.weight.element_size()
    return weights + kv


def decode_ms(engine: Engine, prompt: list[int]) -> float:
    """Milliseconds per decode step of a 128 + 32 generation (the engine's own timing, device-synchronized)."""
    result = engine.generate([prompt], NEW)
    return result.decode_seconds / result.decode_steps * 1e3


def hf_model(engine: Engine, directory: str) -> Callable[[list[int]], object]:
    from transformers import GPT2LMHeadModel

    export_hf_gpt2(directory, engine.model)
    model = GPT2LMHeadModel.from_pretrained(directory, dtype=engine.dtype).eval()

    def run(prompt: list[int]) -> object:
        with torch.inference_mode():
            return model.generate(torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                  pad_token_id=0)
    return run


def measure(dtype: str, rounds: int, steps_only: bool) -> dict[str, object]:
    torch.manual_seed(0)
    gpt = Engine(ModelSource(preset="gpt2-124m"), EngineOptions(device="cpu", dtype=dtype, threads=1))
    prompt = torch.randint(0, 50257, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    compiled = gpt.variant(compile=True)
    runs: dict[str, Callable[[], float]] = {"gpt eager": lambda: decode_ms(gpt, prompt),
                                            "gpt compiled": lambda: decode_ms(compiled, prompt)}
    with tempfile.TemporaryDirectory() as tmp:
        if not steps_only:
            kraken = Engine(ModelSource(preset="kraken-125m-2way"), EngineOptions(device="cpu", dtype=dtype, threads=1))
            hf = hf_model(gpt, tmp)
            runs |= {"kraken eager": lambda: decode_ms(kraken, prompt),
                     "gpt eager e2e": lambda: _seconds(lambda: gpt.generate([prompt], NEW)) * 1e3,
                     "gpt compiled e2e": lambda: _seconds(lambda: compiled.generate([prompt], NEW)) * 1e3,
                     "hf generate e2e": lambda: _seconds(lambda: hf(prompt)) * 1e3}
        for run in runs.values():  # warm-up (and compilation)
            run()
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(rounds):
            names = list(runs)
            for name in names[r % len(names):] + names[:r % len(names)]:
                samples[name].append(runs[name]())
    nbytes = step_bytes(gpt, PROMPT + NEW // 2)
    bandwidth = {"step-sized buffer": read_bandwidth(nbytes), "1 GiB": read_bandwidth(2**30)}
    floor_ms = nbytes / bandwidth["step-sized buffer"] * 1e3
    med = {name: statistics.median(s) for name, s in samples.items()}

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))

    ratios = {"gpt eager / floor": med["gpt eager"] / floor_ms, "gpt compiled / floor": med["gpt compiled"] / floor_ms,
              "gpt compiled / eager": paired("gpt compiled", "gpt eager")}
    if not steps_only:
        ratios |= {"kraken eager / gpt eager": paired("kraken eager", "gpt eager"),
                   "ours eager e2e / hf": paired("gpt eager e2e", "hf generate e2e"),
                   "ours compiled e2e / hf": paired("gpt compiled e2e", "hf generate e2e")}
    return {"dtype": dtype, "choices": str(compiled.choices), "median_ms": med, "floor_ms": floor_ms,
            "step_bytes": nbytes, "read_bandwidth_gb_s": {k: v / 1e9 for k, v in bandwidth.items()}, "ratios": ratios,
            "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--steps-only", action="store_true", help="only krakenlm's eager and compiled decode steps")
    parser.add_argument("--out", help="write the results JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"cpu": cpu_model(), "torch": torch.__version__, "prompt": PROMPT, "new_tokens": NEW,
               "runs": [measure(d, args.rounds, args.steps_only) for d in args.dtypes.split(",")]}
    for run in results["runs"]:
        bandwidth = ", ".join(f"{k} {v:.1f} GB/s" for k, v in run["read_bandwidth_gb_s"].items())
        print(f"\n{results['cpu']}, {run['dtype']}, 1 thread: floor {run['floor_ms']:.2f} ms/token "
              f"({run['step_bytes'] / 1e6:.0f} MB per step; read bandwidth {bandwidth})")
        for name, value in run["median_ms"].items():
            print(f"  {name:<22} {value:9.2f} ms")
        for name, value in run["ratios"].items():
            print(f"  {name:<28} {value:6.3f}")
    print(f"\n{results['cpu']}: decode step / floor")
    for run in results["runs"]:
        r = run["ratios"]
        print(f"  {run['dtype']:<5} eager {r['gpt eager / floor']:.2f}x, compiled {r['gpt compiled / floor']:.2f}x "
              f"({run['choices']})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
