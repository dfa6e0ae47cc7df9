"""Ledgers: what one rank moved and held during forwards, in the cost model's units.

Every collective a rank issues is one entry: kind, the ranks of its group, and D bytes per rank (the
cost model's convention, krakenlm.costmodel.collectives: the output of an all-gather, the input of a
reduce-scatter, all-reduce or all-to-all); ``volume`` counts an all-reduce twice (a reduce-scatter plus
an all-gather), as the cost model's comm_bytes_per_chip does. A collective over one rank is never
issued and never recorded. ``layer`` is the layer index, or -1 for the embedding / LM head.

``tensor`` says what moved: "act" (activations), "weight" (weight-gathered layouts' weights) or
"stats" (2D's layer-norm statistics: two float32 per token per pair over x, which the cost model does
not price). Memory: ``weights_bytes`` all the weights a rank stores (int8 values and their scales
included), ``replicated_bytes`` the part every rank keeps whole (embeddings, norms, out-projection
biases), ``kv_bytes`` the KV cache the last forward used.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from krakenlm.config import ModelConfig
from krakenlm.costmodel.estimator import Layout as CostLayout
from krakenlm.costmodel.estimator import Workload, phase_estimate, weights_per_chip
from krakenlm.costmodel.hardware import load_hardware
from krakenlm.costmodel.layouts import kv_cache_bytes_per_chip


@dataclass(frozen=True)
class Collective:
    """One collective issued by this rank."""

    kind: str  # all_gather | reduce_scatter | all_reduce | all_to_all
    group: tuple[int, ...]
    nbytes: int
    site: str
    layer: int = -1
    tensor: str = "act"

    @property
    def volume(self) -> int:
        return 2 * self.nbytes if self.kind == "all_reduce" else self.nbytes


@dataclass
class Ledger:
    """Collectives and memory of one rank over the forwards recorded."""

    collectives: list[Collective] = field(default_factory=list)
    weights_bytes: int = 0
    replicated_bytes: int = 0
    kv_bytes: int = 0

    def record(self, kind: str, group: tuple[int, ...], nbytes: int, site: str, layer: int = -1,
               tensor: str = "act") -> None:
        self.collectives.append(Collective(kind, group, nbytes, site, layer, tensor))

    def layer_volume(self, tensors: tuple[str, ...] = ("act", "weight")) -> int:
        """Bytes the layers moved (what the cost model's comm_bytes_per_chip counts)."""
        return sum(c.volume for c in self.collectives if c.layer >= 0 and c.tensor in tensors)

    def volume(self, tensor: str) -> int:
        return sum(c.volume for c in self.collectives if c.tensor == tensor)

    def per_layer(self, layer: int = 0) -> list[tuple[str, str, int]]:
        """(kind, site, bytes) of one layer's collectives, in issue order."""
        return [(c.kind, c.site, c.nbytes) for c in self.collectives if c.layer == layer]

    def counts(self) -> Counter[str]:
        return Counter(c.kind for c in self.collectives if c.layer >= 0)

    def to_dict(self) -> dict[str, Any]:
        return {"collectives": [c.__dict__ | {"group": list(c.group)} for c in self.collectives],
                "weights_bytes": self.weights_bytes, "replicated_bytes": self.replicated_bytes,
                "kv_bytes": self.kv_bytes, "layer_volume": self.layer_volume(),
                "stats_volume": self.volume("stats")}


def predicted(config: ModelConfig, layout: str, tp: int, batch: int, prompt: int, phase: str, dtype: str = "fp32",
              cache_len: int | None = None) -> dict[str, float]:
    """The cost model's per-chip bytes for one forward of ``phase`` under ``layout`` (one phase's string, e.g.
    "2d-ws/attn-batch" or "kraken"): communication of the layers, weights stored, and the KV cache of
    ``batch`` sequences of ``cache_len`` tokens (default prompt)."""
    ffn, _, attn = layout.partition("/")
    attention = attn.removeprefix("attn-") or "heads"
    workload = Workload(batch=batch, prompt=prompt, dtype=dtype)
    est = phase_estimate(config, load_hardware("cpu-gloo"), workload, phase,
                         CostLayout(ffn, attention, tp, head="replicated"))
    kv = kv_cache_bytes_per_chip(config, batch, cache_len or prompt, tp, attention, workload.act_bytes)
    return {"comm": est.comm_bytes_per_chip, "weights": weights_per_chip(config, tp, dtype), "kv": kv}
