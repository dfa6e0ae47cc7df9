"""The GPU check's code runs here too: on the CPU every check it makes must pass (CI has no GPU, so this
is what keeps scripts/gpu-check working), and without CUDA the GPU run says so and claims nothing."""

import json

import torch

from krakenlm.doctor import run_doctor


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
