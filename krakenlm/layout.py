"""The layout vocabulary: the names of Pope et al.'s partitioning layouts and their parsing, shared by the
cost model (which prices them), the runtime (which executes them, krakenlm.parallel.layouts) and every verb.

``1d-ws``, ``2d-ws`` (weight-stationary), ``wg-x``, ``wg-xy``, ``wg-xyz`` (weight-gathered, prefill) for the
matrix pairs of a layer, each with ``/attn-heads`` (default) or ``/attn-batch``; ``kraken`` for Kraken
models; ``PREFILL,DECODE`` gives the phases their own. ``auto`` is not a layout: the caller resolves it
(krakenlm.costmodel.layout_choice.choose) before parsing.
"""

from __future__ import annotations

from dataclasses import dataclass

from krakenlm.config import ModelConfig
from krakenlm.errors import ConfigError

FFN_LAYOUTS = ("1d-ws", "2d-ws", "wg-x", "wg-xy", "wg-xyz")
KRAKEN_LAYOUT = "kraken"
ATTENTION = ("heads", "batch")
WS_LAYOUTS = ("1d-ws", "2d-ws")
GATHERED_AXES = {"wg-x": 1, "wg-xy": 2, "wg-xyz": 3}


@dataclass(frozen=True)
class PhaseLayout:
    """One phase's layout: how the matrix pairs are split and how attention is sharded."""

    ffn: str
    attention: str = "heads"

    def __post_init__(self) -> None:
        if self.ffn not in FFN_LAYOUTS + (KRAKEN_LAYOUT,):
            raise ConfigError(f"layout: {self.ffn!r} is not a layout; use one of {FFN_LAYOUTS + (KRAKEN_LAYOUT,)} "
                              f"(with /attn-heads or /attn-batch), or auto")
        if self.attention not in ATTENTION:
            raise ConfigError(f"layout: attention must be attn-heads or attn-batch, got attn-{self.attention}")

    @classmethod
    def parse(cls, text: str) -> PhaseLayout:
        ffn, _, attn = text.strip().partition("/")
        if attn and not attn.startswith("attn-"):
            raise ConfigError(f"layout: expected LAYOUT/attn-heads or LAYOUT/attn-batch, got {text!r}")
        return cls(ffn, attn.removeprefix("attn-") or "heads")

    def __str__(self) -> str:
        return self.ffn if self.ffn == KRAKEN_LAYOUT else f"{self.ffn}/attn-{self.attention}"

    @property
    def gathered(self) -> bool:
        return self.ffn in GATHERED_AXES


@dataclass(frozen=True)
class Layout:
    """The layouts of prefill and decode (the cost model's (prefill, decode) pair)."""

    prefill: PhaseLayout
    decode: PhaseLayout

    @classmethod
    def parse(cls, text: str) -> Layout:
        """``LAYOUT`` for both phases or ``PREFILL,DECODE``."""
        parts = [p for p in text.split(",")]
        if len(parts) not in (1, 2) or not all(p.strip() for p in parts):
            raise ConfigError(f"layout: expected LAYOUT or PREFILL,DECODE, got {text!r}")
        phases = [PhaseLayout.parse(p) for p in parts]
        return cls(phases[0], phases[-1])

    @classmethod
    def default(cls, config: ModelConfig) -> Layout:
        """What the engine runs without a layout: Kraken's sub-layer split, else Megatron (1D, heads)."""
        one = PhaseLayout(KRAKEN_LAYOUT) if config.arch == "kraken" else PhaseLayout("1d-ws")
        return cls(one, one)

    def phase(self, name: str) -> PhaseLayout:
        return self.prefill if name == "prefill" else self.decode

    def __str__(self) -> str:
        return str(self.prefill) if self.prefill == self.decode else f"{self.prefill},{self.decode}"
