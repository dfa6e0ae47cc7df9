import math

import numpy as np
import pytest
import torch

from krakenlm.errors import ConfigError
from krakenlm.generate import RowSampler, SamplingConfig, generate, left_pad
from krakenlm.model import Transformer
from tests.conftest import tiny

VARIANTS = {
    "gpt": tiny("gpt"),
    "gpt-gqa": tiny("gpt", n_kv_head=2),
    "gpt-mqa-rope-swiglu": tiny("gpt", n_kv_head=1, position="rope", mlp="swiglu"),
    "parallel": tiny("parallel"),
    "kraken2": tiny("kraken"),
    "kraken4": tiny("kraken", n_sub=4, n_head=1, n_embd=16),  # head size 16
    "kraken-bias": tiny("kraken", bias=True),
}


def model_for(cfg, seed=0):
    m = Transformer(cfg, init=False)
    m.reset_parameters(seed)
    return m.eval()


def cached_steps(model, idx, prefill, chunk=None):
    """Logits of idx [B, T] through a static KV cache: a prefill, an optional chunked prefill after the
    cached prefix, then one decode step per remaining token (slots and positions as device tensors)."""
    batch, total = idx.shape
    cache = model.new_cache(batch, total)
    out = [model(idx[:, :prefill], cache=cache)]
    done = prefill
    if chunk:
        out.append(model(idx[:, prefill:chunk], cache=cache, start=prefill))
        done = chunk
    for t in range(done, total):
        slots = torch.full((batch,), t)
        out.append(model.decode(idx[:, t], slots, slots, cache).unsqueeze(1))
    return torch.cat(out, 1)


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_decode_equals_full_recompute(name, rng):
    model = model_for(VARIANTS[name])
    idx = torch.randint(0, 257, (2, 40), generator=rng)
    with torch.no_grad():
        full = model(idx)
        stepped = cached_steps(model, idx, 24, chunk=30)
    assert (stepped - full).abs().max() < 1e-5


def test_a_reused_cache_row_forgets_its_previous_sequence(rng):
    """A server reuses KV rows: prefilling a new, shorter sequence into a row must hide the old keys."""
    model = model_for(VARIANTS["gpt"])
    old, new = torch.randint(0, 257, (1, 30), generator=rng), torch.randint(0, 257, (1, 12), generator=rng)
    with torch.no_grad():
        cache = model.new_cache(2, 40)
        model(old.repeat(2, 1), cache=cache)
        model(new, cache=cache.rows(1, 2))  # row 1 starts afresh; row 0 keeps its state
        slots = torch.tensor([30, 12])
        stepped = model.decode(torch.tensor([5, 5]), slots, slots, cache)
        want_new = model(torch.cat([new, torch.tensor([[5]])], 1))[0, -1]
        want_old = model(torch.cat([old, torch.tensor([[5]])], 1))[0, -1]
    assert (stepped[1] - want_new).abs().max() < 1e-5
    assert (stepped[0] - want_old).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["gpt", "kraken4", "gpt-mqa-rope-swiglu"])
def test_batched_prompts_of_different_lengths_equal_one_by_one(name, rng):
    model = model_for(VARIANTS[name])
    prompts = [torch.randint(0, 257, (n,), generator=rng).tolist() for n in (5, 17, 11)]
    together = generate(model, prompts, 12)
    for p, toks in zip(prompts, together.tokens, strict=True):
        assert generate(model, [p], 12).tokens[0] == toks
    idx, valid, pos = left_pad(prompts)
    with torch.no_grad():
        batched = model(idx, valid=valid, positions=pos, logits_at="last")
        for row, p in enumerate(prompts):
            alone = model(torch.tensor([p]), logits_at="last")
            assert (batched[row] - alone[0]).abs().max() < 1e-5


def test_greedy_generation_equals_argmax_of_full_recompute(rng):
    model = model_for(VARIANTS["kraken2"])
    prompt = torch.randint(0, 257, (9,), generator=rng).tolist()
    out = generate(model, [prompt], 16).tokens[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(16):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]


@pytest.mark.parametrize("bias", [False, True])
def test_kraken_matches_independent_reference_implementation(bias, rng):
    from krakenlm.checkpoint import _import_nanogpt
    from krakenlm.config import ModelConfig
    from tests.reference_kraken import ReferenceKraken

    ref = ReferenceKraken(n_layer=3, n_sub=3, d=24, heads_per_sub=2, vocab=97, block=64, bias=bias).eval()
    if bias:
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if p.dim() == 1 and "ln" not in name:
                    p.normal_(std=0.05)
    cfg = ModelConfig(arch="kraken", n_layer=3, n_sub=3, n_embd=24, n_head=2, vocab_size=97, block_size=64, bias=bias)
    model = Transformer(cfg, init=False)
    model.load_state_dict(_import_nanogpt({"model": ref.state_dict()}, cfg, "kraken-authors"))
    idx = torch.randint(0, 97, (2, 30), generator=rng)
    with torch.no_grad():
        assert (model.eval()(idx) - ref(idx)).abs().max() < 1e-5


def test_gpt_is_kraken_wiring_with_one_sub_layer():
    """With N = 1 the Kraken FFN input (attn + sum of previous outputs) is the GPT residual stream."""
    cfg = tiny("kraken", n_sub=1, n_head=4)
    assert cfg.n_sub == 1 and cfg.ffn_size == 2 * cfg.n_embd


def test_kraken_init_scales_residual_projections():
    cfg = tiny("kraken", n_layer=12, n_embd=256, n_sub=4, n_head=2)
    model = model_for(cfg)
    std = model.layers[0].attn.proj_weight.std().item()
    assert abs(std - 0.02 / (2 * 12 * 4) ** 0.5) < 0.0005
    assert abs(model.layers[0].attn.qkv_weight.std().item() - 0.02) < 0.001


def sample(logits, config, rows=None, vocab_limit=None):
    return RowSampler([config] * (rows or logits.shape[0]), torch.device("cpu"), vocab_limit, shared_seed=True)(logits)


def test_sampling_top_k_top_p_and_seed():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]]).repeat(200, 1)
    assert set(sample(logits, SamplingConfig(temperature=1.0, top_k=1)).tolist()) == {4}
    spread = torch.tensor([[1.0, 1.0, 1.0, 1.0]]).log().repeat(400, 1)
    picked = sample(spread, SamplingConfig(temperature=1.0, top_p=0.5, seed=0))
    assert len(set(picked.tolist())) == 2  # two of four equally likely tokens reach p = 0.5
    a = sample(spread, SamplingConfig(temperature=1.0, seed=7))
    assert torch.equal(a, sample(spread, SamplingConfig(temperature=1.0, seed=7)))
    assert len(set(a.tolist())) == 4
    counts = torch.bincount(sample(torch.tensor([[0.0, 2.0]]).repeat(4000, 1), SamplingConfig(temperature=1.0)))
    assert abs(counts[1].item() / 4000 - 1 / (1 + math.exp(-2.0))) < 0.03  # draws follow softmax(logits)


def test_sampling_never_picks_ids_the_tokenizer_cannot_decode():
    logits = torch.zeros(300, 10)
    logits[:, 8:] = 5.0  # the two padded ids are the most likely
    assert sample(logits, SamplingConfig(), vocab_limit=8).max() < 8  # greedy
    assert sample(logits, SamplingConfig(temperature=2.0), vocab_limit=8).max() < 8


def test_rows_with_their_own_sampling_parameters():
    """A server batch mixes greedy and seeded rows; each row samples as it would alone."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    configs = [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=5, seed=1),
               SamplingConfig(temperature=1.3, seed=2)]
    mixed = RowSampler(configs, torch.device("cpu"))(logits)
    for row, config in enumerate(configs):
        assert mixed[row] == RowSampler([config], torch.device("cpu"))(logits[row:row + 1])[0]


def inverse_cdf(probs, generator):
    """A categorical draw written out plainly (numpy): the first id whose cumulative probability exceeds a
    float64 uniform from ``generator`` times the total."""
    u = torch.rand(1, dtype=torch.float64, generator=generator).item()
    cdf = np.cumsum(probs.double().numpy())
    return int(np.searchsorted(cdf, u * cdf[-1], side="right"))


def test_draws_follow_the_distribution():
    """The sampler's draws are the distribution's: 40k seeded draws of a 6-way softmax within 1% of it."""
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, float("-inf"), 0.5]])
    sampler = RowSampler([SamplingConfig(temperature=1.0, seed=0)], torch.device("cpu"))
    counts = np.bincount([sampler(logits.clone()).item() for _ in range(40000)], minlength=6) / 40000
    np.testing.assert_allclose(counts, logits.softmax(-1)[0].numpy(), atol=0.01)
    assert counts[4] == 0


def test_unfiltered_rows_draw_from_the_plain_softmax():
    """Rows without top-k / top-p sample softmax(logits / temperature) itself (no vocabulary sort), one
    seeded generator per row: the draws of inverting that distribution's CDF at the row's uniforms."""
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * 3
    configs = [SamplingConfig(temperature=t, seed=s) for t, s in ((0.7, 1), (1.0, 2), (1.3, 3), (2.0, 4))]
    sampler = RowSampler(configs, torch.device("cpu"))
    assert sampler.unfiltered and not RowSampler([SamplingConfig(temperature=1.0, top_p=0.9)], torch.device("cpu"))\
        .unfiltered
    generators = [torch.Generator().manual_seed(c.seed) for c in configs]
    for _ in range(5):  # the generators carry on from draw to draw
        got = sampler(logits)
        want = [inverse_cdf(((row - row.max()) / c.temperature).softmax(-1), g)
                for row, c, g in zip(logits, configs, generators, strict=True)]
        assert got.tolist() == want


@pytest.mark.parametrize("bad", [dict(top_k=2.5), dict(temperature="1"), dict(temperature=float("nan")),
                                 dict(top_p=0.0), dict(top_k=True), dict(seed=1.5)])
def test_bad_sampling_parameters_are_refused_with_the_field_named(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        SamplingConfig(**bad)


def test_seeded_sampling_generation_is_reproducible(rng):
    model = model_for(VARIANTS["gpt"])
    cfg = SamplingConfig(temperature=0.9, top_k=50, top_p=0.9, seed=3)
    assert generate(model, [[1, 2, 3]], 10, cfg).tokens == generate(model, [[1, 2, 3]], 10, cfg).tokens


@pytest.mark.parametrize("name", ["gpt-gqa", "kraken-bias", "kraken4"])
def test_padding_heads_is_exact(name, rng):
    model = model_for(VARIANTS[name])
    idx = torch.randint(0, 257, (2, 20), generator=rng)
    with torch.no_grad():
        want = model(idx)
        model.pad_heads(64)
        assert model.attention_shape.stored_size == 64
        assert (model(idx) - want).abs().max() < 1e-5
        assert (cached_steps(model, idx, 12) - want).abs().max() < 1e-5


LADDER_CASES = {"gelu-layernorm-bias": dict(bias=True), "swiglu-rmsnorm": dict(mlp="swiglu", norm="rmsnorm"),
                "hybrid-last-2-of-4": dict(ladder_layers=2), "no-ladder-layers": dict(ladder_layers=0)}


@pytest.mark.parametrize("case", LADDER_CASES)
def test_ladder_matches_independent_reference_implementation(case, rng):
    from krakenlm.config import ModelConfig
    from tests.reference_ladder import ReferenceLadder

    kw = LADDER_CASES[case]
    torch.manual_seed(0)
    ref = ReferenceLadder(4, 32, 4, 97, 64, **kw).eval()
    with torch.no_grad():  # random norms and biases too, so a mis-wired one cannot hide
        for p in ref.parameters():
            p.normal_(std=0.3 if p.dim() == 1 else 0.1)
    cfg = ModelConfig(arch="ladder", n_layer=4, n_embd=32, n_head=4, vocab_size=97, block_size=64, **kw)
    model = Transformer(cfg, init=False)
    model.load_state_dict(ref.native_state())
    idx = torch.randint(0, 97, (2, 30), generator=rng)
    with torch.no_grad():
        assert (model.eval()(idx) - ref(idx)).abs().max() < 1e-5
        assert (cached_steps(model, idx, 17) - ref(idx)).abs().max() < 1e-5


def test_ladder_differs_from_gpt_unless_no_layer_is_ladder(rng):
    """Same weights: a ladder model with ladder_layers=0 is exactly the gpt; any ladder layer changes it."""
    gpt = model_for(tiny("gpt", n_layer=4))
    idx = torch.randint(0, 257, (2, 20), generator=rng)
    with torch.no_grad():
        want = gpt(idx)
        for k, same in ((0, True), (1, False), (None, False)):
            ladder = Transformer(gpt.config.replace(arch="ladder", ladder_layers=k), init=False)
            ladder.load_state_dict(gpt.state_dict())
            assert ((ladder.eval()(idx) - want).abs().max() < 1e-6) == same, k


def _reference_sample(logits, config, generator):
    """The sampling rule written out plainly: temperature, top-k by the k-th value (ties kept), top-p
    on what is left, one inverse-CDF draw per row from the generator."""
    logits = logits.float() / config.temperature
    if config.top_k is not None:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= config.top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.tensor([inverse_cdf(row, generator) for row in logits.softmax(dim=-1)])


@pytest.mark.parametrize("config", [SamplingConfig(temperature=0.8, seed=5),
                                    SamplingConfig(temperature=1.1, top_k=7, seed=6),
                                    SamplingConfig(temperature=0.9, top_p=0.8, seed=7),
                                    SamplingConfig(temperature=1.0, top_k=20, top_p=0.9, seed=8)])
def test_device_sampling_equals_the_plain_rule(config):
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(3)) * 3
    want = _reference_sample(logits, config, torch.Generator().manual_seed(config.seed))
    assert torch.equal(sample(logits, config), want)


def test_top_p_below_float32_range_keeps_the_most_likely_token():
    """1e-300 is a valid top_p but rounds to 0 in float32: the first token must still stay (it was a NaN draw)."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 4
    got = sample(logits, SamplingConfig(temperature=1e30, top_p=1e-300, seed=1))
    assert torch.equal(got, (logits / 1e30).argmax(-1))


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-30])
def test_temperature_below_float32_range_is_greedy_not_nan(temperature):
    """1e-300 rounds to 0 in float32 and 1e-40 divides logits to inf: both must sample the argmax."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2)) * 4
    got = sample(logits, SamplingConfig(temperature=temperature, seed=3))
    assert torch.equal(got, logits.argmax(-1))
