import json
import subprocess
import sys

import pytest

from krakenlm.cli import main


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "krakenlm", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_single_device_prints_text_and_speed():
    r = run("generate", "--preset", "mini-gpt", "--prompt", "Hello world", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello world") and "tokens/s" in r.stderr


@pytest.mark.parametrize("preset,overlap", [("mini-kraken-2way", "Kraken AllReduce time hidden behind attention"),
                                            ("mini-ladder", "Ladder AllReduce time hidden behind the next module")])
def test_generate_tp2_matches_single_device(preset, overlap):
    args = ["generate", "--preset", preset, "--prompt", "To be, or not", "--max-new-tokens", "6"]
    one, two = run(*args), run(*args, "--tp", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert one.stdout == two.stdout
    assert overlap in two.stderr


@pytest.mark.parametrize("args,message", [
    (["--preset", "nope", "--prompt", "x"], "unknown preset"),
    (["--preset", "mini-gpt", "--prompt", "x", "--max-new-tokens", "1000"], "exceeds the model's context"),
    (["--preset", "mini-gpt", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--preset", "mini-kraken-2way", "--prompt", "x", "--tp", "3"], "does not fit"),
    (["--checkpoint", "/nonexistent", "--prompt", "x"], "no such checkpoint"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_presets_and_size():
    r = run("presets", "--json")
    assert json.loads(r.stdout)["kraken-125m-2way"]["params"] == 124_012_302
    r = run("size", "--budget", "124373760", "--layers", "12", "--heads", "12", "--n-sub", "2")
    assert json.loads(r.stdout)["n_embd"] == 678


def test_convert_rewires_the_last_layers_as_ladder(tmp_path, capsys):
    from krakenlm.checkpoint import load_model, save_checkpoint
    from krakenlm.source import build_model

    model = build_model(preset="tiny-llama", seed=1)
    save_checkpoint(tmp_path / "src", model, model.config)
    assert main(["convert", "--checkpoint", str(tmp_path / "src"), "--out", str(tmp_path / "dst"),
                 "--ladder-layers", "1"]) == 0
    assert "last 1 of 2 layers ladder" in capsys.readouterr().out
    assert load_model(tmp_path / "dst").config == model.config.as_ladder(1)
    assert main(["convert", "--checkpoint", str(tmp_path / "src"), "--out", str(tmp_path / "x"),
                 "--ladder-layers", "5"]) == 2
    assert "ladder_layers" in capsys.readouterr().err
