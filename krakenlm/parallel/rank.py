"""Body of a launched rank: ``python -m krakenlm.parallel.rank PAYLOAD.json`` (see launch.py)."""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from typing import Any

import torch.distributed as dist

from krakenlm.errors import ConfigError, KrakenError


def call(target: str, args: dict[str, Any]) -> int:
    """Import ``package.module:function`` and call it with ``args``; its return value is the exit code."""
    module, _, name = target.partition(":")
    if not module or not name:
        raise ConfigError(f"launch: target must be 'package.module:function', got {target!r}")
    return int(getattr(importlib.import_module(module), name)(args) or 0)


def main(path: str) -> int:
    rank = os.environ.get("RANK", "?")
    try:
        with open(path) as f:
            payload = json.load(f)
        return call(payload["target"], payload["args"])
    except KrakenError as err:
        print(f"krakenlm rank {rank}: error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    except dist.DistError as err:  # a peer went away outside the engine's own checks: one line, no C++ stack
        print(f"krakenlm rank {rank}: error: lost contact with the other ranks: {str(err).splitlines()[0][:200]}",
              file=sys.stderr, flush=True)
        return 2
    except Exception:  # a bug: show it, and exit so the launcher can stop the others
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    code = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # do not wait for gloo's background threads of a broken group
