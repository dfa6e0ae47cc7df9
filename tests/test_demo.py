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
