"""A training run SIGKILLed at an arbitrary moment and resumed reproduces the uninterrupted run
exactly (CPU, fp32); a 2-rank DDP run equals a 1-rank run with twice the batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from krakenlm.config import ModelConfig
from krakenlm.train import prepare, train
from krakenlm.train.trainer import LATEST, METRICS_FILE, read_metrics
from tests.test_train import TINY, tiny_train_config, write_corpus

EXACT_KEYS = ("step", "loss", "lr", "grad_norm", "tokens", "val_loss")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    prepare(base / "bin", [write_corpus(base / "text", docs=4, words=1500)], tokenizer="bytes", val_fraction=0.2)
    return base / "bin"


def _exact(records):
    return [{k: r[k] for k in EXACT_KEYS if k in r} for r in records]


def _weights(out):
    return load_file(str((out / LATEST).resolve() / "model.safetensors"))


def test_sigkill_then_resume_matches_uninterrupted_run(data_dir, tmp_path):
    config = tmp_path / "model.json"
    config.write_text(json.dumps(TINY | dict(n_embd=64, block_size=64)))
    steps = 150

    def command(out, *extra):
        return [sys.executable, "-m", "krakenlm.cli", "train", "--config", str(config), "--data", str(data_dir),
                "--out", str(out), "--steps", str(steps), "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "10",
                "--checkpoint-interval", "7", "--eval-interval", "25", "--eval-windows", "4", "--no-progress", *extra]

    env = os.environ | {"OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run(command(full), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / LATEST).is_symlink() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.002)
    time.sleep(0.05)  # somewhere in the following steps / checkpoints
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    step_at_kill = int((killed / LATEST).resolve().name.split("-")[1])
    assert 0 < step_at_kill < steps, "the run must be killed mid-way for this test to mean anything"

    subprocess.run(command(killed, "--resume"), check=True, env=env, capture_output=True)
    want, got = read_metrics(full / METRICS_FILE), read_metrics(killed / METRICS_FILE)
    assert len(want) == steps
    assert _exact(got) == _exact(want)
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, cfg_fields: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from krakenlm.train.trainer import TrainConfig

    train(TrainConfig(**cfg_fields), ModelConfig(**TINY), progress=False)


def test_ddp_two_ranks_equal_one_rank_with_double_batch(data_dir, tmp_path):
    single = tiny_train_config(data_dir, tmp_path / "single", steps=4, batch_size=4, grad_accum=2)
    train(single, ModelConfig(**TINY), progress=False)
    ddp = single.replace(out=str(tmp_path / "ddp"), batch_size=2)
    mp.spawn(_rank, args=(2, _free_port(), ddp.to_dict()), nprocs=2, join=True)
    want, got = read_metrics(tmp_path / "single" / METRICS_FILE), read_metrics(tmp_path / "ddp" / METRICS_FILE)
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    for key in ("loss", "grad_norm", "val_loss"):
        nan = float("nan")  # val_loss exists only at eval steps
        assert [r.get(key, nan) for r in got] == pytest.approx([r.get(key, nan) for r in want], rel=1e-5, nan_ok=True)
    a, b = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
