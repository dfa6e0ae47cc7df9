import atexit
import os
import shutil
import signal
import tempfile

import pytest
import torch

from krakenlm.config import ModelConfig

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Measured choices (attention kernel, dtype auto, roofline) go to a cache of this session, not the user's.
if "KRAKENLM_CACHE_DIR" not in os.environ:
    os.environ["KRAKENLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="krakenlm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["KRAKENLM_CACHE_DIR"], ignore_errors=True)
torch.set_num_threads(1)


def tiny(arch: str = "gpt", **overrides) -> ModelConfig:
    """A tiny model config for fast exactness tests (byte vocabulary)."""
    base = dict(arch=arch, n_layer=3, n_embd=32, n_head=4, vocab_size=257, block_size=128, bias=arch != "kraken")
    if arch == "kraken":
        base.update(n_sub=2, n_head=2)
    base.update(overrides)
    return ModelConfig(**base)


def as_a_terminal_starts_it() -> None:
    """preexec_fn of a child that a test interrupts: SIGINT handled and unblocked, as a terminal starts a
    command, whatever the test process inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
