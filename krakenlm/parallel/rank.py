"""Body of a launched rank: ``python -m krakenlm.parallel.rank PAYLOAD.json`` (see launch.py)."""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from krakenlm.errors import ConfigError, KrakenError

LAUNCHER_PID = "KRAKENLM_LAUNCHER_PID"  # a launched rank exits when this process is gone


def started_key(rank: int) -> str:
    """The store key a launched rank sets once its target is imported and about to run."""
    return f"krakenlm/started/{rank}"


def _target(target: str) -> Callable[[dict[str, Any]], Any]:
    module, _, name = target.partition(":")
    if not module or not name:
        raise ConfigError(f"launch: target must be 'package.module:function', got {target!r}")
    return getattr(importlib.import_module(module), name)


def call(target: str, args: dict[str, Any]) -> int:
    """Import ``package.module:function`` and call it with ``args``; its return value is the exit code."""
    return int(_target(target)(args) or 0)


def _check_in(rank: str) -> None:
    """Tell the launcher's store this rank started (it watches for ranks that die before they join)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=30))
        store.set(started_key(int(rank)), "1")


def _exit_with_launcher(rank: str) -> None:
    """End this rank soon after the process that launched it is gone (killed, it could not stop us)."""
    pid = int(os.environ.get(LAUNCHER_PID, "0"))

    def watch() -> None:
        while True:
            time.sleep(0.2)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                print(f"krakenlm rank {rank}: the launcher (pid {pid}) is gone; exiting", file=sys.stderr, flush=True)
                os._exit(1)
            except PermissionError:  # alive, owned by another user
                pass

    if pid > 0:
        threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def main(path: str) -> int:
    rank = os.environ.get("RANK", "?")
    try:
        _exit_with_launcher(rank)
        with open(path) as f:
            payload = json.load(f)
        os.unlink(path)  # this rank's own copy: nothing is left in the temp folder, whoever dies first
        target = _target(payload["target"])
        _check_in(rank)
        return int(target(payload["args"]) or 0)
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
