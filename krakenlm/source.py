"""Where a model comes from: a typed ModelSource (checkpoint | preset | config, + seed), resolved once.

Every verb that runs a model (generate, eval, bench, serve, the demo) names its model with one
ModelSource; the engine opens it once per rank, reads each file once, builds this rank's shard and
drops what it read. A ModelSource is plain data (``to_dict`` / ``from_dict``), so it travels to every
rank of a launch as JSON, and ``fingerprint`` is what ranks compare before they agree to start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from krakenlm.checkpoint import CONFIG_FILE, Checkpoint
from krakenlm.config import ModelConfig
from krakenlm.errors import ConfigError
from krakenlm.model import Shard, Transformer
from krakenlm.model.sharding import shard_state_dict
from krakenlm.resources import model_bytes, require_memory


class OpenedSource(Protocol):
    """A source after its files were read: the config, and this rank's model on demand."""

    config: ModelConfig

    def model(self, shard: Shard | None = None, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> Transformer: ...

    def release(self) -> None: ...


@dataclass(frozen=True)
class RandomWeights:
    """A config with the paper's seeded init: every rank building the same seed gets slices of the
    same full model."""

    config: ModelConfig
    seed: int = 0

    def __post_init__(self) -> None:
        # The full model is built first, on the host: refuse one that cannot fit before anything is
        # allocated or measured (--dtype auto times this model's GEMMs before building it).
        require_memory(model_bytes(self.config), f"building {self.config.name or 'the model'} "
                       f"({self.config.num_params():,} parameters)")

    def model(self, shard: Shard | None = None, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> Transformer:
        full = Transformer(self.config, init=False)
        full.reset_parameters(self.seed)
        if shard is None or shard == Shard.full(self.config):
            model = full
        else:
            model = Transformer(self.config, shard, init=False)
            model.load_state_dict(shard_state_dict(full.state_dict(), self.config, shard))
        return model.to(device=device, dtype=dtype).eval()

    def release(self) -> None:
        pass


@dataclass(frozen=True)
class ModelSource:
    """Exactly one of: a checkpoint path (native dir, HF GPT-2 dir, nanoGPT / Kraken-authors .pt),
    a preset name, or a ModelConfig (random weights from ``seed``)."""

    checkpoint: str | None = None
    preset: str | None = None
    config: ModelConfig | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        given = [name for name in ("checkpoint", "preset", "config") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigError(f"model: give exactly one of checkpoint, preset or config (got {given or 'none'})")
        if self.config is not None and not isinstance(self.config, ModelConfig):
            raise ConfigError(f"model: config must be a ModelConfig, got {type(self.config).__name__}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed: must be an integer, got {self.seed!r}")

    @classmethod
    def of(cls, *, checkpoint: str | Path | None = None, preset: str | None = None,
           config: ModelConfig | str | Path | None = None, seed: int = 0) -> ModelSource:
        """From what a user types: a config may be a JSON file path."""
        if isinstance(config, (str, Path)):
            config = ModelConfig.from_json(config)
        return cls(None if checkpoint is None else str(checkpoint), preset, config, seed)

    def open(self) -> OpenedSource:
        """Read the source's files (once): a Checkpoint, or seeded random weights."""
        if self.checkpoint is not None:
            return Checkpoint(self.checkpoint)
        if self.preset is not None:
            from krakenlm.presets import get_preset

            return RandomWeights(get_preset(self.preset), self.seed)
        assert self.config is not None
        return RandomWeights(self.config, self.seed)

    def peek_config(self) -> ModelConfig | None:
        """The config without reading any weights, for checks before a launch; None for a torch checkpoint
        file (its config is inside the pickle, read only when it is opened)."""
        if self.checkpoint is None:
            return self.open().config
        if os.path.isfile(os.path.join(self.checkpoint, CONFIG_FILE)):
            return Checkpoint(self.checkpoint).config  # config.json only: weights are read on .model()
        return None

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the weights: path plus size and mtime of its files, or preset/config + seed."""
        out = self.to_dict()
        path = self.checkpoint
        if path and os.path.exists(path):
            files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs] if os.path.isdir(path) else [path]
            out["files"] = sorted((os.path.basename(f), os.path.getsize(f)) for f in files)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "preset": self.preset,
                "config": None if self.config is None else self.config.to_dict(), "seed": self.seed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSource:
        config = data.get("config")
        return cls(data.get("checkpoint"), data.get("preset"),
                   None if config is None else ModelConfig.from_dict(config), data.get("seed", 0))

    def describe(self) -> str:
        if self.checkpoint is not None:
            return self.checkpoint
        return f"preset {self.preset}" if self.preset else f"config {self.config.name or self.config.arch}"


def build_model(*, checkpoint: str | Path | None = None, preset: str | None = None,
                config: ModelConfig | str | Path | None = None, seed: int = 0, shard: Shard | None = None,
                dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Transformer:
    """A model (eval mode) from exactly one source; see ModelSource."""
    source = ModelSource.of(checkpoint=checkpoint, preset=preset, config=config, seed=seed)
    return source.open().model(shard, dtype, device)
