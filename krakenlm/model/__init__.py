"""Model definitions: one Transformer for gpt, parallel-block and Kraken (see transformer.py)."""

from krakenlm.model.layers import KVCache
from krakenlm.model.transformer import LOCAL, Comm, LocalComm, Shard, Transformer

__all__ = ["LOCAL", "Comm", "KVCache", "LocalComm", "Shard", "Transformer"]
