"""The transformers config class of an exported krakenlm model (``model_type: krakenlm``).

Registered with ``AutoConfig`` by the vLLM plugin, so ``vllm serve OUT`` reads the export's
config.json without ``--trust-remote-code``. The native config travels whole under ``krakenlm``.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from krakenlm.config import ModelConfig

MODEL_TYPE = "krakenlm"


class KrakenLMConfig(PretrainedConfig):
    """HF view of a native ModelConfig. vLLM sizes tensor parallelism by the heads of the *whole*
    model (a TP degree must divide them), so heads are reported over all Kraken sub-layers:
    n_head * n_sub query heads; each rank's own count comes from the plan, not from here."""

    model_type = MODEL_TYPE

    def __init__(self, krakenlm: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.krakenlm = krakenlm or {}
        if self.krakenlm:
            cfg = ModelConfig.from_dict(dict(self.krakenlm))
            kwargs.update(
                vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.total_heads, num_key_value_heads=cfg.kv_heads * cfg.n_sub,
                head_dim=cfg.head_size, max_position_embeddings=cfg.block_size,
                tie_word_embeddings=cfg.tie_embeddings)
            if cfg.position == "rope":
                kwargs.update(rope_theta=cfg.rope_theta)
            else:  # vLLM treats any RoPE field as RoPE, and refuses an odd head size (Kraken 125M's 113) for it
                for field in ("rope_theta", "rope_parameters", "rope_scaling"):
                    kwargs.pop(field, None)
        super().__init__(**kwargs)

    def native(self) -> ModelConfig:
        """The krakenlm ModelConfig this export was written from."""
        return ModelConfig.from_dict(dict(self.krakenlm))
