"""KrakenLMConfig: the Hugging Face config of a krakenlm model exported with `krakenlm export --format hf`.

Shipped next to the weights and loaded with ``trust_remote_code=True``; it imports only the standard
library and transformers. The whole model is described by ``krakenlm``, krakenlm's own ModelConfig as a
dict; the standard fields (hidden_size, num_attention_heads, ...) are derived from it, so tools that read
them see the per-sub-layer shapes: hidden_size is the width d of one sub-layer and num_attention_heads
the heads of one sub-layer.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from transformers import PretrainedConfig

ARCHS = ("gpt", "parallel", "kraken", "ladder")
CHOICES = {"mlp": ("gelu", "swiglu"), "position": ("learned", "rope"), "norm": ("layernorm", "rmsnorm")}


@dataclass(frozen=True)
class NativeConfig:
    """krakenlm's ModelConfig fields with the shapes krakenlm derives from them (its config.py)."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_sub: int
    n_kv_head: int | None
    head_dim: int | None
    ffn_hidden: int | None
    vocab_size: int
    block_size: int
    bias: bool
    mlp: str
    position: str
    norm_eps: float
    norm: str
    rope_theta: float
    tie_embeddings: bool
    ladder_layers: int | None
    name: str = ""

    @classmethod
    def from_dict(cls, native: dict[str, Any]) -> NativeConfig:
        """Every field must be present and none unknown: a field this file does not know could change
        what the model computes, so it is refused rather than ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(native) - known)
        missing = sorted(known - set(native) - {"name"})
        if unknown or missing:
            raise ValueError(f"krakenlm config: unknown fields {unknown}, missing fields {missing} (export the model "
                             "again with this krakenlm version)")
        config = cls(**native)
        if config.arch not in ARCHS:
            raise ValueError(f"krakenlm config: arch must be one of {ARCHS}, got {config.arch!r}")
        for name, allowed in CHOICES.items():
            if getattr(config, name) not in allowed:
                raise ValueError(f"krakenlm config: {name} must be one of {allowed}, got {getattr(config, name)!r}")
        return config

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def ffn_size(self) -> int:
        """FFN hidden width: 4d, or 2d for Kraken (the paper's default), unless set."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 2 * self.n_embd if self.arch == "kraken" else 4 * self.n_embd

    @property
    def ladder_start(self) -> int:
        """First layer in ladder wiring (n_layer: none)."""
        if self.arch != "ladder":
            return self.n_layer
        return self.n_layer - (self.n_layer if self.ladder_layers is None else self.ladder_layers)


def standard_fields(native: NativeConfig) -> dict[str, Any]:
    """The Hugging Face names for the shapes of one sub-layer."""
    return {"vocab_size": native.vocab_size, "hidden_size": native.n_embd, "num_hidden_layers": native.n_layer,
            "num_attention_heads": native.n_head, "num_key_value_heads": native.kv_heads,
            "head_dim": native.head_size, "intermediate_size": native.ffn_size,
            "max_position_embeddings": native.block_size, "tie_word_embeddings": native.tie_embeddings,
            "rope_theta": native.rope_theta}


class KrakenLMConfig(PretrainedConfig):
    """``krakenlm``: krakenlm's ModelConfig as a dict, from which every other field is derived."""

    model_type = "krakenlm"

    def __init__(self, krakenlm: dict[str, Any] | None = None, use_cache: bool = True, **kwargs: Any) -> None:
        if krakenlm is not None:
            kwargs.update(standard_fields(NativeConfig.from_dict(krakenlm)))
        super().__init__(**kwargs)
        self.krakenlm = krakenlm
        self.use_cache = use_cache

    @property
    def native(self) -> NativeConfig:
        if self.krakenlm is None:
            raise ValueError("KrakenLMConfig: no krakenlm model config (the 'krakenlm' field of config.json)")
        return NativeConfig.from_dict(self.krakenlm)
