"""The engine on one device: sources, options, caches and scoring, against independent computations."""

import pytest
import torch
import torch.nn.functional as F

from krakenlm.engine import Engine, EngineOptions
from krakenlm.errors import ConfigError, InputError, ResourceError
from krakenlm.generate import Stop
from krakenlm.source import ModelSource, build_model
from tests.conftest import tiny


@pytest.fixture
def engine():
    with Engine(ModelSource(config=tiny("kraken"), seed=0), EngineOptions(device="cpu")) as e:
        yield e


def test_score_is_the_sum_of_target_log_probabilities(engine):
    inputs, targets = [[5, 6, 7, 8], [9, 10]], [[7, 8, 9], [11]]
    got = engine.score(inputs, targets)
    model = build_model(config=tiny("kraken"), seed=0)
    for (logp, greedy), row, target in zip(got, inputs, targets, strict=True):
        with torch.no_grad():
            full = F.log_softmax(model(torch.tensor([row]))[0, -len(target):], dim=-1)
        want = full.gather(1, torch.tensor(target).unsqueeze(1)).sum().item()
        assert abs(logp - want) < 1e-5
        assert greedy == bool((full.argmax(-1) == torch.tensor(target)).all())


def test_a_kv_cache_that_cannot_fit_is_refused_with_the_numbers(engine):
    with pytest.raises(ResourceError, match="KV cache for batch 10000000 x 128 tokens needs at least"):
        engine.new_cache(10_000_000, 128)


def test_stop_tokens_end_a_row_and_are_not_part_of_its_output(engine):
    free = engine.generate([[1, 2, 3]], 12).tokens[0]
    stop = free[4]
    cut = engine.generate([[1, 2, 3]], 12, stop=Stop((stop,))).tokens[0]
    assert cut == free[:free.index(stop)]


@pytest.mark.parametrize("options", [dict(tp=0), dict(timeout=float("nan")), dict(dtype="int8"), dict(threads=0),
                                     dict(device="gpu"), dict(device="cuda:x")])
def test_bad_options_are_refused_at_construction_naming_the_field(options):
    field = next(iter(options))
    with pytest.raises(ConfigError, match=field):
        EngineOptions(**options)


def test_prompts_the_model_cannot_serve_are_refused_before_any_work(engine):
    with pytest.raises(InputError, match="not integers"):
        engine.generate([[1, 2.5]], 4)
    with pytest.raises(InputError, match="exceeds the model's context"):
        engine.generate([[1] * 100], 40)
    vocab = engine.config.vocab_size
    for inputs, targets, match in [([[1, 2]], [[vocab]], "not integers"), ([[1, 2]], [[1.5]], "not integers"),
                                   ([[1, 2]], [[1], [2]], "one target per input")]:
        with pytest.raises(InputError, match=match):  # target ids index the logits: checked like prompts
            engine.score(inputs, targets)


def test_variants_share_weights_and_close_nothing(engine):
    other = engine.variant(no_comm=True, compile=False)
    assert other.model is engine.model
    other.close()
    assert engine.generate([[1, 2]], 3).tokens
