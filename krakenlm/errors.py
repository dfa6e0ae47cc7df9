"""Typed errors: library code raises these, the CLI turns them into one line and exit code 2."""

import os
import sys
from typing import NoReturn


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


def exit_interrupted(what: str = "krakenlm") -> NoReturn:
    """End a process whose start-up (imports) a Ctrl-C cut short: one line, exit 130. Through os._exit: a
    KeyboardInterrupt raised inside code an extension module runs while importing marks the interpreter as
    interrupted even once caught, and it then killed itself with SIGINT at exit (-2) after printing our line."""
    print(f"{what}: interrupted", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)
