"""Issue 28: a TP degree or a model that cannot run is refused before any rank process starts and before
the 'auto' dtype probe measures anything (those took minutes, or made the machine unusable)."""

from __future__ import annotations

import json

import pytest

import krakenlm.engine
import krakenlm.train.trainer
from krakenlm import preflight
from krakenlm.cli import main
from krakenlm.engine import Engine, EngineOptions
from krakenlm.errors import ResourceError
from krakenlm.source import ModelSource
from tests.conftest import tiny


@pytest.fixture
def nothing_expensive(monkeypatch):
    """Fail the test if a rank process would start or a dtype would be measured."""
    def forbidden(*args, **kwargs):
        raise AssertionError("started before the preflight checks")

    monkeypatch.setattr(krakenlm.engine, "Ranks", forbidden)
    monkeypatch.setattr(krakenlm.engine, "agreed_dtype", forbidden)
    monkeypatch.setattr(krakenlm.train.trainer, "agreed_dtype", forbidden)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_tp_beyond_the_heads_starts_no_rank(nothing_expensive, capsys):
    assert main(["generate", "--preset", "mini-gpt", "--prompt", "x", "--tp", "1000"]) == 2
    assert "tp" in error_line(capsys)


def test_tp_beyond_the_cores_starts_no_rank(nothing_expensive, monkeypatch, tmp_path, capsys):
    config = tmp_path / "wide.json"
    config.write_text(json.dumps(tiny(n_head=64, n_embd=128).to_dict()))
    monkeypatch.setattr(preflight, "usable_cores", lambda: 2)
    assert main(["generate", "--config", str(config), "--prompt", "x", "--tp", "64"]) == 2
    assert "64 rank processes on 2 CPU core(s); at most 8" in error_line(capsys)


@pytest.mark.parametrize("dtype", ["auto", "fp32"])
def test_a_model_too_large_is_refused_before_the_dtype_probe(nothing_expensive, capsys, dtype):
    assert main(["generate", "--preset", "gpt-175b", "--prompt", "x", "--dtype", dtype]) == 2
    assert "needs at least" in error_line(capsys)
    with pytest.raises(ResourceError, match="gpt-175b"):  # the library's SPMD construction too
        Engine(ModelSource(preset="gpt-175b"), EngineOptions(dtype=dtype))


@pytest.mark.parametrize("args,message", [(["--preset", "gpt-175b", "--data", "DATA"], "needs at least"),
                                          (["--preset", "mini-gpt", "--data", "/nonexistent"], "/nonexistent")])
def test_train_checks_inputs_and_memory_before_the_dtype_probe(nothing_expensive, tmp_path, capsys, args, message):
    from krakenlm.train import prepare
    from tests.test_train import write_corpus

    prepare(tmp_path / "data", [write_corpus(tmp_path / "text")], tokenizer="bytes")
    args = [str(tmp_path / "data") if a == "DATA" else a for a in args]
    assert main(["train", *args, "--out", str(tmp_path / "run"), "--dtype", "auto", "--no-progress"]) == 2
    assert message in error_line(capsys)
