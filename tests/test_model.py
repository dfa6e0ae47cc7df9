import pytest
import torch

from krakenlm.generate import SamplingConfig, generate, left_pad, sample
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


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_decode_equals_full_recompute(name, rng):
    model = model_for(VARIANTS[name])
    idx = torch.randint(0, 257, (2, 40), generator=rng)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, 40)
        chunks = [model(idx[:, :24], cache=cache)]  # prefill
        chunks.append(model(idx[:, 24:30], cache=cache))  # chunked prefill after a cached prefix
        chunks += [model(idx[:, t:t + 1], cache=cache) for t in range(30, 40)]  # decode
    assert (torch.cat(chunks, 1) - full).abs().max() < 1e-5


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


def test_sampling_top_k_top_p_and_seed():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]]).repeat(200, 1)
    assert set(sample(logits, SamplingConfig(temperature=1.0, top_k=1)).tolist()) == {4}
    spread = torch.tensor([[1.0, 1.0, 1.0, 1.0]]).log().repeat(400, 1)
    picked = sample(spread, SamplingConfig(temperature=1.0, top_p=0.5), torch.Generator().manual_seed(0))
    assert len(set(picked.tolist())) == 2  # two of four equally likely tokens reach p = 0.5
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = sample(spread, SamplingConfig(temperature=1.0), g1)
    assert torch.equal(a, sample(spread, SamplingConfig(temperature=1.0), g2))
    assert len(set(a.tolist())) == 4


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
        cache = model.new_cache(2, 20)
        steps = [model(idx[:, :12], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(12, 20)]
    assert (torch.cat(steps, 1) - want).abs().max() < 1e-5
