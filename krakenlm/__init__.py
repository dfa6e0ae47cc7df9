"""krakenlm: inherently parallel transformers (Kraken) and fast multi-device inference."""

from krakenlm.config import ModelConfig
from krakenlm.errors import CheckpointError, ConfigError, DistributedError, InputError, KrakenError

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "ConfigError",
    "DistributedError",
    "InputError",
    "KrakenError",
    "ModelConfig",
    "__version__",
]
