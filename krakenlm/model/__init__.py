"""Model definitions: one Transformer for gpt, parallel-block and Kraken (see transformer.py)."""

from krakenlm.model.layers import KVCache
from krakenlm.model.sharding import Shard
from krakenlm.model.transformer import LOCAL, Comm, LocalComm, Transformer

__all__ = ["LOCAL", "Comm", "KVCache", "LocalComm", "Shard", "Transformer"]
