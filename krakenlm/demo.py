"""The end-to-end demo (`krakenlm demo`, the README's main command).

Shakespeare corpus -> a small Kraken 2-way and a GPT of equal parameters trained for a few
minutes -> validation perplexity -> generation on 2 tensor-parallel ranks (checked equal to one
device) -> Kraken vs standard TP time-to-first-token on 2 gloo ranks, interleaved, with the
no-comm ceilings (heads zero-padded to multiples of 64, exact) -> the cost model's prediction for
the same shapes beside the measurement.
Every step is skipped when its output already exists, so a rerun is quick.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from krakenlm.checkpoint import load_model
from krakenlm.engine import Engine, EngineOptions
from krakenlm.errors import ConfigError
from krakenlm.generate import Stop, generate
from krakenlm.source import ModelSource
from krakenlm.tokenizer import get_tokenizer

MODELS = {"kraken": "mini-kraken-2way", "gpt": "mini-gpt"}
PAD_HEADS = 64  # served heads are zero-padded to this multiple (exact): friendlier kernel shapes
PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _train(out: Path, data: Path, preset: str, steps: int) -> Path:
    from krakenlm.presets import get_preset
    from krakenlm.train.trainer import TrainConfig, latest_checkpoint, train

    run = out / preset
    done = latest_checkpoint(run)
    if done is not None and json.loads((done / "config.json").read_text()).get("train_step") == steps:
        _say(f"{preset}: trained checkpoint found at {done}")
        return done
    cfg = TrainConfig(data=str(data), out=str(run), steps=steps, lr=1e-3, warmup_steps=max(1, steps // 10),
                      batch_size=8, block_size=256, dtype="bf16", eval_interval=max(1, steps // 5),
                      eval_windows=20, checkpoint_interval=steps, seed=0)
    _say(f"training {preset} ({get_preset(preset).num_params() / 1e6:.1f}M params) for {steps} steps")
    result = train(cfg, get_preset(preset), resume=done is not None)
    assert result.checkpoint is not None
    return result.checkpoint


def _measure_ttft(checkpoints: dict[str, str], prompt_len: int, rounds: int) -> dict[str, Any]:
    """The benchmark sweep on the trained checkpoints: one loopback cell, interleaved rounds, idle waits."""
    from krakenlm.bench.sweep import Options, run_sweep

    opts = Options(shapes=["checkpoints"], checkpoints=checkpoints, prompts=[prompt_len], batches=[1],
                   dtypes=["bf16"], tps=[2], links=[None], rounds=rounds, max_rounds=2 * rounds, decode_steps=0,
                   peer=False, single=False, breakdown=False, idle_wait_s=5.0, pad_heads=PAD_HEADS)
    cell = run_sweep(opts, progress=_say)["cells"][0]
    ratio = cell["ratios"]["prefill"]["kraken/gpt"]
    in_place = cell["hidden_fraction"]["in_place"]
    return {"median_ms": {label: v["prefill"]["median"] * 1e3 for label, v in cell["variants"].items()},
            "kraken_over_gpt": ratio["median"], "kraken_over_gpt_min_max": [ratio["min"], ratio["max"]],
            "hidden_fraction": {"timeline": cell["hidden_fraction"]["timeline"],
                                "in_place": in_place["median"] if in_place else None},
            "rounds": cell["rounds"]}


def _predict(checkpoints: dict[str, str], prompt_len: int) -> dict[str, float]:
    """The calibrated CPU/gloo cost model for exactly what is measured: heads padded as served, the LM
    head computed whole on each rank (as the runtime does), 2 chips."""
    from krakenlm.checkpoint import load_config
    from krakenlm.costmodel.estimator import Workload, estimate
    from krakenlm.costmodel.hardware import load_hardware

    hw = load_hardware("cpu-gloo")
    work = Workload(batch=1, prompt=prompt_len, dtype="bf16")
    out = {}
    for name, path in checkpoints.items():
        cfg = load_config(path)
        cfg = cfg.replace(head_dim=cfg.padded_head_size(PAD_HEADS))
        layout = "kraken" if cfg.arch == "kraken" else "1d-ws"
        out[name] = estimate(cfg, hw, work, chips=2, layout=layout, lm_head="replicated").ttft_s * 1e3
    return out


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    steps: int = 200  # training steps per model
    prompt_len: int = 256
    rounds: int = 9
    device: str = "auto"  # where the 2-rank generation runs (the TTFT sweep is the CPU benchmark)

    def __post_init__(self) -> None:
        for name in ("steps", "prompt_len", "rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {value!r}")


def run_demo(args: DemoConfig) -> int:
    """Every stage, skipping those whose output exists; prints the comparison and writes summary.json."""
    from krakenlm.data import prepare
    from krakenlm.eval.perplexity import perplexity

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "meta.json").exists():
        _say("tokenizing the bundled Shakespeare corpus (GPT-2 BPE)")
        prepare(data, progress=True)
    checkpoints = {name: str(_train(out, data, preset, args.steps)) for name, preset in MODELS.items()}

    summary: dict[str, Any] = {"checkpoints": checkpoints, "steps": args.steps}
    summary["val_perplexity"] = {name: perplexity(load_model(path), data, num_windows=40, block_size=256)
                                 for name, path in checkpoints.items()}
    _say("validation perplexity: " + ", ".join(f"{n} {p:.1f}" for n, p in summary["val_perplexity"].items()))

    tok = get_tokenizer("gpt2")
    prompt, stop = [tok.encode(PROMPT)], Stop((tok.eot_token,))
    single = generate(load_model(checkpoints["kraken"]), prompt, 40, stop_token=tok.eot_token,
                      vocab_limit=tok.vocab_size).tokens[0]
    _say("generating with the trained Kraken on 2 tensor-parallel ranks:")
    source, options = ModelSource(checkpoint=checkpoints["kraken"]), EngineOptions(tp=2, device=args.device)
    with Engine.launch(source, options) as engine:
        result = engine.generate(prompt, 40, stop=stop, vocab_limit=tok.vocab_size)
    print(PROMPT + tok.decode(result.tokens[0]))
    same = "the same as" if result.tokens[0] == single else "DIFFERENT from"
    _say(f"2-rank greedy output is {same} the single-device output (TTFT {result.prefill_seconds * 1e3:.1f} ms)")
    summary["tp_equals_single_device"] = result.tokens[0] == single

    _say(f"timing prefill (TTFT) of {args.prompt_len} tokens on 2 gloo ranks over loopback, bf16, "
         f"{args.rounds} interleaved rounds ...")
    measured = _measure_ttft(checkpoints, args.prompt_len, args.rounds)
    predicted = _predict(checkpoints, args.prompt_len)
    summary.update(measured=measured, predicted_ms=predicted, prompt_len=args.prompt_len)
    print()
    print(f"{'model':<20}{'measured TTFT ms':>18}{'no-comm ceiling ms':>20}{'cost model ms':>16}")
    for name in MODELS:
        print(f"{name + ' (2 ranks)':<20}{measured['median_ms'][name]:>18.2f}"
              f"{measured['median_ms'][name + '/no-comm']:>20.2f}{predicted[name]:>16.2f}")
    lo, hi = measured["kraken_over_gpt_min_max"]
    print(f"Kraken / standard TTFT: measured {measured['kraken_over_gpt']:.2f} (paired per round, min {lo:.2f}, "
          f"max {hi:.2f}); predicted {predicted['kraken'] / predicted['gpt']:.2f}")
    hidden = measured["hidden_fraction"]
    print(f"Kraken AllReduce time hidden behind attention: {hidden['timeline']:.0%} of the exchange's duration"
          + (f"; {hidden['in_place']:.0%} of blocking mode's exposed time removed" if hidden["in_place"] is not None
             else ""))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _say(f"wrote {out / 'summary.json'}")
    return 0
