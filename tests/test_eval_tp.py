"""Tensor-parallel lm-eval scoring equals single-device scoring for every kind of plan."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from krakenlm.checkpoint import save_checkpoint  # noqa: E402
from krakenlm.config import ModelConfig  # noqa: E402
from krakenlm.eval.harness import KrakenLM  # noqa: E402
from krakenlm.source import build_model

PAIRS = [("The cat sat on the", " mat"), ("Question: is it true?\nAnswer:", " yes"), ("x" * 80, " long tail"),
         ("", "abc")]
PROMPTS = ["Once upon", "The answer is"]


@pytest.mark.parametrize("arch,n_sub,tp", [
    ("gpt", 1, 2),     # Megatron inside the one stream (T = k*N)
    ("kraken", 4, 2),  # two sub-layers per rank (T < N)
    ("kraken", 2, 4),  # sub-layers split further (T = k*N)
    ("ladder", 1, 2),  # every module's AllReduce in flight during the next module
])
def test_tp_scores_and_generations_equal_single_device(arch: str, n_sub: int, tp: int, tmp_path: Path) -> None:
    cfg = ModelConfig(arch=arch, n_layer=2, n_embd=32, n_head=2, n_sub=n_sub, vocab_size=257, block_size=64)
    save_checkpoint(tmp_path / "m", build_model(config=cfg, seed=1), cfg)
    loglik = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    gen = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 8}), i) for i, p in enumerate(PROMPTS)]
    results = []
    for degree in (1, tp):
        lm = KrakenLM(checkpoint=str(tmp_path / "m"), batch_size=2, tp=degree)
        try:
            results.append((lm.loglikelihood(loglik, disable_tqdm=True), lm.generate_until(gen, disable_tqdm=True)))
        finally:
            lm.close()
    (one, gen_one), (many, gen_many) = results
    assert max(abs(a[0] - b[0]) for a, b in zip(one, many, strict=True)) < 1e-4
    assert [a[1] for a in one] == [b[1] for b in many]
    assert gen_one == gen_many
