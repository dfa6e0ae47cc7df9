"""vLLM general plugin (entry point ``vllm.general_plugins``): makes ``vllm serve OUT`` serve a
``krakenlm export --format hf`` directory, no ``--trust-remote-code`` needed.

vLLM calls ``register`` in every process it starts (front end, engine core, workers). Everything is
imported inside it and the model class is registered by name, so importing krakenlm never imports
vLLM, and vLLM imports the model only where it builds one.
"""

from __future__ import annotations

ARCHITECTURE = "KrakenLMForCausalLM"
MODEL_CLASS = "krakenlm.interop.vllm_model:KrakenLMForCausalLM"


def register() -> None:
    """Register the config class with transformers and the model class with vLLM (idempotent)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from krakenlm.interop.hf_config import MODEL_TYPE, KrakenLMConfig

    AutoConfig.register(MODEL_TYPE, KrakenLMConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
