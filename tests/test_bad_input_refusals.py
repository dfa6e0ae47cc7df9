"""Issue 26's third reliability pass: inputs that raised a traceback, ran unbounded work or were silently
accepted now get a one-line refusal (exit 2) or, where the input is legitimate, a result."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from krakenlm.cli import main
from krakenlm.errors import CheckpointError, ConfigError, InputError
from krakenlm.jsonio import MAX_DEPTH, nesting_depth, parse_json, read_json

TINY = dict(arch="gpt", n_layer=1, n_embd=32, n_head=2, vocab_size=257, block_size=16, bias=False)
GIB = 1 << 30


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], timeout_s: float = 60.0) -> str:
    """Run `krakenlm argv` in a thread (a FIFO that blocks fails the test instead of hanging it); the one
    error line it printed with exit code 2."""
    box: dict[str, int] = {}
    thread = threading.Thread(target=lambda: box.setdefault("rc", main(argv)), daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"krakenlm {' '.join(argv)} did not answer within {timeout_s} s"
    err = capsys.readouterr().err.strip().splitlines()
    assert box.get("rc") == 2 and len(err) == 1 and "Traceback" not in err[0], (box, err)
    return err[0]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps(TINY | {"n_embd": 10**9}))
    tall = tmp_path / "tall.json"
    tall.write_text(json.dumps(TINY | {"n_layer": 10**9}))
    return {"deep": deep, "fifo": fifo, "huge": huge, "tall": tall, "zero": Path("/dev/zero")}


@pytest.fixture
def eight_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("krakenlm.resources._host_available", lambda: 8 * GIB)


@pytest.fixture
def small_machine(eight_gib: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 GiB of host memory, and no GEMM probe may run: a refusal must come before --dtype auto measures."""
    import krakenlm.roofline

    def no_probe(*args: object, **kwargs: object) -> None:
        raise AssertionError("a GEMM probe ran before the memory check")

    monkeypatch.setattr(krakenlm.roofline, "probe", no_probe)


@pytest.mark.parametrize("argv,message", [
    (["generate", "--config", "{deep}", "--prompt", "x", "--device", "cpu"], "nested deeper than"),
    (["predict", "--model", "mini-gpt", "--hardware", "{deep}"], "nested deeper than"),
    (["generate", "--config", "{fifo}", "--prompt", "x"], "is a FIFO, not a regular file"),
    (["predict", "--model", "mini-gpt", "--hardware", "{fifo}"], "is a FIFO, not a regular file"),
    (["calibrate", "--records", "{fifo}"], "is a FIFO, not a regular file"),
    (["calibrate", "--records", "{zero}"], "cannot read records /dev/zero: is a device or special file"),
    (["simulate", "--model", "mini-gpt", "--rate", "1", "--profile", "{fifo}"], "is a FIFO, not a regular file"),
    (["simulate", "--model", "mini-gpt", "--rate", "1", "--profile", "{zero}"], "is a device or special file"),
    (["simulate", "--model", "mini-gpt", "--arrivals", "{fifo}"], "arrivals"),
])
def test_files_that_hung_or_recursed_are_refused(argv, message, files, capsys):
    assert message in refused([a.format(**files) for a in argv], capsys)


@pytest.mark.parametrize("argv,message", [
    (["generate", "--preset", "gpt-175b", "--prompt", "x", "--device", "cpu"], "building gpt-175b"),
    (["generate", "--config", "{huge}", "--prompt", "x", "--device", "cpu"], "needs at least"),
    (["generate", "--config", "{tall}", "--prompt", "x", "--device", "cpu"], "needs at least"),
    (["train", "--preset", "gpt-175b", "--data", "{data}", "--out", "{out}", "--no-progress"], "training gpt-175b"),
])
def test_too_big_is_refused_before_any_allocation_or_probe(argv, message, files, small_machine, tmp_path, capsys):
    from krakenlm.data import prepare

    text = tmp_path / "corpus.txt"
    text.write_text("to be or not to be " * 40)
    prepare(tmp_path / "data", [text], tokenizer="bytes", val_fraction=0.2)
    argv = [a.format(**files, data=tmp_path / "data", out=tmp_path / "out") for a in argv]
    assert message in refused(argv, capsys)
    assert not (tmp_path / "out").exists()


def test_roofline_refuses_a_probe_that_cannot_fit(eight_gib, files, capsys):
    message = refused(["roofline", "--preset", "tiny-llama", "--prompt", "100000000"], capsys)
    assert "timing the attn_qkv_weight GEMM (1x100000000x64x128) needs at least" in message
    assert "one layer of gpt (the GEMM probe) needs" in refused(["roofline", "--config", str(files["huge"])],
                                                                     capsys)


def test_simulate_refuses_a_model_whose_weights_cannot_load(capsys):
    message = refused(["simulate", "--model", "gpt-175b", "--rate", "1", "--requests", "3"], capsys)
    assert "weights need 325.20 GiB per chip on 1 x a100-40gb-nvswitch" in message


@pytest.mark.parametrize("argv,message", [
    (["roofline", "--preset", "tiny-llama", "--threads", "1000"], "threads: must be an integer"),
    (["roofline", "--preset", ""], "unknown preset ''"),
    (["predict", "--model", ""], "unknown preset ''"),
    (["loadtest", "--url", "http://127.0.0.1:99999", "--requests", "1"], "Port out of range"),
    (["plan", "--model", "mini-gpt", "--top", "0"], "top: must be an integer >= 1"),
    (["plan", "--model", "mini-gpt", "--top", "-1"], "top: must be an integer >= 1"),
    (["size", "--budget", "124000000", "--layers", "12", "--heads", "1000000000", "--n-sub", "2",
      "--hardware-friendly"], "total_heads"),
    (["simulate", "--model", "mini-gpt", "--rate", "1e-300"], "rate:"),
    (["simulate", "--model", "mini-gpt", "--rate", "1", "--max-tokens", "0"], "max_tokens"),
    (["simulate", "--model", "mini-gpt", "--rate", "1", "--seed", "-1"], "seed: must be an integer >= 0"),
    (["predict", "--model", "gpt2-124m", "--prompt", "2048", "--generate", "64"], "exceed the context"),
    (["bench", "--quick", "--tp", "1", "--out", "/nonexistent/bench"], "bench: --tp: must be an integer >= 2"),
])
def test_silently_accepted_or_traceback_arguments_are_refused(argv, message, capsys):
    assert message in refused(argv, capsys)


@pytest.mark.parametrize("argv,message", [
    (["roofline", "--preset", "tiny-llama", "--dtypes", ""], "dtypes: give at least one"),
    (["bench", "--quick", "--shapes", "", "--out", "/nonexistent/b"], "bench: --shapes: give at least one value"),
    (["bench", "--quick", "--dtypes", ",", "--out", "/nonexistent/b"], "bench: --dtypes: give at least one value"),
])
def test_empty_lists_are_refused(argv, message, capsys):
    """An empty list left roofline with nothing to report (UnboundLocalError) and bench with no cells (a run
    that failed after 'ranks still running after 0s')."""
    assert message in refused(argv, capsys)


def test_eval_ppl_refuses_unbounded_windows_before_loading(tmp_path, capsys, monkeypatch):
    from krakenlm.checkpoint import save_checkpoint
    from krakenlm.config import ModelConfig
    from krakenlm.source import build_model

    cfg = ModelConfig(**TINY)
    ckpt = save_checkpoint(tmp_path / "ck", build_model(config=cfg), cfg)
    monkeypatch.setattr("krakenlm.checkpoint.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert "windows" in refused(["eval", "ppl", "--checkpoint", str(ckpt), "--data", str(tmp_path),
                                 "--windows", "100000000"], capsys)


def test_cost_model_prices_a_rope_model_past_its_trained_context(capsys):
    """Pope et al.'s Table 3 scenario: PaLM 62B, 2048 prompt + 64 generated tokens on a 2048 context."""
    assert main(["predict", "--model", "palm-62b", "--hardware", "tpu-v4", "--chips", "32", "--prompt", "2048",
                 "--generate", "64", "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any("2112 tokens run past palm-62b's trained context of 2048" in n for n in notes)


def _native(tmp_path: Path, state_edit=None, doc_edit=None) -> Path:
    from krakenlm.checkpoint import save_checkpoint
    from krakenlm.config import ModelConfig
    from krakenlm.source import build_model

    cfg = ModelConfig(**TINY)
    state = build_model(config=cfg, seed=0).state_dict()
    if state_edit:
        state_edit(state)
    path = save_checkpoint(tmp_path / "ck", state, cfg)
    if doc_edit:
        doc = json.loads((path / "config.json").read_text())
        doc_edit(doc)
        (path / "config.json").write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("version", [99, "2", 0, None, True])
def test_unknown_format_version_is_refused(version, tmp_path):
    from krakenlm.checkpoint import load_model

    path = _native(tmp_path, doc_edit=lambda doc: doc.update(format_version=version))
    with pytest.raises(CheckpointError, match="format_version must be an integer 1..2"):
        load_model(path)


def test_weights_overflowing_fp16_are_refused_not_generated_from(tmp_path, capsys):
    from krakenlm.checkpoint import load_model

    def big(state):
        name = next(k for k in state if "qkv" in k)
        state[name] = state[name].clone()
        state[name].view(-1)[0] = 1e6  # finite in fp32, Inf in fp16

    path = _native(tmp_path, state_edit=big)
    with pytest.raises(CheckpointError, match=r"qkv_weight overflows torch.float16"):
        load_model(path, dtype=torch.float16)
    assert torch.isfinite(load_model(path, dtype=torch.bfloat16).layers[0].attn.qkv_weight).all()
    message = refused(["generate", "--checkpoint", str(path), "--prompt", "hi", "--dtype", "fp16",
                       "--device", "cpu", "--max-new-tokens", "2"], capsys)
    assert "overflows torch.float16" in message


def test_authors_run_directory_with_its_config_dump_loads(tmp_path):
    """What the authors' train.py leaves: ckpt.pt and config.json, a dump of its training arguments."""
    from krakenlm.checkpoint import Checkpoint, load_model
    from tests.reference_kraken import ReferenceKraken

    ref = ReferenceKraken(n_layer=2, n_sub=2, d=32, heads_per_sub=2, vocab=257, block=32).eval()
    args = {"n_layer": 2, "n_head": 4, "n_heads_in_split": 2, "n_embd": 32, "ffn_expansion": 2, "bias": False,
            "block_size": 32, "vocab_size": 257}
    torch.save({"model": ref.state_dict(), "model_args": args, "iter_num": np.int64(7)}, tmp_path / "ckpt.pt")
    dump = {"out_dir": str(tmp_path), "batch_size": 12, "learning_rate": 6e-4, "is_split": True, "compile": True,
            **{k: args[k] for k in ("n_layer", "n_head", "n_heads_in_split", "n_embd", "block_size")}}
    (tmp_path / "config.json").write_text(json.dumps(dump))
    assert Checkpoint(tmp_path).format == "kraken-authors"
    x = torch.randint(0, 257, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(x), ref(x), atol=1e-5, rtol=1e-5)
    (tmp_path / "ckpt.pt").unlink()  # a config that describes no model and nothing beside it
    with pytest.raises(CheckpointError, match="neither a krakenlm, a GPT-2 nor a Llama config"):
        load_model(tmp_path)


@pytest.mark.parametrize("label", [1.0, 2, True, "1", -1])
def test_task_file_with_a_wrong_label_is_named(label, tmp_path):
    from krakenlm.eval.tasks import check_data

    doc = {"text": "Mark told Pete many lies about himself.", "span1_text": "Pete", "span2_index": 5,
           "span2_text": "himself", "label": label}
    (tmp_path / "wsc.jsonl").write_text(json.dumps(doc) + "\n")
    with pytest.raises(InputError, match=r"wsc.jsonl:1: label must be an integer class 0..1"):
        check_data(tmp_path, ["wsc"])


def test_json_reader_refuses_depth_constants_and_size(tmp_path):
    assert nesting_depth('{"a": "[[[[", "b": [[1]]}') == 3  # brackets inside strings do not count
    assert parse_json("[" * MAX_DEPTH + "]" * MAX_DEPTH, "x") == eval("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    with pytest.raises(ConfigError, match="nested deeper than"):
        parse_json("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "x")
    with pytest.raises(ConfigError, match="NaN is not valid JSON"):
        parse_json('{"a": NaN}', "x")
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"a": "x" * 100}))
    with pytest.raises(ConfigError, match="larger than 10 bytes"):
        read_json(big, "spec", max_bytes=10)


def test_json_depth_scan_is_linear_on_unterminated_strings():
    """An unterminated string of escaped quotes (`["\\"\\"...`) made the depth scan restart at every quote:
    quadratic (~25 s for these 64 KiB, hours for 1 MiB). Now one pass, then the usual refusal."""
    assert nesting_depth(r'["a\"[", [["\\"]]]') == 3 and nesting_depth('[[["\\') == 3
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_json('["' + '\\"' * (1 << 15), "x")
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("consumer,field", [("generate", "n_layer"), ("generate", "norm_eps"),
                                           ("predict", "memory_bytes")])
def test_json_ints_past_float_range_are_named(consumer, field, tmp_path, capsys):
    """10**400 in a config or spec raised OverflowError (int too large to convert to float)."""
    from krakenlm.costmodel.hardware import SPEC_DIR

    path = tmp_path / "input.json"
    base = TINY if consumer == "generate" else json.loads((SPEC_DIR / "tpu-v4.json").read_text())
    path.write_text(json.dumps(base | {field: 123456789}).replace("123456789", str(10**400)))
    argv = (["generate", "--config", str(path), "--prompt", "x", "--device", "cpu", "--dtype", "fp32"]
            if consumer == "generate" else ["predict", "--model", "mini-gpt", "--hardware", str(path)])
    message = refused(argv, capsys)
    assert field in message and len(message) < 300


def test_calibration_records_of_the_wrong_shape_are_named(tmp_path, capsys):
    path = tmp_path / "records.json"
    for text in ("3", "null", '{"records": 5}', '{"records": [], "cells": "x"}'):
        path.write_text(text)
        assert "calibration" in refused(["calibrate", "--records", str(path)], capsys)


def test_demo_refuses_a_missing_device_before_training(tmp_path, capsys):
    if torch.cuda.device_count() > 99:
        pytest.skip("this machine has a cuda:99")
    assert "device: cuda:99" in refused(["demo", "--out", str(tmp_path / "demo"), "--device", "cuda:99"], capsys)
    assert not (tmp_path / "demo").exists()
