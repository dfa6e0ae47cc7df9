"""The README's main command, shrunk: every stage runs and the summary is coherent."""

import json

from krakenlm.demo import DemoConfig, run_demo


def test_demo_end_to_end_smoke(tmp_path, capfd):
    args = DemoConfig(out=str(tmp_path / "demo"), steps=3, prompt_len=64, rounds=2, device="cpu")
    assert run_demo(args) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["val_perplexity"]) == {"kraken", "gpt"}
    assert all(1 < p < 60000 for p in summary["val_perplexity"].values())
    measured = summary["measured"]["median_ms"]
    assert set(measured) == {"kraken", "kraken/no-comm", "kraken/blocking", "gpt", "gpt/no-comm"}
    assert 0 <= summary["measured"]["hidden_fraction"]["timeline"] <= 1
    assert all(t > 0 for t in measured.values()) and summary["measured"]["kraken_over_gpt"] > 0
    assert all(t > 0 for t in summary["predicted_ms"].values())
    out = capfd.readouterr().out
    assert "Kraken / standard TTFT" in out and out.count("ROMEO") >= 1
    assert run_demo(args) == 0  # a rerun reuses the trained checkpoints
    assert "trained checkpoint found" in capfd.readouterr().out


def test_demo_command_line_builds_the_config(monkeypatch):
    """`krakenlm demo` flags land in the matching DemoConfig fields; its defaults are the config's own."""
    from krakenlm.cli import _demo_config, build_parser

    monkeypatch.delenv("KRAKENLM_DEMO_DIR", raising=False)
    assert _demo_config(build_parser().parse_args(["demo"])) == DemoConfig()
    args = build_parser().parse_args(["demo", "--steps", "5", "--rounds", "3", "--prompt-len", "32",
                                      "--dtype", "fp32", "--device", "cpu", "--out", "x"])
    assert _demo_config(args) == DemoConfig(out="x", steps=5, rounds=3, prompt_len=32, dtype="fp32", device="cpu")
