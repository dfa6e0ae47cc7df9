"""Named model configurations, as data: the Kraken paper's models, GPT-2, the latency-study shapes
(GPT-3-like 1.3B-175B as gpt, parallel, ladder, Kraken 4-way and 8-way at equal parameters per layer),
Ladder Residual at GPT-2 124M, Llama 3 8B (standard and ladder), PaLM and MT-NLG shapes for the cost
model, and small models for demos and tests."""

from __future__ import annotations

from krakenlm.config import ModelConfig, size_kraken
from krakenlm.errors import ConfigError


def _kraken(name: str, n_layer: int, total_heads: int, n_sub: int, d: int) -> ModelConfig:
    return ModelConfig(name=name, arch="kraken", n_layer=n_layer, n_embd=d, n_head=total_heads // n_sub,
                       n_sub=n_sub, vocab_size=50304, block_size=1024, bias=False)


def _paper_models() -> list[ModelConfig]:
    """The paper's six Kraken models (d as released; see size_kraken for the rule that reproduces them) and
    the GPT-2 family, exactly the Hugging Face layout (biases, vocab 50257) so checkpoints interoperate."""
    models = [_kraken(name, layers, heads, n_sub, d) for name, layers, heads, n_sub, d in [
        ("kraken-125m-2way", 12, 12, 2, 678),
        ("kraken-125m-4way", 12, 12, 4, 504),
        ("kraken-125m-6way", 12, 12, 6, 418),
        ("kraken-350m-2way", 24, 16, 2, 888),
        ("kraken-350m-4way", 24, 16, 4, 644),
        ("kraken-760m-4way", 24, 16, 4, 960),
    ]]
    gpt2 = [ModelConfig(name=name, arch="gpt", n_layer=layers, n_embd=d, n_head=heads, vocab_size=50257,
                        block_size=1024, bias=True)
            for name, layers, d, heads in [("gpt2-124m", 12, 768, 12), ("gpt2-350m", 24, 1024, 16),
                                           ("gpt2-774m", 36, 1280, 20)]]
    return models + gpt2 + [gpt2[0].replace(arch="ladder", name="ladder-124m")]  # the same weights, ladder wiring


def _latency_study_models() -> list[ModelConfig]:
    """GPT-3 Table 2.1 shapes (65B is the LLaMA-65B shape), their Kraken variants keeping the total head count and
    the matmul parameters per layer (12 d^2); PaLM (multiquery, parallel, SwiGLU, RoPE) and MT-NLG shapes."""
    models = []
    for size, layers, d, heads in [("1.3b", 24, 2048, 16), ("6.7b", 32, 4096, 32), ("13b", 40, 5120, 40),
                                   ("65b", 80, 8192, 64), ("175b", 96, 12288, 96)]:
        common = dict(n_layer=layers, vocab_size=50304, block_size=2048, bias=False)
        models += [ModelConfig(name=f"{arch}-{size}", arch=arch, n_embd=d, n_head=heads, **common)
                   for arch in ("gpt", "parallel", "ladder")]
        for n_sub in (4, 8):
            sized = size_kraken(12 * d * d, layers, heads, n_sub, per_layer=True)
            models.append(ModelConfig(name=f"kraken{n_sub}-{size}", arch="kraken", n_embd=sized.n_embd,
                                      n_head=sized.n_head, n_sub=n_sub, **common))
    for name, layers, e, heads in [("palm-8b", 32, 4096, 16), ("palm-62b", 64, 8192, 32),
                                   ("palm-540b", 118, 18432, 48)]:
        models.append(ModelConfig(name=name, arch="parallel", n_layer=layers, n_embd=e, n_head=heads, n_kv_head=1,
                                  head_dim=256, ffn_hidden=4 * e, mlp="swiglu", position="rope", vocab_size=256000,
                                  block_size=2048, bias=False))
    return models + [ModelConfig(name="mt-nlg-530b", arch="gpt", n_layer=105, n_embd=20480, n_head=128,
                                 head_dim=160, vocab_size=51200, block_size=2048, bias=True)]


def _llama_models() -> list[ModelConfig]:
    """Llama 3 8B (RMSNorm, RoPE base 500000, SwiGLU, GQA 32/8, untied head) and its ladder twin, the shape the
    Ladder paper adapts; tiny-llama has the same blocks at test size."""
    llama = dict(norm="rmsnorm", position="rope", mlp="swiglu", rope_theta=500000.0, tie_embeddings=False,
                 bias=False)
    eight_b = ModelConfig(name="llama-3-8b", arch="gpt", n_layer=32, n_embd=4096, n_head=32, n_kv_head=8,
                          ffn_hidden=14336, vocab_size=128256, block_size=8192, **llama)
    return [eight_b, eight_b.replace(arch="ladder", name="ladder-llama-3-8b"),
            ModelConfig(name="tiny-llama", arch="gpt", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=128,
                        vocab_size=512, block_size=256, **llama)]


def _small_models() -> list[ModelConfig]:
    """The end-to-end demo and quick experiments on a CPU (GPT-2 BPE vocabulary): the quality comparison's
    architectures at mini-gpt's size, Kraken sized to its parameter budget."""
    mini = ModelConfig(name="mini-gpt", arch="gpt", n_layer=4, n_embd=192, n_head=6, vocab_size=50304,
                       block_size=256)
    models = [mini] + [mini.replace(arch=arch, name=f"mini-{arch}") for arch in ("parallel", "ladder")]
    for n_sub in (2, 4):
        sized = size_kraken(mini.num_params(), 4, 6 if n_sub == 2 else 8, n_sub, block_size=256)
        models.append(_kraken(f"mini-kraken-{n_sub}way", 4, sized.n_head * n_sub, n_sub, sized.n_embd)
                      .replace(block_size=256))
    return models


def _build() -> dict[str, ModelConfig]:
    return {cfg.name: cfg for group in (_paper_models(), _latency_study_models(), _llama_models(), _small_models())
            for cfg in group}


PRESETS: dict[str, ModelConfig] = _build()


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"preset: unknown preset {name!r}; available: {', '.join(PRESETS)}") from None
