"""The GPU check's code runs here too: on the CPU every check it makes must pass (CI has no GPU, so this
is what keeps scripts/gpu-check working), and without CUDA the GPU run says so and claims nothing."""

import json

import pytest
import torch

from krakenlm.doctor import run_doctor
from krakenlm.interop.vllm_process import has_vllm, vllm_venv


def test_doctor_checks_pass_on_the_cpu(tmp_path, capfd):
    assert run_doctor(tmp_path, device="cpu", archs=["kraken"], stages=["forward", "two-ranks"], timings=False) == 0
    report = json.loads((tmp_path / "doctor.json").read_text())
    names = [c["name"] for c in report["checks"]]
    assert names == ["forward kraken fp32: cpu == cpu", "forward kraken bf16: cpu == cpu",
                     "2 ranks kraken: equal to one device"]
    assert all(c["ok"] for c in report["checks"])
    assert "PASS" in capfd.readouterr().out


def test_doctor_without_cuda_claims_nothing(tmp_path, capfd):
    if torch.cuda.is_available():
        return
    assert run_doctor(tmp_path) == 0
    assert "nothing claimed" in capfd.readouterr().out
    assert not (tmp_path / "doctor.json").exists()


def test_doctor_without_vllm_says_the_plugin_was_not_run(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("KRAKENLM_VLLM_VENV", str(tmp_path / "no-venv"))
    assert run_doctor(tmp_path / "out", device="cpu", stages=["vllm"], timings=False) == 0
    [check] = json.loads((tmp_path / "out" / "doctor.json").read_text())["checks"]
    assert check["ok"] is None and "no vLLM venv" in check["detail"]
    assert "SKIP" in capfd.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not has_vllm(), reason=f"NOT TESTED: the doctor's vLLM stage (no vLLM venv at {vllm_venv()})")
def test_doctor_vllm_stage_matches_krakenlm(tmp_path):
    """The stage a GPU machine runs, here on vLLM's CPU build: Kraken's greedy tokens through the plugin."""
    assert run_doctor(tmp_path, device="cpu", stages=["vllm"], timings=False) == 0
    checks = json.loads((tmp_path / "doctor.json").read_text())["checks"]
    assert [(c["name"], c["ok"]) for c in checks] == [("vLLM plugin kraken TP 1: equal to krakenlm", True)]
