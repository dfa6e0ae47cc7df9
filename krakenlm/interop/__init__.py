"""Interoperability with other runtimes: Hugging Face transformers directories (hf_export)."""
