"""vLLM's own commands (``vllm serve``, ``vllm bench serve``) run from its separate virtual environment, for
the tests and benchmarks: where that venv is, the environment its processes need here, and a served model
that always stops (its whole process group) with the caller."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from krakenlm.errors import KrakenError
from krakenlm.parallel.launch import free_port

# Offline, no telemetry, one thread per rank and no core pinning (vLLM's automatic binding wants a NUMA
# node per rank), KV cache of 1 GiB instead of 4.
VLLM_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def vllm_venv() -> Path:
    """$KRAKENLM_VLLM_VENV, else the checkout's .venv-vllm (what scripts/bootstrap-vllm.sh creates)."""
    default = Path(__file__).resolve().parents[2] / ".venv-vllm"
    return Path(os.environ.get("KRAKENLM_VLLM_VENV", default))


def vllm_env(**extra: str) -> dict[str, str]:
    """The environment of a vLLM process: this one's, VLLM_ENV, and ``extra``; this checkout first on the
    path, so vLLM's plugin entry point loads the code under test even from a venv installed elsewhere."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return os.environ | VLLM_ENV | {"PYTHONPATH": path} | extra


class VllmServer:
    """``vllm serve MODEL ARGS`` on 127.0.0.1, a free port, in its own session (its engine and worker
    processes go with it); ``url`` once /health answers. The log goes to ``log``."""

    def __init__(self, model: str | Path, args: list[str], log: Path, *, timeout: float = 300.0,
                 env: dict[str, str] | None = None) -> None:
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(vllm_venv() / "bin" / "vllm"), "serve", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), *args]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=vllm_env(**(env or {})), start_new_session=True)
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise KrakenError(f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise KrakenError(f"vllm serve did not answer /health within {timeout:g}s:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to the whole process group, SIGKILL if it outlives ``timeout``."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):  # stragglers (workers) even when the leader exited
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
