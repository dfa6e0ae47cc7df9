"""Issue 28: extreme but valid sampling values and an early Ctrl-C end like any other run (no traceback)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from krakenlm.generate import RowSampler, SamplingConfig
from tests.conftest import as_a_terminal_starts_it


@pytest.mark.parametrize("temperature", [1e39, 1e300, sys.float_info.max])
def test_a_huge_temperature_samples_almost_uniformly(temperature):
    """float32 rounds these to inf: the masked ids' -inf / inf made NaN probabilities and a traceback."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    sampler = RowSampler([SamplingConfig(temperature=temperature, seed=1)] * 4, torch.device("cpu"), 257)
    drawn = torch.cat([sampler(logits) for _ in range(50)])
    assert int(drawn.max()) < 257 and len(set(drawn.tolist())) > 30  # spread (~45 of 50 draws distinct)


def test_generate_cli_with_a_huge_temperature():
    r = subprocess.run([sys.executable, "-m", "krakenlm", "generate", "--preset", "mini-gpt", "--prompt", "Hi",
                        "--max-new-tokens", "4", "--temperature", "1e39", "--dtype", "fp32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


def catches_sigint(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    caught = next(line.split(":")[1] for line in status if line.startswith("SigCgt"))
    return bool(int(caught, 16) & (1 << (signal.SIGINT - 1)))


@pytest.mark.parametrize("after_s", [0.3, 1.0, 2.0])
def test_ctrl_c_while_the_cli_starts_is_one_line(after_s):
    """The first seconds import torch and every subsystem, outside the CLI's error handling."""
    cmd = [sys.executable, "-m", "krakenlm", "generate", "--preset", "kraken-125m-2way", "--prompt", "To be",
           "--dtype", "fp32", "--max-new-tokens", "800"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_a_terminal_starts_it)
    deadline = time.monotonic() + 60
    while not catches_sigint(proc.pid):  # Python has started (a Ctrl-C before it, or in site, is its own)
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err, err
