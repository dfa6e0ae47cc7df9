"""Serving pieces without HTTP: the engine's row operations against Engine.generate (alone, batched,
staggered, sampled, tensor-parallel, compiled), incremental text with stop strings, request parsing."""

import json
import random

import pytest
import torch

from krakenlm.batching.scheduler import BatchingPolicy
from krakenlm.engine import Engine, EngineOptions, padded_groups
from krakenlm.errors import ConfigError, InputError
from krakenlm.generate import SamplingConfig
from krakenlm.parallel.launch import run_ranks
from krakenlm.serve.protocol import ApiError, decode_body, parse_completion
from krakenlm.serve.text import TextStream
from krakenlm.source import ModelSource
from tests.conftest import tiny
from tests.tp_workers import scheduled, staggered


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(2, 40))] for _ in range(count)]


def alone(engine: Engine, batch: list[list[int]], steps: int, sampling: list[SamplingConfig]) -> list[list[int]]:
    return [engine.generate([p], steps, s).tokens[0] for p, s in zip(batch, sampling, strict=True)]


CONFIGS = {"gpt": tiny("gpt"), "kraken": tiny("kraken"), "parallel": tiny("parallel"),
           "gpt-gqa-rope-swiglu": tiny("gpt", n_kv_head=2, position="rope", mlp="swiglu")}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rows_give_what_generate_gives_alone(name):
    engine = Engine(ModelSource(config=CONFIGS[name]), EngineOptions(device="cpu"))
    batch = prompts(8)
    sampling = [SamplingConfig()] * 6 + [SamplingConfig(0.8, top_k=20, seed=3), SamplingConfig(1.0, top_p=0.9, seed=9)]
    want = alone(engine, batch, 20, sampling)
    engine.open_serving(8)
    assert staggered(engine, batch, 20, sampling) == want  # eight at once, joining one per step
    # rows reused in another order: a row's earlier request leaves nothing behind
    assert staggered(engine, batch[::-1], 20, sampling[::-1], rows=[5, 0, 7, 2, 1, 3, 6, 4]) == want[::-1]


@pytest.mark.parametrize("form", ["linear", "transposed", "packed"])
def test_serving_chooses_a_form_per_row_bucket_and_every_form_gives_the_same_tokens(form):
    """An engine has a form for every row bucket its steps see: 1 to 128 rows (a 128-token prefill) when built,
    up to 512 (the cap) once serving 256 rows (before, an engine built for one sequence chose only the 1-row
    form, so a server ran every batch in it); each form serves the same tokens."""
    if form == "packed" and not torch.backends.mkldnn.is_available():
        pytest.skip("NOT TESTED: this torch has no oneDNN")
    engine = Engine(ModelSource(config=CONFIGS["gpt"]), EngineOptions(device="cpu"))
    batch, sampling = prompts(8, seed=4), [SamplingConfig()] * 8
    want = alone(engine, batch, 10, sampling)
    assert len(engine.choices.linear) == 8
    engine.open_serving(256)
    assert len(engine.choices.linear) == 10 and f"linear={','.join(engine.choices.linear)} " in str(engine.choices)
    engine.open_serving(8)
    c = engine.choices
    engine.model.set_forms(c.attention, (form,) * 10, c.gelu, c.row)
    assert staggered(engine, batch, 10, sampling) == want


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batched_and_chunked_prefill_give_what_generate_gives_alone(name):
    engine = Engine(ModelSource(config=CONFIGS[name]), EngineOptions(device="cpu"))
    batch = prompts(8, seed=2)
    sampling = [SamplingConfig()] * 5 + [SamplingConfig(0.9, top_k=30, seed=s) for s in (1, 2, 3)]
    want = alone(engine, batch, 12, sampling)
    engine.open_serving(6)
    for policy in (BatchingPolicy(max_batch=6), BatchingPolicy(max_batch=6, prefill_chunk=7),
                   BatchingPolicy(max_batch=3, prefill_chunk=1)):
        assert scheduled(engine, batch, 12, policy, sampling) == want, policy


@pytest.mark.parametrize("rows", [[4, 1, 2], [2, 3, 1]])  # rows apart (a scratch cache), adjacent (in place)
def test_batched_prefill_writes_the_cache_one_by_one_prefill_writes(rows):
    engine = Engine(ModelSource(config=tiny("gpt", n_kv_head=2, position="rope")), EngineOptions(device="cpu"))
    batch = prompts(3, seed=4)  # 17, 15 and 19 tokens: one padded group
    engine.open_serving(5)
    engine.prefill_rows([0, 4], [[7] * 30, [8] * 40], [SamplingConfig()] * 2)  # earlier requests to overwrite
    together = engine.prefill_rows(rows, batch, [SamplingConfig()] * 3)
    cache = engine._serving.cache
    keys = [k.clone() for k in cache.keys + cache.values]
    for row, prompt, first in zip(rows, batch, together, strict=True):
        assert engine.prefill_row(row, prompt) == first
        n = len(prompt)
        assert cache.valid[row, :n].all() and not cache.valid[row, n:].any()
        for mine, one in zip(keys, cache.keys + cache.values, strict=True):
            torch.testing.assert_close(mine[:, row, :, :n], one[:, row, :, :n], rtol=1e-5, atol=1e-6)


def test_padded_groups_bound_the_padding():
    assert padded_groups([100, 10, 90, 0, 12, 95]) == [[0, 5, 2], [4, 1]]  # 0: not a new prompt
    assert padded_groups([5, 5, 5]) == [[0, 1, 2]] and padded_groups([0]) == []


def test_chunked_prefill_refuses_chunks_out_of_order():
    engine = Engine(ModelSource(config=tiny("gpt")), EngineOptions(device="cpu"))
    engine.open_serving(2)
    assert engine.prefill_rows([0], [[1, 2, 3]], [SamplingConfig()], last=[False]) == [None]
    with pytest.raises(InputError, match="holds no request"):
        engine.decode_rows([0])  # its prompt is not complete
    with pytest.raises(InputError, match="cannot start at 2"):
        engine.prefill_rows([0], [[4]], [SamplingConfig()], starts=[2])
    assert isinstance(engine.prefill_rows([0], [[4]], [SamplingConfig()], starts=[3])[0], int)
    with pytest.raises(InputError, match="cannot start at 4"):  # the prompt is complete: decode now
        engine.prefill_rows([0], [[5]], [SamplingConfig()], starts=[4])
    with pytest.raises(InputError, match="distinct rows"):
        engine.prefill_rows([1, 1], [[1], [2]], [SamplingConfig()] * 2)


def test_row_operations_refuse_bad_calls():
    engine = Engine(ModelSource(config=tiny("gpt")), EngineOptions(device="cpu"))
    with pytest.raises(ConfigError, match="open_serving"):
        engine.prefill_row(0, [1, 2])
    with pytest.raises(ConfigError, match="max_batch"):
        engine.open_serving(0)
    engine.open_serving(2)
    with pytest.raises(InputError, match="row must be"):
        engine.prefill_row(2, [1, 2])
    with pytest.raises(InputError, match="holds no request"):
        engine.decode_rows([1])
    with pytest.raises(InputError, match="exceeds the model's context"):
        engine.prefill_row(0, [1] * 129)
    engine.prefill_row(0, [1] * 128)
    with pytest.raises(InputError, match="filled the context"):
        engine.decode_rows([0])
    with pytest.raises(InputError, match="distinct"):
        engine.decode_rows([0, 0])


def test_compiled_rows_equal_eager_generate():
    source = ModelSource(config=tiny("kraken", n_layer=2))
    eager = Engine(source, EngineOptions(device="cpu"))
    batch, sampling = prompts(3, seed=1), [SamplingConfig(), SamplingConfig(0.7, seed=5), SamplingConfig()]
    want = alone(eager, batch, 12, sampling)
    compiled = Engine(source, EngineOptions(device="cpu", compile=True))
    compiled.open_serving(4)
    assert staggered(compiled, batch, 12, sampling, rows=[2, 0, 3]) == want


def test_tensor_parallel_rows_equal_single_device(tmp_path):
    cases = {"gpt-mqa-rope": tiny("gpt", n_kv_head=1, position="rope"), "kraken": tiny("kraken"),
             "ladder": tiny("ladder")}
    payload = {"out": str(tmp_path), "cases": {k: v.to_dict() for k, v in cases.items()}, "prompts": prompts(8)}
    assert run_ranks("tests.tp_workers:serving_rows", 2, payload, grace=30) == 0
    results = json.loads((tmp_path / "serving.json").read_text())
    for name, cfg in cases.items():
        engine = Engine(ModelSource(config=cfg), EngineOptions(device="cpu"))
        want = alone(engine, payload["prompts"], 16, [SamplingConfig()] * 8)
        assert results[name] == want, name
        assert results[name + " chunked"] == want, name


# Text and protocol -------------------------------------------------------------------------------------
def stream_all(tokens: list[int], stops: tuple[str, ...]) -> tuple[list[str], bool]:
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    text = TextStream(decode, stops)
    deltas = [text.push(t) for t in tokens]
    return deltas + [text.flush()], text.stopped


def test_text_stream_holds_back_partial_characters_and_stop_strings():
    word = list("héllo wörld END more".encode())
    deltas, stopped = stream_all(word, ("END",))
    assert "".join(deltas) == "héllo wörld " and stopped
    assert all("\ufffd" not in d for d in deltas)  # a 2-byte character is sent whole, never half
    assert "E" not in "".join(deltas[:-1])  # 'E', 'EN' were held back until 'END' completed
    deltas, stopped = stream_all(list(b"an ENd"), ("END",))
    assert "".join(deltas) == "an ENd" and not stopped  # a false start is released
    deltas, stopped = stream_all(list(b"abcSTOP"), ("xyz", "STOP", "cST"))
    assert "".join(deltas) == "ab" and stopped  # the earliest stop string wins


BAD_BODIES = [
    (b"{bad", "not valid JSON"), (b"\xff\xfe{}", "not valid UTF-8"), (b"[1, 2]", "must be a JSON object"),
    (b'{"prompt": "a", "temperature": NaN}', "NaN is not valid JSON"),
    (b'{"prompt": ' + b"[" * 64 + b"]" * 64 + b"}", "request body: JSON nested deeper than 64 levels"),
]
BAD_FIELDS = [
    ({"prompt": "a", "foo": 1}, "foo: unknown field"), ({}, "prompt: required"), ({"prompt": ""}, "prompt: must not"),
    ({"prompt": ["a", "b"]}, "batched prompts"), ({"prompt": [1, "x"]}, "prompt: must be"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens: must be an integer >= 1"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens"), ({"prompt": "a", "temperature": 3}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"), ({"prompt": "a", "top_k": 0}, "top_k"), ({"prompt": "a", "n": 2}, "n=1"),
    ({"prompt": "a", "echo": True}, "echo: not supported"), ({"prompt": "a", "logprobs": 2}, "logprobs: not supported"),
    ({"prompt": "a", "stop": [""]}, "stop"), ({"prompt": "a", "stop": ["a"] * 5}, "stop"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "only allowed with stream"),
    ({"prompt": "a", "stream": "yes"}, "stream: must be true or false"), ({"prompt": "a", "seed": 1.5}, "seed"),
]


@pytest.mark.parametrize(("body", "message"), BAD_BODIES)
def test_bad_bodies_are_400_with_a_message(body, message):
    with pytest.raises(ApiError, match=message) as err:
        parse_completion(decode_body(body))
    assert err.value.status == 400 and err.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("data", "message"), BAD_FIELDS)
def test_bad_fields_are_400_naming_the_field(data, message):
    with pytest.raises(ApiError, match=message) as err:
        parse_completion(data)
    assert err.value.status == 400


def test_good_request_parses_with_openai_defaults():
    req = parse_completion({"prompt": [[5, 6]], "stop": "\n", "echo": False, "n": 1, "user": "u", "top_k": 4})
    assert req.prompt == (5, 6) and req.stop == ("\n",) and req.max_tokens == 16 and req.temperature == 1.0
    assert req.top_k == 4 and not req.stream and req.seed is None
