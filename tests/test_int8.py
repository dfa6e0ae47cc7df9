"""int8 weight-only quantization: per-output-channel symmetric weights, every matmul, both kernels.

Tolerances: against the model whose weights are the dequantized int8 values (q * scale), the int8
kernels differ only in where the scale is applied and in summation order: 1e-4 absolute on fp32 logits;
with bf16 activations both sides round the same products to bf16 at different points: 2% of the
largest logit. Layouts with int8 equal the one-device int8 model in tests/test_layouts.py.
"""

import pytest
import torch
from torch import nn

from krakenlm.config import ModelConfig
from krakenlm.data import prepare
from krakenlm.engine import Engine, EngineOptions
from krakenlm.errors import ConfigError
from krakenlm.generate import left_pad
from krakenlm.model.quant import Int8Weight, check_shapes, int8_mm, kernel_for, quantize, quantize_model
from krakenlm.presets import get_preset
from krakenlm.source import ModelSource, build_model
from krakenlm.train import TrainConfig, perplexity, train
from tests.conftest import tiny

PROMPTS = [list(range(3, 23)), list(range(40, 53))]


def dequantized_reference(config: ModelConfig, dtype: torch.dtype) -> nn.Module:
    """The float model whose every quantized weight is replaced by q * scale (computed independently)."""
    model = build_model(config=config, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("qkv_weight", "proj_weight", "up_weight", "down_weight", "conj_weight", "wte.weight",
                              "wpe.weight")):
                w = p.float()
                scale = w.abs().amax(-1, keepdim=True) / 127
                p.copy_(torch.round(w / scale).clamp(-127, 127) * scale.to(dtype).float())
    return model.to(dtype)


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 0.02)])
@pytest.mark.parametrize("arch", ["gpt", "kraken"])
def test_int8_logits_equal_the_dequantized_weights(arch, dtype, tol):
    config = tiny(arch, n_layer=2, position="rope" if arch == "gpt" else "learned",
                  mlp="swiglu" if arch == "gpt" else "gelu")
    engine = Engine(ModelSource(config=config, seed=0), EngineOptions(dtype=dtype, quantize="int8"), local=True)
    ref = dequantized_reference(config, engine.dtype)
    assert isinstance(engine.model.layers[0].attn.qkv_weight, Int8Weight)
    idx, valid, pos = left_pad(PROMPTS)
    with torch.inference_mode():
        cache, ref_cache = engine.new_cache(2, 40), ref.new_cache(2, 40)
        a = engine.forward(idx, cache=cache, valid=valid, positions=pos).float()
        b = ref(idx, cache=ref_cache, valid=valid, positions=pos).float()
        scale = 1.0 if dtype == "fp32" else b.abs().max().item()
        assert (a - b).abs().max().item() <= tol * scale
        token, slots, nxt = b[:, -1].argmax(-1), torch.full((2,), idx.shape[1]), pos[:, -1] + 1
        for _ in range(4):  # one-row decode steps take the int8pack kernel in bf16
            a = engine.decode_step(token, slots, nxt, cache).float()
            b = ref.decode(token, slots, nxt, ref_cache).float()
            assert (a - b).abs().max().item() <= tol * scale
            token, slots, nxt = b.argmax(-1), slots + 1, nxt + 1


def test_both_kernels_compute_the_same_product():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 48, generator=gen)  # in = 48: a multiple of 16 (SHAPE_RULES)
    q, scale = quantize(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert (q.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-6  # round to nearest
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x = torch.randn(3, 48, generator=gen).to(dtype)
        exact = x.double() @ (q.double() * scale.to(dtype).double()[:, None]).T
        for kernel in ("dequant", "int8pack"):
            if kernel == "int8pack" and dtype == torch.float32:
                continue  # the CPU kernel's fp32 path is a reference loop: int8_mm never picks it
            got = int8_mm(x, q, scale.to(dtype), kernel=kernel).double()
            assert ((got - exact).abs().max() / exact.abs().max()).item() <= tol, (kernel, dtype)
    assert kernel_for("cpu", torch.bfloat16, 1) == "int8pack"
    assert kernel_for("cpu", torch.bfloat16, 64) == "dequant" and kernel_for("cpu", torch.float32, 1) == "dequant"


def test_int8_weights_take_at_most_027_of_fp32_scales_included():
    config = get_preset("mini-gpt")
    sizes = {}
    for quant in (None, "int8"):
        engine = Engine(ModelSource(config=config, seed=0), EngineOptions(quantize=quant), local=True)
        sizes[quant] = sum(t.numel() * t.element_size() for t in engine.model.state_dict().values())
        assert sizes[quant] == engine.held[0]
    assert sizes[None] == config.num_params() * 4
    assert sizes["int8"] <= 0.27 * sizes[None], sizes["int8"] / sizes[None]


def test_int8_shapes_a_kernel_refuses_are_refused_at_start_up():
    config = tiny("gpt", n_embd=40, n_head=4)  # in = 40: the CPU's bf16 int8 kernel needs a multiple of 16
    check_shapes(quantize_model(build_model(config=config)), "cpu", torch.float32)  # fp32 never takes it
    with pytest.raises(ConfigError, match=r"cpu for bfloat16 needs in % 16 == 0; wte.weight is 257 x 40"):
        Engine(ModelSource(config=config), EngineOptions(dtype="bf16", quantize="int8"), local=True)
    with pytest.raises(ConfigError, match=r"mps for bfloat16 needs out % 32 == 0; wte.weight is 257 x 48"):
        check_shapes(quantize_model(build_model(config=tiny("gpt", n_embd=48, n_head=4))), "mps", torch.bfloat16)
    with pytest.raises(ConfigError, match="quantize"):
        EngineOptions(quantize="int4")


def test_int8_perplexity_of_a_trained_model_is_within_1_percent_of_bf16(tmp_path):
    """A small byte-level gpt trained briefly on the bundled Shakespeare corpus (the longer run is
    benchmarks/int8_quality.py)."""
    data = tmp_path / "data"
    prepare(data, tokenizer="bytes", val_fraction=0.05)
    config = ModelConfig(arch="gpt", n_layer=2, n_embd=64, n_head=4, vocab_size=257, block_size=64)
    train(TrainConfig(data=str(data), out=str(tmp_path / "run"), steps=150, lr=3e-3, warmup_steps=10, batch_size=16,
                      block_size=64, eval_interval=150, eval_windows=8, checkpoint_interval=150, seed=0),
          config, progress=False)
    ppl = {}
    for quant in (None, "int8"):
        engine = Engine(ModelSource(checkpoint=str(tmp_path / "run" / "latest")),
                        EngineOptions(dtype="bf16", quantize=quant), local=True)
        with torch.inference_mode():
            ppl[quant] = perplexity(engine.model, data, block_size=64, num_windows=64, batch_size=16)
    assert ppl[None] < 20  # it learned something (a uniform byte model has 257)
    assert abs(ppl["int8"] / ppl[None] - 1) <= 0.01, ppl  # measured: 13.917 vs 13.919 (+0.02%)
