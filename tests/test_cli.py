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
    (["--preset", "mini-gpt", "--prompt", "x", "--tp", "0"], "tp: must be an integer >= 1"),
    (["--preset", "mini-gpt", "--prompt", "x", "--tp", "-2"], "tp: must be an integer >= 1"),
    (["--preset", "mini-gpt", "--prompt", "x", "--timeout", "0"], "timeout: must be a finite number"),
    (["--preset", "mini-gpt", "--prompt", "x", "--timeout", "-1"], "timeout: must be a finite number"),
    (["--preset", "mini-gpt", "--prompt", "x", "--timeout", "inf"], "timeout: must be a finite number"),
    (["--preset", "mini-gpt", "--prompt", "x", "--top-k", "0"], "top_k"),
    (["--preset", "mini-gpt", "--prompt", "x", "--top-p", "nan"], "top_p"),
    (["--preset", "mini-gpt", "--prompt", "x", "--device", "tpu"], "device: expected cpu, cuda"),
    (["--preset", "mini-gpt", "--prompt", "x", "--pad-heads", "0"], "pad_heads"),
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


def test_ids_the_tokenizer_cannot_decode_are_never_generated(tmp_path):
    """mini-gpt has 50304 logits for GPT-2's 50257 tokens. Here the padded ids' embeddings dominate the
    tied LM head (+c and -c, so one of them wins whatever the hidden state): generating them once made
    the whole generation fail at decoding, after it was produced. They must be masked instead."""
    import torch

    from krakenlm.checkpoint import save_checkpoint
    from krakenlm.presets import get_preset
    from krakenlm.source import build_model

    cfg = get_preset("mini-gpt")
    model = build_model(config=cfg, seed=0)
    with torch.no_grad():
        direction = torch.randn(cfg.n_embd, generator=torch.Generator().manual_seed(0))
        model.wte.weight[50257:51000] = 0.0
        model.wte.weight[50257:50280] = 50 * direction
        model.wte.weight[50280:50304] = -50 * direction
    save_checkpoint(tmp_path / "m", model, cfg)
    for sampling in ([], ["--temperature", "1.0", "--seed", "3"]):
        r = run("generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "Hello", "--max-new-tokens", "8",
                *sampling)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("Hello") and "outside the GPT-2 vocabulary" not in r.stderr
