"""The end-to-end demo (`krakenlm demo`, the README's main command).

Shakespeare corpus -> a byte-level BPE fitted to it (a small vocabulary, so small models learn
words rather than spend their steps on a 50k-way softmax) -> a small Kraken 2-way and a GPT of the
same block shapes trained for a few minutes in the dtype that is faster here -> validation
perplexity -> generation on 2 tensor-parallel ranks (greedy checked equal to one device, then a
sampled continuation) -> Kraken vs standard TP time-to-first-token on 2 gloo ranks, interleaved,
with the no-comm ceilings -> the cost model's prediction from a spec calibrated on this machine
(krakenlm/bench/spec.py), and how far prediction and measurement are apart.
Every step is skipped when its output already exists, so a rerun is quick.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from krakenlm.checkpoint import load_config
from krakenlm.engine import Engine, EngineOptions
from krakenlm.errors import ConfigError
from krakenlm.generate import SamplingConfig, Stop
from krakenlm.source import ModelSource
from krakenlm.tokenizer import BPETokenizer, load_bpe

MODELS = {"kraken": "mini-kraken-2way", "gpt": "mini-gpt"}
PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    steps: int = 600  # training steps per model
    vocab: int = 4096  # the corpus-trained BPE's vocabulary
    prompt_len: int = 256
    rounds: int = 9
    device: str = "auto"  # where the 2-rank generation runs (the TTFT sweep is the CPU benchmark)
    dtype: str = "auto"  # training and serving: auto = the faster of bf16 and fp32 here
    temperature: float = 0.8
    top_k: int = 40
    sample_tokens: int = 160

    def __post_init__(self) -> None:
        for name in ("steps", "prompt_len", "rounds", "top_k", "sample_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {value!r}")
        if not isinstance(self.vocab, int) or not 257 < self.vocab <= 65536:
            raise ConfigError(f"vocab: must be an integer in 258..65536, got {self.vocab!r}")
        SamplingConfig(self.temperature, self.top_k)  # validates both
        EngineOptions(dtype=self.dtype)  # validates the dtype name


def _data(out: Path, vocab: int) -> Path:
    from krakenlm.data import prepare

    data = out / f"data-bpe{vocab}"
    if not (data / "meta.json").exists():
        _say(f"fitting a {vocab}-token byte-level BPE to the bundled Shakespeare plays and tokenizing them")
        prepare(data, tokenizer=f"bpe:{vocab}")
    return data


def _train(out: Path, data: Path, preset: str, args: DemoConfig) -> Path:
    from krakenlm.presets import get_preset
    from krakenlm.train.trainer import TrainConfig, latest_checkpoint, train

    run = out / f"{preset}-bpe{args.vocab}"
    done = latest_checkpoint(run)
    if done is not None and json.loads((done / "config.json").read_text()).get("train_step") == args.steps:
        _say(f"{preset}: trained checkpoint found at {done}")
        return done
    model = get_preset(preset)
    model = model.replace(vocab_size=args.vocab, name=f"{model.name}-bpe{args.vocab}")
    cfg = TrainConfig(data=str(data), out=str(run), steps=args.steps, lr=2e-3, warmup_steps=max(1, args.steps // 20),
                      batch_size=8, block_size=256, dtype=args.dtype, eval_interval=max(1, args.steps // 4),
                      eval_windows=20, checkpoint_interval=args.steps, seed=0)
    _say(f"training {preset} ({model.num_params() / 1e6:.1f}M params) for {args.steps} steps")
    result = train(cfg, model, resume=done is not None)
    assert result.checkpoint is not None
    _say(f"{preset}: trained in {result.config.dtype}, final train loss {result.loss:.2f}")
    return result.checkpoint


def _measure_ttft(checkpoints: dict[str, str], args: DemoConfig) -> dict[str, Any]:
    """The benchmark sweep on the trained checkpoints: one loopback cell, interleaved rounds, idle waits."""
    from krakenlm.bench.sweep import Options, run_sweep

    opts = Options(shapes=["checkpoints"], checkpoints=checkpoints, prompts=[args.prompt_len], batches=[1],
                   dtypes=[args.dtype], tps=[2], links=[None], rounds=args.rounds, max_rounds=2 * args.rounds,
                   decode_steps=0, peer=False, single=False, breakdown=False, roofline=False, idle_wait_s=5.0)
    cell = run_sweep(opts, progress=_say)["cells"][0]
    ratio = cell["ratios"]["prefill"]["kraken/gpt"]
    in_place = cell["hidden_fraction"]["in_place"]
    return {"dtype": cell["dtype"],
            "median_ms": {label: v["prefill"]["median"] * 1e3 for label, v in cell["variants"].items()},
            "kraken_over_gpt": ratio["median"], "kraken_over_gpt_min_max": [ratio["min"], ratio["max"]],
            "hidden_fraction": {"timeline": cell["hidden_fraction"]["timeline"],
                                "in_place": in_place["median"] if in_place else None},
            "rounds": cell["rounds"]}


def _predict(checkpoints: dict[str, str], prompt_len: int, dtype: str) -> dict[str, Any]:
    """The cost model for exactly what is measured (the LM head computed whole on each rank, as the
    runtime does, 2 chips), from a spec calibrated on this machine at each model's own shapes."""
    from krakenlm.bench.spec import calibrated_spec
    from krakenlm.costmodel.estimator import Workload, estimate

    work = Workload(batch=1, prompt=prompt_len, dtype=dtype)
    link = None
    out: dict[str, Any] = {"ms": {}, "spec": {}}
    for name, path in checkpoints.items():
        cfg = load_config(path)
        hw = calibrated_spec(cfg, 2, prompt_len, 1, link=link)
        link = (hw.alpha, hw.link_bw)  # one loopback probe serves both models
        layout = "kraken" if cfg.arch == "kraken" else "1d-ws"
        out["ms"][name] = estimate(cfg, hw, work, chips=2, layout=layout, lm_head="replicated").ttft_s * 1e3
        out["spec"][name] = {"peak_flops": hw.peak_flops, "attention_eff": hw.attention_eff,
                             "layer_overhead_s": hw.layer_overhead_s, "link_bw": hw.link_bw, "alpha": hw.alpha}
    return out


def _one_device(checkpoint: str) -> Engine:
    """The single-device reference every comparison here is made against: fp32 on the CPU."""
    return Engine(ModelSource(checkpoint=checkpoint), EngineOptions(device="cpu", dtype="fp32"), local=True)


def _perplexity(checkpoint: str, data: Path) -> float:
    from krakenlm.eval.perplexity import perplexity

    with _one_device(checkpoint) as engine:
        return perplexity(engine, data, num_windows=40, block_size=256)


def _generate(checkpoint: str, tok: BPETokenizer, args: DemoConfig) -> dict[str, Any]:
    """Greedy on 2 ranks checked against one device, then a sampled continuation (what reads like the corpus)."""
    prompt, stop = [tok.encode(PROMPT)], Stop((tok.eot_token,))
    source, options = ModelSource(checkpoint=checkpoint), EngineOptions(tp=2, device=args.device, dtype="fp32")
    with _one_device(checkpoint) as engine:
        single = engine.generate(prompt, 40, stop=stop, vocab_limit=tok.vocab_size)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, seed=0)
    with Engine.launch(source, options) as engine:
        greedy = engine.generate(prompt, 40, stop=stop, vocab_limit=tok.vocab_size)
        sampled = engine.generate(prompt, args.sample_tokens, sampling, stop=stop, vocab_limit=tok.vocab_size)
    same = greedy.tokens[0] == single.tokens[0]
    _say(f"2-rank greedy output is {'the same as' if same else 'DIFFERENT from'} the single-device output "
         f"(fp32, 40 tokens; TTFT {greedy.prefill_seconds * 1e3:.1f} ms)")
    _say(f"a sampled continuation on 2 ranks (temperature {args.temperature}, top-k {args.top_k}):")
    text = PROMPT + tok.decode(sampled.tokens[0])
    print(text)
    return {"tp_equals_single_device": same, "sample": text}


def _report(measured: dict[str, Any], predicted: dict[str, Any]) -> None:
    print()
    print(f"{'model':<20}{'measured TTFT ms':>18}{'no-comm ceiling ms':>20}{'cost model ms':>16}{'model/measured':>16}")
    for name in MODELS:
        got, want = measured["median_ms"][name], predicted["ms"][name]
        print(f"{name + ' (2 ranks)':<20}{got:>18.2f}{measured['median_ms'][name + '/no-comm']:>20.2f}"
              f"{want:>16.2f}{want / got:>16.2f}")
    lo, hi = measured["kraken_over_gpt_min_max"]
    print(f"Kraken / standard TTFT ({measured['dtype']}): measured {measured['kraken_over_gpt']:.2f} (paired per "
          f"round, min {lo:.2f}, max {hi:.2f}); predicted {predicted['ms']['kraken'] / predicted['ms']['gpt']:.2f}")
    hidden = measured["hidden_fraction"]
    print(f"Kraken AllReduce time hidden behind attention: {hidden['timeline']:.0%} of the exchange's duration"
          + (f"; {hidden['in_place']:.0%} of blocking mode's exposed time removed" if hidden["in_place"] is not None
             else ""))
    print("(cost model: a spec calibrated on this machine in seconds - GEMM and attention rates at each model's "
          "shapes, a loopback all-reduce, per-layer overhead; `krakenlm predict --hardware cpu-gloo@here` uses it)")


def run_demo(args: DemoConfig) -> int:
    """Every stage, skipping those whose output exists; prints the comparison and writes summary.json."""
    from krakenlm.parallel.group import resolve_device

    resolve_device(args.device)  # a device that does not exist is refused now, not after the training
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = _data(out, args.vocab)
    checkpoints = {name: str(_train(out, data, preset, args)) for name, preset in MODELS.items()}

    summary: dict[str, Any] = {"checkpoints": checkpoints, "steps": args.steps, "vocab": args.vocab}
    summary["val_perplexity"] = {name: _perplexity(path, data) for name, path in checkpoints.items()}
    _say("validation perplexity (corpus BPE tokens): "
         + ", ".join(f"{n} {p:.1f}" for n, p in summary["val_perplexity"].items()))
    summary |= _generate(checkpoints["kraken"], load_bpe(data), args)

    _say(f"timing prefill (TTFT) of {args.prompt_len} tokens on 2 gloo ranks over loopback, dtype {args.dtype}, "
         f"{args.rounds} interleaved rounds ...")
    measured = _measure_ttft(checkpoints, args)
    _say("calibrating the cost model on this machine (cached after the first run) ...")
    predicted = _predict(checkpoints, args.prompt_len, measured["dtype"])
    summary.update(measured=measured, predicted_ms=predicted["ms"], predicted_spec=predicted["spec"],
                   prompt_len=args.prompt_len,
                   prediction_over_measurement={n: predicted["ms"][n] / measured["median_ms"][n] for n in MODELS})
    _report(measured, predicted)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _say(f"wrote {out / 'summary.json'}")
    return 0
