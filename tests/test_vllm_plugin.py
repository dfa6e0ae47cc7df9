"""vLLM serving of exported krakenlm models through the plugin (krakenlm.interop): greedy tokens equal
krakenlm's for the same weights (20 prompts, 32 tokens, fp32).

vLLM lives in its own venv (scripts/bootstrap-vllm.sh, which scripts/test sources, so CI has it) and runs
as subprocesses under hard time limits. Without that venv these tests are skipped with a reason naming
what went untested (scripts/test prints skip reasons)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from krakenlm.checkpoint import save_checkpoint
from krakenlm.config import ModelConfig
from krakenlm.engine import Engine, EngineOptions
from krakenlm.interop.hf_export import export_model
from krakenlm.interop.vllm_process import VllmServer, greedy_tokens, has_vllm, peaked, vllm_venv
from krakenlm.model.transformer import Transformer
from krakenlm.source import ModelSource

VENV = vllm_venv()
needs_vllm = pytest.mark.skipif(
    not has_vllm(),
    reason=f"NOT TESTED: serving through vLLM (no vLLM venv at {VENV}; scripts/bootstrap-vllm.sh creates it, "
           "scripts/test does so)")

BASE = dict(n_layer=2, n_embd=64, vocab_size=50257, block_size=128)  # head size 32: a size vLLM's CPU kernel takes
MODELS = {
    # The paper's block: LayerNorm, learned positions, GELU, no bias, tied head, GPT-2's vocabulary padded to 50304.
    "kraken": ModelConfig(arch="kraken", n_sub=2, n_head=2, **(BASE | {"vocab_size": 50304})),
    # The Llama options: RMSNorm, RoPE, SwiGLU, one kv head (GQA), untied head.
    "parallel": ModelConfig(arch="parallel", n_head=2, n_kv_head=1, norm="rmsnorm", position="rope", mlp="swiglu",
                            tie_embeddings=False, **BASE),
    # Biases; head size 24, which vLLM serves zero-padded to 32.
    "ladder": ModelConfig(arch="ladder", n_head=4, bias=True, **(BASE | {"n_embd": 96})),
}
_rng = random.Random(0)
PROMPTS = [[_rng.randrange(BASE["vocab_size"]) for _ in range(_rng.randint(3, 40))] for _ in range(20)]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Per architecture: a native checkpoint and its export (the same random, peaked weights)."""
    root = tmp_path_factory.mktemp("vllm")
    out = {}
    for seed, (name, cfg) in enumerate(MODELS.items()):
        torch.manual_seed(seed)
        model = peaked(Transformer(cfg))
        exported = export_model(model, root / name, format="hf-krakenlm", tokenizer="gpt2").path
        out[name] = (save_checkpoint(root / f"{name}-native", model, cfg), exported)
    return out


def krakenlm_tokens(checkpoint: Path) -> list[list[int]]:
    """What ``krakenlm generate`` computes (its Engine, one device, fp32, greedy, no stop token, never an id
    past the GPT-2 tokenizer's)."""
    with Engine.launch(ModelSource(checkpoint=str(checkpoint)), EngineOptions(device="cpu", dtype="fp32")) as engine:
        return engine.generate(PROMPTS, MAX_TOKENS, vocab_limit=BASE["vocab_size"]).tokens


@pytest.mark.slow
@pytest.mark.timeout(600)  # above the subprocess's own limit, which reports vLLM's output
@needs_vllm
def test_tp1_every_architecture_matches_krakenlm(models: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """vLLM's engine at TP 1 (one process for the three models; Kraken's two sub-layers on one rank)."""
    exports = {str(export): name for name, (_, export) in models.items()}
    got = greedy_tokens([export for _, export in models.values()], PROMPTS, MAX_TOKENS)
    for export, tokens in got.items():
        name = exports[export]
        assert tokens == krakenlm_tokens(models[name][0]), f"{name}: vLLM's greedy tokens differ from krakenlm's"


@pytest.mark.slow
@pytest.mark.timeout(600)  # above the server's start (360 s) and request (180 s) limits, which report its log
@needs_vllm
def test_kraken_tp2_served_matches_krakenlm(models: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """``vllm serve OUT --tensor-parallel-size 2``: each rank holds one whole sub-layer; the completions
    API returns the same greedy tokens as krakenlm."""
    native, export = models["kraken"]
    args = ["--tensor-parallel-size", "2", "--dtype", "float32", "--max-model-len", "128",
            "--max-num-batched-tokens", "256", "--max-num-seqs", "32", "--enforce-eager"]
    with VllmServer(export, args, tmp_path / "vllm.log", timeout=360) as server:
        body = {"model": str(export), "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=180)
        assert response.status_code == 200, f"{response.text}\n{server.tail()}"
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        assert all(c["text"] for c in choices)  # detokenized by the export's GPT-2 tokenizer
    assert [c["token_ids"] for c in choices] == krakenlm_tokens(native)


def test_plugin_import_is_lazy() -> None:
    """Importing krakenlm (and its plugin module) imports neither vLLM nor transformers."""
    code = ("import sys, krakenlm.interop.vllm_plugin, krakenlm.cli\n"
            "print('vllm' in sys.modules, 'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["False", "False"]
