"""Smoke runs of `krakenlm bench` on tiny models (2 ranks, 2 rounds): structure, never speed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from krakenlm.bench import netns
from krakenlm.cli import main
from krakenlm.costmodel.calibrate import load_records, parse_record
from tests.conftest import as_a_terminal_starts_it

VARIANTS = {"gpt", "gpt/no-comm", "parallel", "parallel/no-comm", "kraken", "kraken/no-comm", "kraken/blocking",
            "ladder", "ladder/no-comm", "ladder/blocking", "gpt/dtensor", "gpt/single", "kraken/single"}


def _run(tmp_path, *extra: str) -> dict:
    assert main(["bench", "--quick", "--no-plots", "--out", str(tmp_path), *extra]) == 0
    return json.loads((tmp_path / "bench.json").read_text())


def _check_cell(cell: dict) -> None:
    assert {"prefill", "decode"} <= set(cell["ratios"])
    for phase in cell["ratios"].values():
        for stats in phase.values():
            assert stats["median"] > 0 and stats["min"] > 0
    for label, v in cell["variants"].items():
        assert v["prefill"]["median"] > 0 and v["prefill"]["n"] == len(v["prefill"]["samples"]) >= 1, label
    assert cell["rounds"]["kept"] + cell["rounds"]["dropped"] >= 2
    for arch in ("kraken", "ladder"):
        assert set(cell["breakdown"][arch]) >= {"GEMM", "overlapped GEMM", "AllReduce", "wall"}
    assert cell["breakdown"]["ladder"]["overlapped GEMM"] > 0  # modules compute while sums are in flight


def test_bench_quick_loopback(tmp_path, capsys):
    result = _run(tmp_path, "--prompts", "32,5000")  # 5000 is past the tiny models' 4096-token context
    out, err = capsys.readouterr()
    assert [(s["prompt_len"], "context (4096 tokens)" in s["reason"]) for s in result["skipped"]] == [(5000, True)]
    assert "skipping tiny T=5000" in err
    assert "kraken/gpt" in out and "TTFT ladder/kraken" in out
    (cell,) = result["cells"]
    assert set(cell["variants"]) == VARIANTS
    _check_cell(cell)
    assert {"ladder/gpt", "ladder/kraken", "ladder/no-comm", "ladder/blocking"} <= set(cell["ratios"]["prefill"])
    assert 0.0 <= cell["hidden_fraction"]["ladder"]["timeline"] <= 1.0
    assert cell["peer_check"]["ok"], cell["peer_check"]
    assert result["environment"]["torch"] and "contamination" in result
    records = load_records(tmp_path / "bench.json")
    assert {r["arch"] for r in records} == {"gpt", "parallel", "kraken", "ladder"}
    for rec in records:
        parse_record(rec)  # the cost model's calibration accepts every record as it is
    assert (tmp_path / "bench.csv").read_text().count("\n") > len(VARIANTS)


def test_bench_interrupted_keeps_the_cells_it_finished(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) after the first cell of a sweep: exit
    130 within seconds, and bench.json holds the finished cells, marked interrupted."""
    prompts = [16, 24, 32, 40, 48, 56, 64, 72]
    cmd = [sys.executable, "-m", "krakenlm", "bench", "--quick", "--no-plots", "--no-peer", "--no-breakdown",
           "--prompts", ",".join(map(str, prompts)), "--out", str(tmp_path)]
    leader = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, preexec_fn=as_a_terminal_starts_it)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(leader.stderr), daemon=True).start()
    deadline = time.monotonic() + 120
    while not any(line.startswith("[bench]") for line in lines) and time.monotonic() < deadline:
        assert leader.poll() is None, "".join(lines)
        time.sleep(0.1)
    os.killpg(leader.pid, signal.SIGINT)
    assert leader.wait(timeout=60) == 130, "".join(lines)
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["interrupted"] and 1 <= len(result["cells"]) < len(prompts)
    assert [c["prompt_len"] for c in result["cells"]] == prompts[:len(result["cells"])]
    for cell in result["cells"]:
        assert cell["ratios"]["prefill"]["kraken/gpt"]["median"] > 0


def test_bench_shaped_link_cleans_up_namespaces(tmp_path):
    try:
        with netns.Links(2, 1.0):
            pass
    except netns.NetnsUnavailable as err:
        pytest.skip(f"network namespaces unavailable: {err}")
    before = set(netns.list_namespaces())
    result = _run(tmp_path, "--links", "1", "--no-peer", "--no-breakdown", "--decode-steps", "1")
    (cell,) = result["cells"]
    assert cell["link_gbps"] == 1.0 and "gpt/dtensor" not in cell["variants"]
    assert cell["ratios"]["prefill"]["kraken/gpt"]["median"] > 0
    assert set(netns.list_namespaces()) == before


def test_bench_rejects_bad_grid(capsys):
    assert main(["bench", "--quick", "--shapes", "nope"]) == 2
    assert "unknown shape" in capsys.readouterr().err


def test_bench_checkpoint_sources_are_checked_before_any_rank_starts(tmp_path, capsys):
    from krakenlm.checkpoint import save_checkpoint
    from krakenlm.source import build_model
    from tests.conftest import tiny

    for name, cfg in (("k4", tiny("kraken", n_sub=4)), ("g", tiny("gpt"))):
        save_checkpoint(tmp_path / name, build_model(config=cfg, seed=0), cfg)
    assert main(["bench", "--quick", "--checkpoints", f"kraken={tmp_path / 'k4'}"]) == 2
    assert "needs tp=4" in capsys.readouterr().err
    assert main(["bench", "--quick", "--checkpoints", f"kraken={tmp_path / 'g'}"]) == 2
    assert "holds a gpt model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--quick", "--checkpoints", f"llama={tmp_path / 'g'}"])
    assert "expected gpt=DIR" in capsys.readouterr().err


def test_round_log_drops_rounds_where_others_used_the_cpu():
    from krakenlm.bench.timing import RoundLog, paired_ratio

    log = RoundLog()
    assert log.add(other_cpu_s=0.0, wall_s=1.0, idle_wait_s=0.0, max_other_cores=0.25)
    assert not log.add(other_cpu_s=0.9, wall_s=1.0, idle_wait_s=0.0, max_other_cores=0.25)
    assert log.to_dict()["kept"] == 1 and log.to_dict()["dropped"] == 1
    assert paired_ratio([1.0, 4.0, 3.0], [2.0, 2.0, 3.0]).median == 1.0  # ratio per round, then the median


def _synthetic_cell(shape: str, width: int, prompt: int, link: float | None, ratio: float) -> dict:
    """A measured-looking cell without running anything: what the merge and the grid figure read."""
    variants = {arch: {"arch": arch, "tp": 2, "preset": None, "config": {"n_embd": width, "n_layer": 2},
                       "prefill": {"median": 0.1 * (ratio if arch == "kraken" else 1.0)}}
                for arch in ("gpt", "parallel", "kraken")}
    return {"shape": shape, "tp": 2, "prompt_len": prompt, "batch": 1, "dtype": "bf16", "link_gbps": link,
            "variants": variants, "rounds": {"kept": 1, "dropped": 0, "other_cpu_s": [0.0], "wall_s": [1.0]},
            "ratios": {"prefill": {"kraken/gpt": {"median": ratio}, "kraken/parallel": {"median": ratio}}}}


def test_merge_runs_and_plot_speedup_grid(tmp_path):
    from krakenlm.bench import plots, results

    def run(cpu: str, cells: list[dict]) -> dict:
        return {"environment": {"cpu": cpu, "git_commit": "abc"}, "argv": ["bench"], "options": {"decode_steps": 0},
                "skipped": [], "contamination": {}, "cells": cells}

    small = run("cpu A", [_synthetic_cell("small", 64, t, None, 0.9) for t in (128, 512)])
    big = run("cpu A", [_synthetic_cell("big:2", 256, 2048, 1.0, 0.6), _synthetic_cell("big:2", 256, 512, None, 1.1)])
    merged = results.merge([small, big])
    assert [c["run"] for c in merged["cells"]] == [0, 0, 1, 1] and merged["environment"]["cpu"] == "cpu A"
    assert merged["cells"][2]["environment"]["git_commit"] == "abc" and len(merged["records"]) == 12
    assert plots.speedup_grid(merged, tmp_path / "grid.png").stat().st_size > 0
    with pytest.raises(ValueError, match="more than one run"):
        results.merge([small, small])


def test_grid_targets_script_reads_a_committed_grid():
    """benchmarks/grid_targets.py on the committed grid: every per-FLOP value equals the cell's paired
    no-comm ratio over its FLOP ratio (computed here from the JSON), and each miss names its causes."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    grid = root / "docs/results/bench-grid.json"
    out = subprocess.run([sys.executable, str(root / "benchmarks/grid_targets.py"), str(grid), "--json"],
                         capture_output=True, text=True, check=True).stdout
    rows = json.loads(out[:out.rindex("]") + 1])
    cells = json.loads(grid.read_text())["cells"]
    expected = {}
    for c in cells:
        if c["prompt_len"] in (512, 2048) and c["batch"] == 1:
            link = "loopback" if c["link_gbps"] is None else f"{c['link_gbps']:g} Gbit/s"
            key = f"{c['shape']} T={c['prompt_len']} B=1 {c['dtype']} {link}"
            expected[key] = c["ratios"]["prefill"]["kraken-nc/gpt-nc"]["median"] / c["flop_ratio"]["kraken/gpt"]
    compute = [r for r in rows if r["target"].startswith("compute")]
    assert {r["cell"]: r["value"] for r in compute} == pytest.approx(expected)
    for r in rows:
        assert r["met"] == (r["value"] <= float(r["target"].split()[-1]) if "<=" in r["target"]
                            else r["value"] >= float(r["target"].split()[-1]))
        assert r["met"] or "ms" in r["why"] or "no-comm" in r["why"]


def test_bench_system_overlap_variants_are_timed_and_recorded(tmp_path, capsys):
    """chunked:K and collective-matmul next to the blocking models and Kraken: timed, their hidden fraction
    measured in place and on the timeline, and written as records the calibration fits overlap factors to."""
    result = _run(tmp_path, "--overlap", "chunked:4,collective-matmul", "--no-peer", "--no-single",
                  "--no-breakdown", "--no-roofline")
    out = capsys.readouterr().out
    (cell,) = result["cells"]
    systems = {"gpt/chunked:4", "parallel/chunked:4", "gpt/collective-matmul", "parallel/collective-matmul"}
    assert systems <= set(cell["variants"])
    for label in systems:
        arch, mode = label.split("/")
        assert cell["variants"][label]["overlap"] == mode and cell["variants"][label]["decode"]["median"] > 0
        assert {f"{arch}-{mode}/{arch}", f"kraken/{arch}-{mode}"} <= set(cell["ratios"]["prefill"])
        assert 0.0 <= cell["hidden_fraction"][label]["timeline"] <= 1.0
        assert "in_place" in cell["hidden_fraction"][label]
        assert label in out  # the overlap table
    records = [r for r in load_records(tmp_path / "bench.json") if r.get("variant") in systems]
    assert len(records) == 2 * len(systems)
    by = {(r["variant"], r["phase"]): r for r in records}
    assert by["gpt/chunked:4", "prefill"]["overlap"] == "chunked:4"  # 32 tokens: four chunks
    assert by["gpt/chunked:4", "decode"]["overlap"] == "chunked:1"  # one token per step: one chunk, blocking
    assert by["parallel/collective-matmul", "decode"]["overlap"] == "collective-matmul"
    for rec in records:
        assert str(parse_record(rec).overlap) == rec["overlap"]


def test_bench_rejects_an_overlap_that_is_no_system_mode(tmp_path, capsys):
    assert main(["bench", "--quick", "--no-plots", "--overlap", "full", "--out", str(tmp_path)]) == 2
    assert "give chunked:K or collective-matmul" in capsys.readouterr().err


OVERLAP_GRID = "docs/results/bench-overlap-xeon167.json"


def _overlap_grid() -> dict:
    from pathlib import Path

    return json.loads((Path(__file__).resolve().parents[1] / OVERLAP_GRID).read_text())


def test_predicted_ratios_are_the_estimator_on_the_bench_records():
    """krakenlm/bench/predicted.py on the committed overlap grid: each overlap ratio's prediction is the
    estimator's time of the numerator's record over the denominator's, records as the bench wrote them
    (overlap chunked:K with the chunks used), and its measured value the cell's paired median."""
    from krakenlm.bench.predicted import cell_name, ratio_rows
    from krakenlm.costmodel.calibrate import predict_point
    from krakenlm.costmodel.hardware import load_hardware

    result, hw = _overlap_grid(), load_hardware("cpu-gloo")
    seconds = {}
    for rec in result["records"]:
        cell = next(c for c in result["cells"] if c["link_gbps"] == rec["link_gbps"]
                    and c["prompt_len"] == rec["prompt_len"] and c["batch"] == rec["batch"])
        seconds[cell_name(cell), rec.get("variant", rec["arch"])] = predict_point(parse_record(rec), hw)
    rows = [r for c in result["cells"] for r in ratio_rows(c, hw, overlap_only=True)]
    assert len(rows) == 8 * len(result["cells"])  # 4 variants, each over its model and Kraken over it
    for r in rows:
        num, den = r["ratio"].split("/")
        num, den = (x if x in ("gpt", "parallel", "kraken") else x.replace("-", "/", 1) for x in (num, den))
        assert r["predicted"] == pytest.approx(seconds[r["cell"], num] / seconds[r["cell"], den], rel=1e-9)
        cell = next(c for c in result["cells"] if cell_name(c) == r["cell"])
        assert r["measured"] == cell["ratios"]["prefill"][r["ratio"]]["median"]


def test_held_out_fits_find_the_cost_models_own_times_again():
    """The overlap grid with every time replaced by a known spec's prediction: in-sample errors are 0 and
    each link's cells, predicted by overlap fields refitted from elsewhere on the other links, are within
    1%; a wrong start spec predicts the same cells worse (the refit did the work)."""
    from krakenlm.bench.predicted import held_out_rows, link_name, predict_variant, ratio_rows
    from krakenlm.bench.sweep import ratio_pairs
    from krakenlm.costmodel.calibrate import OVERLAP_FIELDS
    from krakenlm.costmodel.hardware import load_hardware

    result = _overlap_grid()
    truth = load_hardware("cpu-gloo").with_factors(overlap_slowdown=0.6, overlap_step_s=2e-3)
    start = truth.with_factors(overlap_slowdown=0.05, overlap_step_s=1e-5)
    for cell in result["cells"]:
        for label, v in cell["variants"].items():
            v["prefill"]["median"] = predict_variant(cell, label, truth) or v["prefill"]["median"]
        systems = {label: v["arch"] for label, v in cell["variants"].items() if v.get("overlap")}
        for name, num, den in ratio_pairs(systems):
            if name in cell["ratios"]["prefill"]:
                r = cell["variants"][num]["prefill"]["median"] / cell["variants"][den]["prefill"]["median"]
                cell["ratios"]["prefill"][name] |= {"median": r, "min": r, "max": r}
    assert all(abs(r["error_pct"]) < 1e-6 for c in result["cells"] for r in ratio_rows(c, truth, overlap_only=True))
    held = held_out_rows(result, start, OVERLAP_FIELDS, link_name, overlap_only=True)
    assert len(held) == 8 * len(result["cells"]) and max(abs(r["error_pct"]) for r in held) < 1.0
    assert max(abs(r["error_pct"]) for c in result["cells"] for r in ratio_rows(c, start, overlap_only=True)) > 5


def test_overlap_plot_only_where_a_grid_has_overlap_variants(tmp_path):
    from pathlib import Path

    from krakenlm.bench import plots

    path = plots.overlap(_overlap_grid(), tmp_path / "overlap.png")
    assert path is not None and path.stat().st_size > 0
    grid = json.loads((Path(__file__).resolve().parents[1] / "docs/results/bench-grid.json").read_text())
    assert plots.overlap(grid, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
