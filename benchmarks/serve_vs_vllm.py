"""krakenlm serve against vLLM on the same weights, and Kraken against GPT inside vLLM, all driven by vLLM's own
load generator (`vllm bench serve`: random token-id prompts, seeded, so every server gets the same load).

Each part starts its two servers side by side, then runs --rounds rounds; a round benchmarks both servers
(the order alternates) at every load of --rates with one seed (--one-at-a-time: each server alone, all its
rounds in a row). A load is a Poisson rate in requests/s, `inf` (every request at once: saturation, bounded
by --max-batch) or `single` (one request at a time: --single-prompts of them, the unloaded TTFT and TPOT).
The table gives, per load, each server's medians over rounds and the median of the per-round ratios A / B
(TTFT, TPOT, ITL, e2e at p50 / p99; output tokens/s).

- krakenlm-vs-vllm: `krakenlm serve` vs `vllm serve` (the vLLM plugin) on --model at --tp.
- kraken-vs-gpt: --model vs --gpt (same size) both in vLLM at --tp.
- overlap: --model in vLLM with the exchange async (torch.distributed, overlapped with the next attention)
  vs blocking (vLLM's own all-reduce: shared memory on CPU).

--compile compiles both sides: `krakenlm serve --compile` (the decode step) and vLLM without
`--enforce-eager` (its torch.compile'd graph); without it both run eagerly.

Models are exported for the plugin (`export_model(..., format="hf-krakenlm")`, GPT included, so both run
through the same plugin code inside vLLM); both runtimes pad heads to a multiple of 32 (vLLM's CPU kernel
needs it: Kraken 125M's head size is 113).

    flock -x /tmp/krakenlm-timing.lock python benchmarks/serve_vs_vllm.py --rates single,1,4,inf \
        --out docs/results/serve-vs-vllm.json
    python benchmarks/serve_vs_vllm.py --smoke      # tiny models, one round: checks the plumbing, no figures
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from krakenlm.bench.results import environment
from krakenlm.checkpoint import save_checkpoint
from krakenlm.config import ModelConfig
from krakenlm.interop.hf_export import export_model
from krakenlm.interop.vllm_process import VllmServer, vllm_env, vllm_venv
from krakenlm.serve.process import ServerProcess
from krakenlm.source import build_model

METRICS = [f"p{p}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for p in (50, 99)] + ["output_throughput"]
PARTS = ("krakenlm-vs-vllm", "kraken-vs-gpt", "overlap")
HEAD_MULTIPLE = 32
NAME = "model"  # the model id both servers answer to
Server = ServerProcess | VllmServer


def prepare(source: str, smoke: bool, root: Path) -> tuple[Path, Path]:
    """A native checkpoint and its export: a preset (random weights, seed 0), a checkpoint path, or with
    --smoke a tiny model of the preset's architecture."""
    if smoke:
        arch = "kraken" if "kraken" in source else "gpt"
        extra = {"n_sub": 2, "n_head": 2} if arch == "kraken" else {"n_head": 4}
        model = build_model(config=ModelConfig(arch=arch, n_layer=2, n_embd=64, vocab_size=50257, block_size=256,
                                               **extra))
    elif Path(source).exists():
        model = build_model(checkpoint=source)
    else:
        model = build_model(preset=source, seed=0)
    name = Path(source).name
    exported = export_model(model, root / name, format="hf-krakenlm", tokenizer="gpt2").path
    return save_checkpoint(root / f"{name}-native", model, model.config), exported


def krakenlm_server(native: Path, args: argparse.Namespace) -> ServerProcess:
    return ServerProcess(["--checkpoint", str(native), "--tp", str(args.tp), "--device", "cpu", "--dtype", "fp32",
                          "--max-batch", str(args.max_batch), "--model-name", NAME, "--pad-heads", str(HEAD_MULTIPLE)]
                         + (["--compile"] if args.compile else []))


def vllm_server(export: Path, args: argparse.Namespace, log: Path, overlap: bool = True) -> VllmServer:
    overrides = {"krakenlm_overlap": overlap, "krakenlm_head_multiple": HEAD_MULTIPLE}
    return VllmServer(export, ["--tensor-parallel-size", str(args.tp), "--dtype", "float32", "--max-model-len",
                               str(args.input_len + args.output_len + 16), "--max-num-seqs", str(args.max_batch),
                               "--served-model-name", NAME, "--hf-overrides", json.dumps(overrides)]
                      + ([] if args.compile else ["--enforce-eager"]),
                      log, timeout=600)


def load_flags(load: str, args: argparse.Namespace) -> list[str]:
    """`vllm bench serve` flags for one load of --rates."""
    if load == "single":
        return ["--num-prompts", str(args.single_prompts), "--request-rate", "inf", "--max-concurrency", "1"]
    return ["--num-prompts", str(args.num_prompts), "--request-rate", load]


def bench(url: str, tokenizer: Path, args: argparse.Namespace, load: str, seed: int, out: Path) -> dict[str, float]:
    """One `vllm bench serve` run against ``url`` at ``load``; its result JSON."""
    cmd = [str(vllm_venv() / "bin" / "vllm"), "bench", "serve", "--backend", "openai", "--base-url", url,
           "--endpoint", "/v1/completions", "--model", NAME, "--tokenizer", str(tokenizer), "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           *load_flags(load, args), "--seed", str(seed),
           "--num-warmups", str(args.warmups),
           "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--disable-tqdm", "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    subprocess.run(cmd, env=vllm_env(), check=True, stdout=subprocess.DEVNULL, timeout=args.bench_timeout)
    result = json.loads(out.read_text())
    if result["failed"]:
        raise RuntimeError(f"{url}: {result['failed']} requests failed at load {load}")
    return {m: result[m] for m in METRICS}


Runs = dict[str, dict[str, list[dict[str, float]]]]  # load -> server -> one result per round


def run_one(runs: Runs, url: str, name: str, tokenizer: Path, args: argparse.Namespace, load: str, r: int,
            tmp: Path) -> None:
    runs[load][name].append(bench(url, tokenizer, args, load, seed=r, out=tmp / f"{name}-{load}-{r}.json"))
    print(f"round {r + 1}/{args.rounds} load {load} {name}: TTFT p50 {runs[load][name][-1]['p50_ttft_ms']:.1f} ms, "
          f"TPOT p50 {runs[load][name][-1]['p50_tpot_ms']:.1f} ms", flush=True)


def interleaved(urls: dict[str, str], tokenizer: Path, args: argparse.Namespace, tmp: Path) -> Runs:
    """Servers up side by side; every round benchmarks each at every load (order alternating, same seed)."""
    runs: Runs = {load: {name: [] for name in urls} for load in args.rates}
    names = list(urls)
    for r in range(args.rounds):
        for load in args.rates:
            for name in names if r % 2 == 0 else names[::-1]:
                run_one(runs, urls[name], name, tokenizer, args, load, r, tmp)
    return runs


def servers(name: str, args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Callable[[], Server]], Path]:
    """The part's two servers (each started when called) and the tokenizer directory."""
    native, export = prepare(args.model, args.smoke, tmp)
    if name == "krakenlm-vs-vllm":
        return {"krakenlm": lambda: krakenlm_server(native, args),
                "vllm": lambda: vllm_server(export, args, tmp / "vllm.log")}, export
    if name == "kraken-vs-gpt":
        gpt = prepare(args.gpt, args.smoke, tmp)[1]
        return {"kraken": lambda: vllm_server(export, args, tmp / "kraken.log"),
                "gpt": lambda: vllm_server(gpt, args, tmp / "gpt.log")}, export
    return {"async": lambda: vllm_server(export, args, tmp / "async.log"),
            "blocking": lambda: vllm_server(export, args, tmp / "blocking.log", overlap=False)}, export


def part(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    """A part's rounds (servers side by side, or with --one-at-a-time each alone for all its rounds): each
    server's medians over rounds and the median of the paired ratios A / B."""
    starts, tokenizer = servers(name, args, tmp)
    if args.one_at_a_time:
        runs: Runs = {load: {server_name: [] for server_name in starts} for load in args.rates}
        for server_name, start in starts.items():
            with start() as server:
                for r in range(args.rounds):
                    for load in args.rates:
                        run_one(runs, server.url, server_name, tokenizer, args, load, r, tmp)
    else:
        with contextlib.ExitStack() as stack:
            urls = {server_name: stack.enter_context(start()).url for server_name, start in starts.items()}
            runs = interleaved(urls, tokenizer, args, tmp)
    return {"part": name, "servers": list(starts), "loads": {load: summary(by_server)
                                                             for load, by_server in runs.items()}}


def summary(runs: dict[str, list[dict[str, float]]]) -> dict:
    """Each server's medians over rounds and the median of the per-round ratios first / second."""
    pairs = list(zip(*runs.values(), strict=True))
    return {"runs": runs, "median": {n: {m: statistics.median(x[m] for x in runs[n]) for m in METRICS} for n in runs},
            "ratio": {m: statistics.median(x[m] / y[m] for x, y in pairs) for m in METRICS}}


def table(result: dict) -> str:
    a, b = result["servers"]
    lines = [f"### {result['part']}", "", f"| load | metric | {a} | {b} | {a} / {b} (median of paired ratios) |",
             "|---|---|---:|---:|---:|"]
    for load, s in result["loads"].items():
        lines += [f"| {load} | {m} | {s['median'][a][m]:.2f} | {s['median'][b][m]:.2f} | {s['ratio'][m]:.3f} |"
                  for m in METRICS]
    return "\n".join(lines)


def loads(text: str) -> list[str]:
    """--rates: comma-separated positive numbers, `inf` or `single`."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    for v in values:
        if v not in ("inf", "single") and not (v.replace(".", "", 1).isdigit() and float(v) > 0):
            raise argparse.ArgumentTypeError(f"{v!r} is not a positive rate, inf or single")
    if not values:
        raise argparse.ArgumentTypeError("no load given")
    return values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="kraken-125m-2way", help="preset or native checkpoint")
    p.add_argument("--gpt", default="gpt2-124m", help="the GPT of the same size (kraken-vs-gpt)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {PARTS}")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--rates", type=loads, default=["1"],
                   help="loads, comma-separated: requests/s (Poisson), inf (all at once) or single (one at a time)")
    p.add_argument("--single-prompts", type=int, default=8, help="requests of the `single` load")
    p.add_argument("--compile", action="store_true", help="krakenlm --compile and vLLM's compiled graph")
    p.add_argument("--warmups", type=int, default=2, help="untimed requests before each run (first-request costs)")
    p.add_argument("--max-batch", type=int, default=8, help="krakenlm --max-batch = vLLM --max-num-seqs")
    p.add_argument("--bench-timeout", type=float, default=1800.0, help="seconds one `vllm bench serve` may take")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="one server up at a time, all its rounds in a row (less memory; not interleaved)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny models, 1 round of 4 short requests, one server at a time (plumbing only)")
    p.add_argument("--out", type=Path, help="write the results as JSON")
    args = p.parse_args()
    if args.smoke:
        args.rounds, args.num_prompts, args.input_len, args.output_len, args.one_at_a_time = 1, 4, 16, 8, True
        args.single_prompts = 2
    started = environment()  # the commit the servers run (the tree may change while a long run goes on)
    results = []
    for name in args.parts.split(","):
        if name not in PARTS:
            p.error(f"--parts: unknown part {name!r}; known: {', '.join(PARTS)}")
        with tempfile.TemporaryDirectory() as tmp:
            results.append(part(name, args, Path(tmp)))
        print(table(results[-1]) + "\n", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "environment": started,
                                        "results": results}, indent=1))


if __name__ == "__main__":
    main()
