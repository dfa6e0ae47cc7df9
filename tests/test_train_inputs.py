"""Bad values and failing disks for train / prepare / eval ppl / bench (issue 15): a clear one-line error,
never a traceback, a NaN checkpoint, a lost previous checkpoint or a run that refuses to resume."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from krakenlm.checkpoint import load_model
from krakenlm.cli import main as cli_main
from krakenlm.config import ModelConfig
from krakenlm.errors import CheckpointError, ConfigError, ResourceError, TrainingError
from krakenlm.train import TrainConfig, perplexity, prepare, train
from krakenlm.train.trainer import CHECKPOINT_DIR, LATEST, METRICS_FILE, read_metrics
from tests.test_train import TINY, tiny_train_config, write_corpus


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    prepare(base / "bin", [write_corpus(base / "text")], tokenizer="bytes", val_fraction=0.2)
    return base / "bin"


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(n in err for n in needles), err
    return err


@pytest.mark.parametrize("field,value", [
    ("lr", float("inf")), ("lr", float("nan")), ("lr", 0.0), ("weight_decay", float("nan")),
    ("weight_decay", -0.1), ("grad_clip", float("nan")), ("grad_clip", float("inf")), ("beta1", 1.0),
    ("beta2", float("nan")), ("min_lr_ratio", float("nan")), ("peak_tflops", 0.0), ("peak_tflops", -1.0),
    ("peak_tflops", float("inf")), ("steps", True), ("batch_size", 1.5), ("warmup_steps", -1), ("compile", "yes"),
    ("dtype", "int8"), ("dtype", 16),
])
def test_train_config_values_are_validated(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_train_config_spells_a_dtype_as_the_engine_does():
    """'bfloat16' is accepted as everywhere else, and kept as 'bf16' (checkpoints and resume compare it)."""
    assert TrainConfig(dtype="bfloat16").dtype == "bf16" and TrainConfig(dtype="auto").dtype == "auto"


@pytest.mark.parametrize("flag,value,field", [
    ("--lr", "inf", "lr"), ("--weight-decay", "nan", "weight_decay"), ("--grad-clip", "nan", "grad_clip"),
    ("--peak-tflops", "0", "peak_tflops"), ("--peak-tflops", "-1", "peak_tflops")])
def test_train_cli_bad_values_are_one_line(data_dir, tmp_path, capsys, flag, value, field):
    argv = ["train", "--preset", "mini-gpt", "--data", str(data_dir), "--out", str(tmp_path / "r"), flag, value]
    assert cli_main(argv) == 2
    one_line_error(capsys, field)
    assert not (tmp_path / "r").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    """lr=1e30 is a valid number whose first update makes the weights overflow: step 2's loss is not finite."""
    cfg = tiny_train_config(data_dir, tmp_path / "run", lr=1e30, warmup_steps=0, checkpoint_interval=1, steps=5)
    with pytest.raises(TrainingError, match=r"step 2: the loss is (nan|inf).*diverged.*last good checkpoint is "
                                            r".*step-000001"):
        train(cfg, ModelConfig(**TINY), progress=False)
    run = tmp_path / "run"
    assert (run / LATEST).resolve().name == "step-000001"
    assert sorted(p.name for p in (run / CHECKPOINT_DIR).iterdir()) == ["step-000001"]
    assert all(torch.isfinite(t).all() for t in load_model(run / LATEST).state_dict().values())
    assert [r["step"] for r in read_metrics(run / METRICS_FILE)] == [1]


OUTPUT_DIRS = {"train": ["train", "--preset", "mini-gpt", "--data", "DATA", "--out"],
               "prepare": ["prepare", "DATA/meta.json", "--tokenizer", "bytes", "--out"],
               "bench": ["bench", "--quick", "--out"], "demo": ["demo", "--steps", "1", "--out"],
               "doctor": ["doctor", "--out"],
               "generate --trace": ["generate", "--preset", "mini-gpt", "--prompt", "x", "--trace"]}


@pytest.mark.parametrize("verb", sorted(OUTPUT_DIRS))
def test_out_that_is_a_file_is_refused(data_dir, tmp_path, capsys, verb):
    """Checked before any work: a sweep or a generation whose results cannot be written is refused up front."""
    (tmp_path / "file").write_text("x")
    args = [a.replace("DATA", str(data_dir)) for a in OUTPUT_DIRS[verb]]
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        assert cli_main([*args, str(out)]) == 2
        one_line_error(capsys, ":", "file", str(out))


@pytest.mark.parametrize("args", [
    ["simulate", "--model", "gpt-1.3b", "--requests", "4", "--rate", "1", "--out"],
    ["loadtest", "--url", "http://127.0.0.1:9", "--requests", "1", "--out"],
    ["loadtest", "--url", "http://127.0.0.1:9", "--requests", "1", "--plot"]])
def test_output_file_that_is_a_directory_is_refused_before_the_run(tmp_path, capsys, args):
    assert cli_main([*args, str(tmp_path)]) == 2
    one_line_error(capsys, "is a directory", str(tmp_path))


def _limit_file_size():
    """In the child: files may not grow past 64 KiB (the checkpoint's weights are larger), writes fail with
    EFBIG instead of killing the process, as a full disk fails them with ENOSPC."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_failing_checkpoint_write_is_one_line_and_keeps_the_previous_one(data_dir, tmp_path):
    cfg = tiny_train_config(data_dir, tmp_path / "run", steps=2, checkpoint_interval=2)
    train(cfg, ModelConfig(**TINY), progress=False)
    before = load_file(str((tmp_path / "run" / LATEST).resolve() / "model.safetensors"))
    assert sum(t.numel() * 4 for t in before.values()) > 64 << 10
    argv = [sys.executable, "-m", "krakenlm", "train", "--out", str(tmp_path / "run"), "--resume", "--steps", "4",
            "--no-progress"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "step 4: could not write the checkpoint" in lines[0] and "intact" in lines[0], lines
    assert (tmp_path / "run" / LATEST).resolve().name == "step-000002"
    after = load_model(tmp_path / "run" / LATEST).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.name for p in (tmp_path / "run" / CHECKPOINT_DIR).iterdir()] == ["step-000002"]  # no temp left


def test_resume_skips_a_damaged_latest_and_uses_the_intact_older_one(data_dir, tmp_path, capsys):
    full = tiny_train_config(data_dir, tmp_path / "full", steps=6, checkpoint_interval=2, keep_checkpoints=3)
    train(full, ModelConfig(**TINY), progress=False)
    cfg = full.replace(out=str(tmp_path / "run"), steps=4)
    train(cfg, ModelConfig(**TINY), progress=False)
    damaged = (tmp_path / "run" / LATEST).resolve()
    blob = bytearray((damaged / "model.safetensors").read_bytes())
    blob[-3] ^= 0x40
    (damaged / "model.safetensors").write_bytes(bytes(blob))
    capsys.readouterr()
    result = train(cfg.replace(steps=6), None, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "skipped damaged checkpoint" in err and "step-000004" in err and "Resuming from" in err
    assert f"{tmp_path / 'run' / CHECKPOINT_DIR / 'step-000002'} (step 2)" in err
    assert result.step == 6
    a = load_file(str((tmp_path / "full" / LATEST).resolve() / "model.safetensors"))
    b = load_file(str((tmp_path / "run" / LATEST).resolve() / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the resumed run is the uninterrupted one, exactly


def test_absurd_batch_is_refused_with_the_numbers_before_allocating(data_dir, tmp_path):
    with pytest.raises(ResourceError, match=r"batch_size=100000000 x 32 tokens.*GiB.*GiB available"):
        train(tiny_train_config(data_dir, tmp_path / "run", batch_size=10**8), ModelConfig(**TINY), progress=False)
    with pytest.raises(ResourceError, match="GiB"):
        train(tiny_train_config(data_dir, tmp_path / "run2", eval_windows=10**12), ModelConfig(**TINY),
              progress=False)


@pytest.mark.parametrize("flag,value,field", [("--windows", "0", "windows"), ("--windows", "-3", "windows"),
                                              ("--batch-size", "0", "batch_size"),
                                              ("--windows", str(10**12), "<= 1000000, got 1000000000000")])
def test_eval_ppl_bad_counts_are_one_line(data_dir, tmp_path, capsys, flag, value, field):
    from krakenlm.checkpoint import save_checkpoint
    from krakenlm.source import build_model

    cfg = ModelConfig(**TINY)
    save_checkpoint(tmp_path / "m", build_model(config=cfg, seed=0), cfg)
    assert cli_main(["eval", "ppl", "--checkpoint", str(tmp_path / "m"), "--data", str(data_dir), flag, value]) == 2
    one_line_error(capsys, field)


def test_perplexity_of_one_window_is_finite(data_dir):
    from krakenlm.source import build_model

    model = build_model(config=ModelConfig(**TINY), seed=0)
    assert 1 < perplexity(model, data_dir, num_windows=1, batch_size=8) < 1e3


@pytest.mark.parametrize("args,needle", [(["--pad-heads", "-64"], "--pad-heads"), (["--pad-heads", "0"], "--pad-heads"),
                                         (["--prompts", ","], "--prompts"), (["--rounds", "0"], "--rounds"),
                                         (["--idle-wait", "nan"], "--idle-wait"), (["--links", "-1"], "--links")])
def test_bench_bad_options_are_one_line_before_any_rank_starts(capsys, args, needle):
    assert cli_main(["bench", "--quick", *args]) == 2
    one_line_error(capsys, needle)


def test_presets_json_is_valid():
    r = subprocess.run([sys.executable, "-m", "krakenlm", "presets", "--json"], capture_output=True, text=True,
                       timeout=120)
    assert all(v["params"] > 0 for v in json.loads(r.stdout).values())


def test_resume_with_nothing_intact_names_every_problem(data_dir, tmp_path):
    cfg = tiny_train_config(data_dir, tmp_path / "run", steps=2, checkpoint_interval=1)
    train(cfg, ModelConfig(**TINY), progress=False)
    for ckpt in (tmp_path / "run" / CHECKPOINT_DIR).iterdir():
        (ckpt / "trainer.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no intact checkpoint.*step-000002.*step-000001"):
        train(cfg.replace(steps=3), None, resume=True, progress=False)


def test_a_write_the_system_refuses_is_one_line_naming_the_file(tmp_path, capsys):
    """Any OSError that reaches the CLI (here: a folder that does not exist) is one line, not a traceback."""
    out = tmp_path / "missing" / "report.json"
    assert cli_main(["simulate", "--model", "gpt-1.3b", "--requests", "4", "--rate", "1", "--out", str(out)]) == 2
    one_line_error(capsys, "No such file", str(out))
