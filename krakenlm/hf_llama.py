"""Hugging Face Llama checkpoints (config.json + model.safetensors, or shards with
model.safetensors.index.json, as transformers writes them) read as krakenlm models.

A Llama block is a gpt block with RMSNorm, RoPE (half-split rotation, as HF stores q/k), SwiGLU,
GQA and usually an untied LM head, so the weights map one to one: q/k/v are fused into one QKV
matrix and gate/up into one up matrix. A tensor-parallel rank reads only its slices, straight from
the safetensors files, also through the fused tensors. Anything this runtime would compute
differently (RoPE scaling, biases, another activation) is refused with the field named.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from krakenlm.config import ModelConfig
from krakenlm.errors import CheckpointError, ConfigError
from krakenlm.jsonio import read_json
from krakenlm.model import Shard
from krakenlm.model.params import foreign, foreign_state, strip_foreign, tied_names
from krakenlm.model.sharding import shard_ranges, take

INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"

def _refuse(field: str, message: str) -> CheckpointError:
    return CheckpointError(f"HF Llama config.json: {field}: {message}")


def _rope(doc: dict[str, Any]) -> float:
    """RoPE base from ``rope_theta`` + ``rope_scaling`` (transformers 4) or ``rope_parameters`` (5)."""
    params = doc.get("rope_parameters")
    field = "rope_parameters" if params is not None else "rope_scaling"
    scaling = params if params is not None else doc.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise _refuse(field, f"expected an object, got {scaling!r}")
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind != "default":
        raise _refuse(field, f"RoPE scaling type {kind!r} is not implemented (only plain RoPE, 'default')")
    theta = (params or {}).get("rope_theta", doc.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise _refuse("rope_theta", f"must be a positive number, got {theta!r}")
    return float(theta)


def _check_blocks(doc: dict[str, Any]) -> None:
    """Refuse what a krakenlm Llama block would compute differently."""
    if doc.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", f"{doc['hidden_act']!r} is not supported (Llama's SwiGLU uses 'silu')")
    for name in ("attention_bias", "mlp_bias"):
        if doc.get(name, False):
            raise _refuse(name, "biases in Llama projections are not supported")
    arch = doc.get("architectures")
    if arch is not None and "LlamaForCausalLM" not in arch:
        raise _refuse("architectures", f"{arch} has no causal LM head (need LlamaForCausalLM)")


def _int(doc: dict[str, Any], name: str, default: int | None = None) -> int:
    value = doc.get(name, default)
    if value is None:
        raise _refuse(name, "missing")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _refuse(name, f"must be a positive integer, got {value!r}")
    return value


def llama_config(doc: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of an HF Llama config.json (arch gpt); CheckpointError naming the HF field."""
    _check_blocks(doc)
    d, heads = _int(doc, "hidden_size"), _int(doc, "num_attention_heads")
    kv = _int(doc, "num_key_value_heads", heads)
    if heads % kv:
        raise _refuse("num_key_value_heads", f"num_attention_heads={heads} is not a multiple of {kv}")
    head_dim = doc.get("head_dim")
    if head_dim is None and d % heads:
        raise _refuse("num_attention_heads", f"hidden_size={d} is not divisible by {heads} and head_dim is unset")
    head_dim = _int(doc, "head_dim", d // heads)
    eps = doc.get("rms_norm_eps", 1e-6)
    try:
        return ModelConfig(arch="gpt", n_layer=_int(doc, "num_hidden_layers"), n_embd=d, n_head=heads,
                           n_kv_head=kv, head_dim=None if head_dim * heads == d else head_dim,
                           ffn_hidden=_int(doc, "intermediate_size"), vocab_size=_int(doc, "vocab_size"),
                           block_size=_int(doc, "max_position_embeddings", 2048), bias=False, mlp="swiglu",
                           position="rope", norm="rmsnorm", norm_eps=eps, rope_theta=_rope(doc),
                           tie_embeddings=bool(doc.get("tie_word_embeddings", False)))
    except ConfigError as err:
        raise CheckpointError(f"HF Llama config.json: {err}") from err


def _weight_files(path: Path) -> dict[str, str]:
    """HF tensor name -> the safetensors file holding it (one file, or the shards of the index)."""
    index = path / INDEX_FILE
    if index.exists():
        doc = read_json(index, "safetensors index", CheckpointError)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must be an object")
        return {str(k): str(v) for k, v in weight_map.items()}
    if not (path / WEIGHTS_FILE).exists():
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors HF checkpoints are read; "
                              "pickled pytorch_model.bin files are refused)")
    return dict.fromkeys(_keys(path / WEIGHTS_FILE), WEIGHTS_FILE)


def _keys(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: unreadable or truncated safetensors file ({err})") from err


class _Concat:
    """Slices of HF tensors joined along their first dim, read without materialising the whole."""

    def __init__(self, parts: list[Any], stacked: bool) -> None:
        self.parts, self.stacked = parts, stacked
        self.sizes = [p.get_shape()[0] for p in parts]

    def shape(self) -> tuple[int, ...]:
        rest = tuple(self.parts[0].get_shape()[1:])
        return ((1,) if self.stacked else ()) + (sum(self.sizes),) + rest

    def read(self, index: tuple[slice, ...]) -> Tensor:
        if self.stacked:
            index = index[1:]  # the native stream dimension (one stream) is not in the HF tensor
        a, b = index[0].start, index[0].stop
        pieces, offset = [], 0
        for part, size in zip(self.parts, self.sizes, strict=True):
            lo, hi = max(a, offset), min(b, offset + size)
            if lo < hi:
                pieces.append(part[(slice(lo - offset, hi - offset), *index[1:])])
            offset += size
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return out.unsqueeze(0) if self.stacked else out


def read_llama(path: Path, config: ModelConfig, shard: Shard,
               expected: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """This shard's native state dict from an HF Llama directory (each rank reads only its slices)."""
    files = _weight_files(path)
    sources = foreign(config, "hf-llama")  # the names and the q|k|v, gate|up fusion: krakenlm.model.params
    wanted = {hf for source in sources for hf in source.parts[0]}
    missing = sorted(wanted - set(files))
    extra = sorted(set(strip_foreign(sorted(set(files) - wanted), "hf-llama")) - set(tied_names(config, "hf-llama")))
    if missing or extra:
        raise CheckpointError(f"{path}: tensors do not match config.json: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    state = {}
    with contextlib.ExitStack() as stack:
        try:
            handles = {f: stack.enter_context(safe_open(str(path / f), framework="pt")) for f in set(files.values())}
            for source in sources:
                native, parts = source.native.name, source.parts[0]  # Llama has one sub-layer
                joined = _Concat([handles[files[hf]].get_slice(hf) for hf in parts], source.native.param.stacked)
                if joined.shape() != expected[native]:
                    raise CheckpointError(f"{path}: {' + '.join(parts)} has shape {joined.shape()}, config.json "
                                          f"needs {expected[native]} (as {native})")
                state[native] = take(joined.read, shard_ranges(native, expected[native], config, shard))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({err})") from err
    return state


# Export: the inverse mapping ----------------------------------------------------------------------------
def llama_shaped(config: ModelConfig) -> bool:
    """Whether LlamaForCausalLM computes exactly this model: a gpt model with RMSNorm, RoPE, SwiGLU and no
    biases (any GQA/MQA, head size, FFN width, RoPE base and head tying)."""
    return (config.arch == "gpt" and config.norm == "rmsnorm" and config.position == "rope"
            and config.mlp == "swiglu" and not config.bias)


def llama_state(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """A Llama-shaped model's native state dict under the HF Llama names (q|k|v and gate|up split apart)."""
    return {name: t.contiguous() for name, t in foreign_state(state, config, "hf-llama").items()}


def llama_hf_config(config: ModelConfig) -> dict[str, Any]:
    """config.json of a Llama-shaped model, as LlamaConfig writes it (RoPE base under both the transformers 4
    and 5 names)."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": config.vocab_size,
            "hidden_size": config.n_embd, "intermediate_size": config.ffn_size, "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head, "num_key_value_heads": config.kv_heads,
            "head_dim": config.head_size, "max_position_embeddings": config.block_size,
            "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "attention_dropout": 0.0}
