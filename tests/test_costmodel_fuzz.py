"""Seeded fuzz of the cost model's inputs: hardware specs and the predict / plan / size / simulate
arguments. Every case must end in a one-line typed error naming the field it broke, or a valid result
whose numbers are all finite; never a traceback, a hang or a NaN. The long run is
benchmarks/fuzz_costmodel.py (same generator, more cases, counts printed)."""

from __future__ import annotations

import io
import json
import math
import random
import tempfile
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from krakenlm.cli import main
from krakenlm.costmodel.hardware import hardware_names, load_hardware

PRESETS = ("gpt-1.3b", "kraken4-1.3b", "parallel-1.3b", "gpt2-124m", "kraken-125m-2way", "palm-8b", "kraken8-6.7b")
NUMBERS = ["0", "-1", "-2", "1", "2", "3", "4", "7", "8", "16", "64", "100000", "1000000", "99999999999999", "1e3",
           "nan", "inf", "-inf", "abc", "", "0.5", "2.5"]
LISTS = ["1,2", "0,3", "1,32", "-5,4", "2,2,2", "auto", "auto,4", "4,auto", "2-1", "64-512", "1-100000", "8,8"]
SPEC_VALUES: list[Any] = [0, -1, 1e-300, 1e300, float("nan"), float("inf"), float("-inf"), "x", "1e12", [], {},
                          None, True, False, 0.5, 2, 5.0, 1e12, 8, [4, 4], [4, 4, 4], 4, {"bf16": 1e12}, "ring"]
# What a message may call each option (the option itself, the field it sets, or the constraint it breaks).
ALIASES = {"--pp": ("pp", "stages"), "--model": ("preset",), "--layers": ("n_layer",), "--heads": ("total_heads",),
           "--n-sub": ("n_sub",), "--kraken-degrees": ("kraken degree",), "--memory-limit": ("memory limit",),
           "--target-latency": ("target latency",), "--goodput-slo": ("slo",), "--slo": ("slo",),
           "--arrivals": ("arrivals", "trace"), "--batches": ("batch",), "--prompt": ("prompt", "lengths"),
           "--generate": ("generate", "lengths"), "--chips": ("chips", "heads")}
VERBS = {
    "predict": (["--model", "gpt-1.3b", "--chips", "2", "--prompt", "256", "--generate", "16", "--json"],
                {"--chips": NUMBERS, "--batch": NUMBERS + LISTS, "--prompt": NUMBERS, "--generate": NUMBERS,
                 "--pp": NUMBERS, "--microbatches": NUMBERS + LISTS, "--model": list(PRESETS) + ["nope"],
                 "--layout": ["1d-ws", "2d-ws/attn-batch", "wg-xyz", "kraken", "3d-ws", "wg-x,1d-ws", "auto,kraken"],
                 "--hardware": hardware_names() + ["nope"],
                 "--overlap": ["full", "chunked:4", "chunked:0", "chunked:x", "collective-matmul", "async"]}),
    "plan": (["--model", "kraken4-1.3b", "--chips", "8", "--prompt", "256", "--generate", "16", "--json"],
             {"--chips": NUMBERS[:11], "--batch": NUMBERS[:11] + LISTS, "--prompt": NUMBERS, "--generate": NUMBERS,
              "--batches": NUMBERS[:11] + LISTS, "--kraken-degrees": NUMBERS[:11] + LISTS, "--pp": NUMBERS + LISTS,
              "--memory-limit": NUMBERS, "--target-latency": NUMBERS, "--model": list(PRESETS)}),
    "size": (["--budget", "124000000", "--layers", "12", "--heads", "12", "--n-sub", "2"],
             {"--budget": NUMBERS, "--layers": NUMBERS, "--heads": NUMBERS, "--n-sub": NUMBERS}),
    "simulate": (["--model", "gpt-1.3b", "--rate", "20", "--requests", "40", "--prompt", "64-256", "--generate", "8"],
                 {"--chips": NUMBERS[:11], "--pp": NUMBERS[:11], "--rate": NUMBERS, "--requests": NUMBERS[:10],
                  "--prompt": NUMBERS + LISTS, "--generate": NUMBERS[:10] + LISTS[:10], "--max-batch": NUMBERS,
                  "--max-tokens": NUMBERS, "--max-queue": NUMBERS, "--max-prefills-per-step": NUMBERS,
                  "--goodput-slo": ['{"ttft_s": 0.1}', '{"ttft_s": -1}', '{"x": 1}', "[1]", "{", '{"tpot_s": NaN}'],
                  "--arrivals": ["poisson", "constant", "uniform", "/nonexistent.json"], "--seed": NUMBERS[:8]}),
}


@dataclass(frozen=True)
class Outcome:
    """``kind``: "error" (a clear one-line error naming a broken field), "valid" (finite result) or "other"."""

    kind: str
    argv: tuple[str, ...]
    detail: str = ""


def _finite(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def run_case(argv: list[str], fields: list[str]) -> Outcome:
    """Run the CLI in-process; classify the outcome."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(argv)
    except SystemExit as exit_:  # argparse: a usage line and "error: argument --x: ..."
        rc = exit_.code if isinstance(exit_.code, int) else 2
        if rc == 2 and "error: argument" in err.getvalue():
            return Outcome("error", tuple(argv))
        return Outcome("other", tuple(argv), err.getvalue()[-500:])
    except Exception:  # noqa: BLE001 - a traceback is exactly what the fuzz looks for
        return Outcome("other", tuple(argv), traceback.format_exc()[-800:])
    message = err.getvalue().strip()
    if rc == 2:
        names = {n for f in fields for n in (f.lstrip("-"), f.lstrip("-").replace("-", "_"), *ALIASES.get(f, ()))}
        clear = "\n" not in message and message.startswith(f"krakenlm {argv[0]}: error:")
        named = any(n in message for n in names) or message.startswith(f"krakenlm {argv[0]}: error: plan:")
        return Outcome("error" if clear and named else "other", tuple(argv), message)
    try:
        ok = rc == 0 and _finite(json.loads(out.getvalue()))
    except json.JSONDecodeError:
        ok = False
    return Outcome("valid" if ok else "other", tuple(argv), f"rc={rc} {message} {out.getvalue()[:300]}")


def cli_case(rng: random.Random) -> tuple[list[str], list[str]]:
    """A verb's valid base arguments with one or two options set to random (often bad) values."""
    verb = rng.choice(sorted(VERBS))
    base, options = VERBS[verb]
    args = dict(zip(base[::2], base[1::2], strict=False))
    flags = [f for f in base if f.startswith("--") and f not in args]
    fields = rng.sample(sorted(options), k=rng.choice((1, 1, 2)))
    for f in fields:
        args[f] = rng.choice(options[f])
    if verb == "plan" and rng.random() < 0.2:
        args |= {"--slo": rng.choice(["p99_ttft<=200ms", "p50_tpot<=1ms", "p99_ttft<200", "p99_ttft<=-3ms"]),
                 "--rate": rng.choice(["5", "0", "nan", "50"]), "--requests": "30", "--batches": "4,8"}
        fields += ["--slo", "--rate"]
    return [verb, *[x for kv in args.items() for x in kv], *flags], fields


def spec_case(rng: random.Random, tmp: Path) -> tuple[list[str], list[str]]:
    """`predict --hardware <spec>` on a bundled spec with one or two fields replaced."""
    spec = load_hardware(rng.choice(hardware_names())).to_dict()
    fields = rng.sample(sorted(spec), k=rng.choice((1, 1, 2)))
    for f in fields:
        spec[f] = rng.choice(SPEC_VALUES)
    path = tmp / f"spec{rng.randrange(10**9)}.json"
    path.write_text(json.dumps(spec))
    model = rng.choice(PRESETS)
    return (["predict", "--model", model, "--hardware", str(path), "--prompt", "128", "--generate", "8", "--json"],
            fields)


def fuzz(cases: int, seed: int = 0) -> list[Outcome]:
    """Run ``cases`` seeded cases (half hardware specs, half CLI arguments)."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        return [run_case(*(spec_case(rng, Path(tmp)) if rng.random() < 0.4 else cli_case(rng)))
                for _ in range(cases)]


def test_fuzz_cost_model_inputs() -> None:
    outcomes = fuzz(160, seed=1)
    bad = [o for o in outcomes if o.kind == "other"]
    assert not bad, "\n\n".join(f"{' '.join(o.argv)}\n{o.detail}" for o in bad[:5])
    kinds = {k: sum(o.kind == k for o in outcomes) for k in ("error", "valid")}
    assert kinds["error"] > 30 and kinds["valid"] > 30  # the generator reaches both sides
