"""Typed errors: library code raises these, the CLI turns them into one line and exit code 2."""


class KrakenError(Exception):
    """Base class for errors a user can act on (bad input, not a bug)."""


class ConfigError(KrakenError, ValueError):
    """A configuration field is invalid; the message names the field."""


class CheckpointError(KrakenError):
    """A checkpoint is malformed, truncated, mismatched or unsafe to load."""


class InputError(KrakenError, ValueError):
    """A prompt, token id or request cannot be served by this model."""


class DistributedError(KrakenError, RuntimeError):
    """Ranks disagree, a rank died, or a collective timed out."""


class ResourceError(KrakenError, MemoryError):
    """A request needs more memory than the machine has; the message gives both numbers."""


class TrainingError(KrakenError, RuntimeError):
    """A training run cannot go on (non-finite loss, a checkpoint that cannot be written)."""
