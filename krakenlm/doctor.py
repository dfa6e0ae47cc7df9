"""The GPU check (`krakenlm doctor`, `scripts/gpu-check`): what only a GPU can show, in one command.

On a machine with CUDA it checks, and prints as a pass/fail table:
1. one-device forward on CUDA equals the CPU (fp32 within 1e-4; bf16 within 5% of the largest logit);
2. a 2-rank engine on the GPU(s) equals one device (NCCL with two GPUs; with one GPU both ranks share
   it over gloo, which carries CUDA tensors, since NCCL refuses two ranks on one GPU);
3. the compiled decode step (torch.compile, CUDA graphs) gives the eager tokens, and its speed;
4. the vLLM plugin on the GPU: a Kraken model exported for it gives, through vLLM's offline engine (the
   venv at $KRAKENLM_VLLM_VENV, which must hold a CUDA build of vLLM), the greedy tokens krakenlm gives;
5. per-layer prefill / decode timings of depth-truncated 1.3B shapes, written as bench records that
   `krakenlm calibrate` fits a GPU hardware spec to.
Without CUDA it says so and claims nothing.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from krakenlm.config import ModelConfig
from krakenlm.engine import Engine, EngineOptions
from krakenlm.source import ModelSource
from krakenlm.validation import check_output_dir

PROMPTS = [list(range(5, 37)), list(range(40, 60))]
ARCHS = {
    "gpt": ModelConfig(arch="gpt", n_layer=4, n_embd=256, n_head=4, vocab_size=4096, block_size=512, bias=True),
    "parallel": ModelConfig(arch="parallel", n_layer=4, n_embd=256, n_head=4, vocab_size=4096, block_size=512),
    "kraken": ModelConfig(arch="kraken", n_layer=4, n_embd=192, n_head=3, n_sub=2, vocab_size=4096, block_size=512),
}


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not run here (the detail says why); never counted as a pass
    detail: str


def _source(arch: str) -> ModelSource:
    return ModelSource(config=ARCHS[arch], seed=0)


def _logits(engine: Engine) -> torch.Tensor:
    idx = torch.tensor([PROMPTS[0]])
    return engine.forward(idx).float().cpu()


def check_forward(device: str, archs: list[str]) -> list[Check]:
    out = []
    for arch in archs:
        with Engine(_source(arch), EngineOptions(device="cpu")) as cpu:
            want = _logits(cpu)
        for dtype, tol in (("fp32", 1e-4), ("bf16", 0.05 * max(1.0, want.abs().max().item()))):
            with Engine(_source(arch), EngineOptions(device=device, dtype=dtype)) as gpu:
                diff = (_logits(gpu) - want).abs().max().item()
            out.append(Check(f"forward {arch} {dtype}: {device} == cpu", diff <= tol,
                             f"max |diff| {diff:.2e} <= {tol:.2e}"))
    return out


def check_two_ranks(device: str, archs: list[str]) -> list[Check]:
    out = []
    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    if device == "cuda" and backend == "gloo":
        backend += " (one GPU shared by both ranks)"
    for arch in archs:
        with Engine(_source(arch), EngineOptions(device=device)) as one:
            want = one.generate(PROMPTS, 16).tokens
        try:
            with Engine.launch(_source(arch), EngineOptions(device=device, tp=2, timeout=120)) as two:
                got = two.generate(PROMPTS, 16)
            out.append(Check(f"2 ranks {arch}: equal to one device", got.tokens == want,
                             f"{backend}; TTFT {got.prefill_seconds * 1e3:.1f} ms"))
        except Exception as err:  # report, keep checking the rest
            out.append(Check(f"2 ranks {arch}: equal to one device", False, f"{backend}: {err}"))
    return out


def _decode_ms(engine: Engine, steps: int = 64) -> tuple[list[list[int]], float]:
    engine.generate(PROMPTS, steps)  # warm-up (and compilation)
    result = engine.generate(PROMPTS, steps)
    return result.tokens, result.decode_seconds / max(1, result.decode_steps) * 1e3


def check_compiled(device: str, archs: list[str]) -> list[Check]:
    from torch._dynamo.utils import counters

    out = []
    for arch in archs:
        with Engine(_source(arch), EngineOptions(device=device, dtype="bf16")) as eager:
            want, eager_ms = _decode_ms(eager)
            counters.clear()
            compiled = eager.variant(compile=True)
            got, compiled_ms = _decode_ms(compiled)
        skips = sum(counters["inductor"].get(k, 0) for k in counters["inductor"] if "cudagraph_skips" in k)
        out.append(Check(f"compiled decode {arch}: equal to eager", got == want and skips == 0,
                         f"{compiled_ms:.3f} vs {eager_ms:.3f} ms/token (x{eager_ms / compiled_ms:.2f}); "
                         f"cudagraph skips {skips}"))
    return out


GPT2_VOCAB = 50257
VLLM_MODEL = ModelConfig(arch="kraken", n_layer=2, n_embd=128, n_head=2, n_sub=2, vocab_size=50304, block_size=128)


def check_vllm(device: str, archs: list[str]) -> list[Check]:
    """Kraken through the vLLM plugin on ``device`` (vLLM's build decides where it runs) against krakenlm on
    the CPU: identical greedy tokens, at TP 1 and, with two GPUs, TP 2."""
    from krakenlm.checkpoint import save_checkpoint
    from krakenlm.interop.hf_export import export_model
    from krakenlm.interop.vllm_process import greedy_tokens, has_vllm, peaked, vllm_venv
    from krakenlm.model import Transformer

    if not has_vllm():
        return [Check("vLLM plugin", None, f"not run: no vLLM venv at {vllm_venv()} (set KRAKENLM_VLLM_VENV)")]
    torch.manual_seed(0)
    model = peaked(Transformer(VLLM_MODEL))
    out = []
    with tempfile.TemporaryDirectory(prefix="krakenlm-doctor-") as tmp:
        native = save_checkpoint(Path(tmp) / "native", model, VLLM_MODEL)
        with Engine(ModelSource(checkpoint=str(native)), EngineOptions(device="cpu", dtype="fp32")) as cpu:
            want = cpu.generate(PROMPTS, 16, vocab_limit=GPT2_VOCAB).tokens  # ids the export's tokenizer has
        export = export_model(model, Path(tmp) / "kraken", format="hf-krakenlm", tokenizer="gpt2").path
        for tp in (1, 2) if torch.cuda.device_count() >= 2 else (1,):
            got = greedy_tokens([export], PROMPTS, 16, tp=tp)[str(export)]
            out.append(Check(f"vLLM plugin kraken TP {tp}: equal to krakenlm", got == want,
                             f"{sum(a == b for a, b in zip(got, want, strict=True))}/{len(want)} prompts equal"))
    return out


def write_calibration_records(out_dir: Path, device: str) -> list[Check]:
    """Single-device (and 2 ranks on the GPU) per-layer timings of depth-truncated 1.3B shapes."""
    from krakenlm.bench import results
    from krakenlm.bench.sweep import Options, run_sweep

    opts = Options(shapes=["1.3b:2"], prompts=[128, 2048], batches=[1, 8], dtypes=["bf16"], tps=[2], links=[None],
                   rounds=5, max_rounds=8, decode_steps=16, peer=False, breakdown=False, idle_wait_s=1.0,
                   max_other_cores=100.0, device=device)
    start = time.perf_counter()
    sweep = run_sweep(opts, progress=lambda m: print(m, file=sys.stderr, flush=True))
    paths = results.write(results.build(opts, sweep, sys.argv), out_dir)
    return [Check("calibration records (1.3B shapes, depth 2)", bool(sweep["cells"]),
                  f"{len(sweep['cells'])} cells in {time.perf_counter() - start:.0f} s -> {paths[0]}")]


VERDICT = {True: "PASS", False: "FAIL", None: "SKIP"}
STAGES: dict[str, Callable[[str, list[str]], list[Check]]] = {
    "forward": check_forward, "two-ranks": check_two_ranks, "compiled": check_compiled, "vllm": check_vllm}


def run_doctor(out_dir: str | Path, *, timings: bool = True, device: str = "cuda",
               archs: list[str] | None = None, stages: list[str] | None = None) -> int:
    """Run every check; print the table; write doctor.json. 0 when all pass (or there is no GPU).
    ``device="cpu"`` runs the same checks on the CPU (how CI keeps this script working)."""
    facts = {"torch": torch.__version__, "cuda": torch.version.cuda, "devices": torch.cuda.device_count()}
    if device == "cuda" and not torch.cuda.is_available():
        print(f"krakenlm doctor: no CUDA device visible (torch {torch.__version__}, "
              f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'a CPU build'}): nothing to check, "
              "nothing claimed")
        return 0
    facts["device_name"] = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    out = check_output_dir(out_dir, "out")
    out.mkdir(parents=True, exist_ok=True)
    archs = archs or list(ARCHS)
    chosen = [(name, STAGES[name]) for name in stages or list(STAGES)]
    checks: list[Check] = []
    runs = [(name, lambda s=stage: s(device, archs)) for name, stage in chosen]
    if timings:
        runs.append(("timings", lambda: write_calibration_records(out, device)))
    for name, run in runs:
        try:
            checks += run()
        except Exception as err:  # one broken stage must not hide the others
            checks.append(Check(name, False, repr(err)))
    width = max(len(c.name) for c in checks)
    print(f"check on {facts['device_name']} (torch {facts['torch']}, CUDA {facts['cuda']})")
    for c in checks:
        print(f"{c.name:<{width}}  {VERDICT[c.ok]}  {c.detail}")
    report: dict[str, Any] = facts | {"checks": [c.__dict__ for c in checks]}
    (out / "doctor.json").write_text(json.dumps(report, indent=2))
    return 0 if all(c.ok is not False for c in checks) else 1


if __name__ == "__main__":
    sys.exit(run_doctor(sys.argv[1] if len(sys.argv) > 1 else "doctor-results"))
