"""vLLM's own commands (``vllm serve``, ``vllm bench serve``, its offline engine) run from its separate virtual
environment, for the tests, benchmarks and `krakenlm doctor`: where that venv is, the environment its processes
need here, greedy tokens through its offline engine, and a served model that always stops (its whole process
group) with the caller."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import torch

from krakenlm.errors import KrakenError

if TYPE_CHECKING:
    from krakenlm.model import Transformer
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


def peaked(model: Transformer) -> Transformer:
    """A random model whose logits are far apart (final-norm gain 20): greedy picks then cannot flip on the
    rounding differences between two runtimes' kernels, so their tokens can be compared exactly."""
    with torch.no_grad():
        model.ln_f.weight.fill_(20.0)
    return model


def has_vllm() -> bool:
    """Whether the vLLM venv is there (its ``vllm`` command)."""
    return (vllm_venv() / "bin" / "vllm").exists()


def greedy_tokens(models: list[Path], prompts: list[list[int]], max_tokens: int, *, tp: int = 1,
                  max_model_len: int = 128, timeout: float = 420.0) -> dict[str, list[list[int]]]:
    """Greedy continuations of ``prompts`` by each exported model through vLLM's offline engine (fp32,
    eager; ``krakenlm.interop.vllm_generate`` in the vLLM venv), keyed by the model's directory."""
    with tempfile.TemporaryDirectory(prefix="krakenlm-vllm-") as tmp:
        request = Path(tmp) / "request.json"
        request.write_text(json.dumps({"models": [str(m) for m in models], "prompts": prompts,
                                       "max_tokens": max_tokens, "tp": tp, "max_model_len": max_model_len}))
        try:
            done = subprocess.run([str(vllm_venv() / "bin" / "python"), "-m", "krakenlm.interop.vllm_generate",
                                   str(request)], capture_output=True, text=True, timeout=timeout,
                                  env=vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as err:
            raise KrakenError(f"vLLM's offline engine did not finish within {timeout:g}s") from err
    if done.returncode != 0:
        raise KrakenError(f"vLLM's offline engine exited with {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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
