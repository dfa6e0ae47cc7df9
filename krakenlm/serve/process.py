"""`krakenlm serve` as a child process (benchmarks, tests, scripted comparisons): start it, wait until it
listens, stop it with SIGTERM (a drain) and make sure nothing is left."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from krakenlm.errors import KrakenError


class ServerProcess:
    """``krakenlm serve ARGS`` (``--port 0`` unless given); ``url`` once it listens. ``prefix`` runs it
    under another command (``ip netns exec NS``), ``env`` adds variables (a torchrun-style rank)."""

    def __init__(self, args: list[str], *, prefix: list[str] | None = None, env: dict[str, str] | None = None,
                 timeout: float = 600.0) -> None:
        port = [] if "--port" in args else ["--port", "0"]
        cmd = [*(prefix or []), sys.executable, "-m", "krakenlm", "serve", *args, *port]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {}))
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        found: list[str] = []
        reader = threading.Thread(target=lambda: found.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        match = re.search(r"listening on (http://\S+)", found[0]) if found else None
        if match is None:
            self.kill()
            raise KrakenError(f"krakenlm serve did not start within {timeout:g}s: {''.join(self.stderr)[-2000:]}")
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])

    def children(self) -> list[int]:
        """Process ids of its follower ranks (Linux)."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM (in-flight requests drain) and wait; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise KrakenError(f"krakenlm serve did not exit within {timeout:g}s of SIGTERM; killed it") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
