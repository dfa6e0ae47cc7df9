"""Interoperability with other runtimes: Hugging Face transformers directories (hf_export) and the vLLM
plugin (vllm_plugin, vllm_model) that serves them. Nothing here is imported by krakenlm itself, so
importing krakenlm never imports vLLM or transformers."""
