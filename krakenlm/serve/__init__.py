"""Serving: the OpenAI-compatible HTTP server over the engine (``app``, ``runner``, ``server``), its load
generator (``loadtest``) and profiler; the batching it drives is krakenlm.batching, below the engine."""
