"""Serving krakenlm checkpoints with other runtimes (vLLM). Nothing here is imported by krakenlm itself,
so importing krakenlm never imports vLLM or transformers."""
