"""Output paths (issues 26 and 28): every writer refuses a path that holds something not its own (a user's
file, a device, a FIFO, a non-empty foreign directory), names it, and leaves it exactly as it was."""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys

import pytest

from krakenlm.checkpoint import load_model, save_checkpoint
from krakenlm.cli import main
from krakenlm.config import ModelConfig
from krakenlm.errors import ConfigError
from krakenlm.source import build_model
from krakenlm.train import prepare, train
from krakenlm.validation import check_output_dir, check_output_file
from tests.test_train import TINY, tiny_train_config, write_corpus


@pytest.fixture(scope="module")
def model():
    return build_model(preset="tiny-llama", seed=1)


@pytest.fixture(scope="module")
def source(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "ck"
    save_checkpoint(path, model, model.config)
    return path


def special_files(tmp_path):
    """A FIFO and (as root) a character device with /dev/null's numbers, made in a temp folder."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    paths = [fifo]
    if os.geteuid() == 0:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        paths.append(tmp_path / "null")
    return paths


def one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(n in err for n in needles), err
    return err


def test_save_checkpoint_never_moves_a_file_or_device_aside(model, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    paths = [notes, *special_files(tmp_path)]
    for path in paths:
        mode = os.lstat(path).st_mode
        with pytest.raises(ConfigError, match="not a directory; refusing to replace it"):
            save_checkpoint(path, model, model.config)
        assert os.lstat(path).st_mode == mode
    assert notes.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # nothing moved aside


def test_save_checkpoint_replaces_only_a_checkpoint(model, tmp_path):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("chapter 1")
    with pytest.raises(ConfigError, match="non-empty directory that is not a krakenlm checkpoint.*thesis.txt"):
        save_checkpoint(foreign, model, model.config)
    assert (foreign / "thesis.txt").read_text() == "chapter 1" and len(list(foreign.iterdir())) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    save_checkpoint(empty, model, model.config)
    save_checkpoint(empty, model, model.config)  # a checkpoint is replaced by the new one
    assert load_model(empty).config == model.config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "thesis"]  # no temp or .old left


@pytest.mark.parametrize("kind", ["file", "directory", "fifo"])
def test_convert_refuses_what_is_not_its_output(source, tmp_path, capsys, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("my notes")
    elif kind == "directory":
        out.mkdir()
        (out / "thesis.txt").write_text("chapter 1")
    else:
        os.mkfifo(out)
    assert main(["convert", "--checkpoint", str(source), "--out", str(out)]) == 2
    one_line(capsys, str(out), "refusing")
    assert capsys.readouterr().out == ""  # no "wrote"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    if kind == "file":
        assert out.read_text() == "my notes"
    elif kind == "directory":
        assert [p.name for p in out.iterdir()] == ["thesis.txt"]


def test_convert_onto_a_full_disk_is_one_line(source, tmp_path):
    """RLIMIT_FSIZE makes writes past 64 KiB fail with EFBIG, as a full disk fails them with ENOSPC."""
    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    r = subprocess.run([sys.executable, "-m", "krakenlm", "convert", "--checkpoint", str(source), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120, preexec_fn=small_files)
    assert r.returncode == 2, r.stderr
    assert "could not write the checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_output_file_guard_refuses_devices_and_fifos(tmp_path):
    for path in special_files(tmp_path):
        with pytest.raises(ConfigError, match="refusing to write to it"):
            check_output_file(path, "--out")
    (tmp_path / "report.json").write_text("{}")
    assert check_output_file(tmp_path / "report.json", "--out") == tmp_path / "report.json"
    with pytest.raises(ConfigError, match="is a directory"):
        check_output_file(tmp_path, "--out")
    with pytest.raises(ConfigError, match="not a directory"):
        check_output_dir(tmp_path / "report.json", "out")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    prepare(base / "bin", [write_corpus(base / "text")], tokenizer="bytes", val_fraction=0.2)
    return base / "bin"


def test_train_refuses_a_foreign_directory_and_keeps_hidden_entries(data_dir, tmp_path, capsys):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / ".env").write_text("SECRET=1")
    with pytest.raises(ConfigError, match="not a krakenlm run directory.*\\.env"):
        train(tiny_train_config(data_dir, repo, steps=2), ModelConfig(**TINY), progress=False)
    assert sorted(p.name for p in repo.iterdir()) == [".env", ".git"]
    # A run's own directory keeps a user's hidden files across a resume (only the trainer's temps go).
    run = tmp_path / "run"
    train(tiny_train_config(data_dir, run, steps=2, checkpoint_interval=2), ModelConfig(**TINY), progress=False)
    (run / ".env").write_text("SECRET=1")
    (run / ".latest.tmp-1").symlink_to("nowhere")  # what a run killed mid-swap leaves
    train(tiny_train_config(data_dir, run, steps=4, checkpoint_interval=2), ModelConfig(**TINY), resume=True,
          progress=False)
    assert (run / ".env").read_text() == "SECRET=1" and not os.path.lexists(run / ".latest.tmp-1")


@pytest.mark.parametrize("argv", [["prepare", "--tokenizer", "bytes", "--out"], ["doctor", "--no-timings", "--out"]])
def test_prepare_and_doctor_refuse_a_users_file(tmp_path, capsys, argv):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert main([*argv, str(notes)]) == 2
    one_line(capsys, str(notes), "not a directory")
    assert notes.read_text() == "my notes" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_prepare_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "thesis.txt").write_text("chapter 1")
    with pytest.raises(ConfigError, match="not a krakenlm data directory"):
        prepare(tmp_path, [write_corpus(tmp_path.parent / "text")], tokenizer="bytes")
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.txt"]


def test_report_writers_refuse_a_fifo(tmp_path):
    """Library writers of single files check their path too (a FIFO would block the writer forever)."""
    from krakenlm.batching.profile import save_profiles
    from krakenlm.costmodel.hardware import load_hardware
    from krakenlm.eval.report import write

    fifo = special_files(tmp_path)[0]
    os.mkfifo(tmp_path / "fifo.md")  # eval's table, written next to its JSON
    for writer in (lambda: load_hardware("cpu-gloo-nominal").save(fifo), lambda: save_profiles(fifo, {}),
                   lambda: write([], [], tmp_path / "fifo.json")):
        with pytest.raises(ConfigError, match="FIFO"):
            writer()


def test_hf_export_never_writes_over_another_model(tmp_path):
    from krakenlm.checkpoint import export_hf_gpt2
    from krakenlm.model import Transformer
    from tests.conftest import tiny

    model = Transformer(tiny("gpt"))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match="not a krakenlm GPT-2 export"):
        export_hf_gpt2(llama, model)
    assert (llama / "config.json").read_text() == '{"model_type": "llama"}'
    export_hf_gpt2(tmp_path / "gpt2", model)
    export_hf_gpt2(tmp_path / "gpt2", model)  # its own export is rewritten
