"""Cost model tools: Kraken latency study, planner, calibration, CLI and plots."""

from __future__ import annotations

import argparse
import json

import pytest

from krakenlm.costmodel.calibrate import FIT_FIELDS, calibrate, load_records, mdape, parse_record, predict_point
from krakenlm.costmodel.cli import add_plan_parser, add_predict_parser
from krakenlm.costmodel.estimator import Workload
from krakenlm.costmodel.hardware import load_hardware
from krakenlm.costmodel.planner import kraken_variants, plan
from krakenlm.costmodel.plots import make_plots
from krakenlm.costmodel.studies import (
    DOCS,
    PAPER_KRAKEN_SPEEDUP,
    RESULTS,
    CpuCalibration,
    cpu_calibration,
    doc_blocks,
    fill_blocks,
    geomean,
    kraken_speedup_grid_markdown,
    kraken_study,
    table1_markdown,
    table2_records,
)
from krakenlm.errors import ConfigError
from krakenlm.presets import get_preset

A100 = load_hardware("a100-40gb-nvswitch")
CPU = load_hardware("cpu-gloo-nominal")


# Kraken latency study -----------------------------------------------------------------------------
def test_kraken_study_shape_and_headline() -> None:
    rows = kraken_study()
    assert len(rows) == 20
    assert all(r.speedup > r.parallel_speedup > 1.0 for r in rows)
    g = geomean([r.speedup for r in rows])
    assert abs(g - (1 + PAPER_KRAKEN_SPEEDUP)) < 0.1  # predicted 1.354x vs the paper's 1.356x
    # Communication matters most for small models and short prompts.
    by = {(r.size, r.prompt, r.tp): r.speedup for r in rows}
    assert by[("1.3b", 128, 8)] > by[("175b", 2048, 8)]
    assert by[("13b", 128, 8)] > by[("13b", 128, 4)]


def test_kraken_decode_pays_for_its_wider_kv_cache() -> None:
    rows = {(r.size, r.prompt, r.tp): r for r in kraken_study(phase="decode")}
    assert rows[("1.3b", 128, 8)].speedup > 1.5  # latency-bound all-reduces dominate
    assert rows[("175b", 2048, 4)].speedup < 1.0  # N*d-wide KV cache read every step
    assert 1.0 < geomean([r.speedup for r in rows.values()]) < geomean([r.speedup for r in kraken_study()])


# Planner --------------------------------------------------------------------------------------------
def test_kraken_variants_keep_parameters_per_layer() -> None:
    base = get_preset("kraken4-13b")
    variants = kraken_variants(base)
    assert {v.n_sub for v in variants} == {2, 4, 8}
    for v in variants:
        assert v.total_heads == base.total_heads
        assert v.layer_params() == pytest.approx(base.layer_params(), rel=0.02)


def test_plan_latency_objective_picks_fastest() -> None:
    result = plan(get_preset("kraken4-13b"), A100, Workload(prompt=512, generate=16), chips=8, objective="latency")
    totals = [c.estimate.total_s for c in result.ranked]
    assert totals == sorted(totals)
    assert result.best.estimate.chips == 8
    assert "Chosen:" in result.explanation and "feasible" in result.explanation


def test_plan_cost_objective_and_target() -> None:
    wl = Workload(prompt=1984, generate=64)
    free = plan(get_preset("gpt-13b"), A100, wl, chips=8, batches=(1, 8, 32))
    costs = [c.estimate.chip_seconds_per_token for c in free.ranked]
    assert costs == sorted(costs)
    assert free.best.estimate.workload.batch == 32  # batching amortises the weight reads
    target = free.best.estimate.total_s * 0.5
    tight = plan(get_preset("gpt-13b"), A100, wl, chips=8, batches=(1, 8, 32), target_latency=target)
    assert tight.best.estimate.total_s <= target
    assert tight.rejected["latency"] > 0


def test_plan_reports_when_nothing_fits() -> None:
    with pytest.raises(ConfigError, match="nothing fits"):
        plan(get_preset("gpt-175b"), A100, Workload(prompt=2048), chips=2)
    with pytest.raises(ConfigError, match="chips"):
        plan(get_preset("gpt-1.3b"), A100, Workload(), chips=0)
    with pytest.raises(ConfigError, match="objective"):
        plan(get_preset("gpt-1.3b"), A100, Workload(), chips=2, objective="speed")


# Calibration ----------------------------------------------------------------------------------------
def _synthetic(truth, dtypes: tuple[str, ...] = ("bf16",)) -> list[dict]:
    recs = []
    for preset, arch, tp in [("gpt2-124m", "gpt", 2), ("mini-kraken-2way", "kraken", 2), ("gpt2-350m", "gpt", 2),
                             ("mini-gpt", "gpt", 1)]:
        for phase, batch, prompt in [("prefill", 1, 512), ("prefill", 4, 256), ("decode", 1, 128), ("decode", 8, 256)]:
            for gbps in (None, 1.0):
                for dtype in dtypes:
                    rec = {"arch": arch, "preset": preset, "tp": tp, "batch": batch,
                           "prompt_len": min(prompt, get_preset(preset).block_size),
                           "dtype": dtype, "phase": phase, "link_gbps": gbps, "seconds": 1.0}
                    rec["seconds"] = predict_point(parse_record(rec), truth)
                    recs.append(rec)
    return recs


def test_calibration_recovers_known_factors(tmp_path) -> None:
    truth = CPU.with_factors(matmul_eff=0.55, memory_eff=0.7, comm_eff=0.4)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"records": _synthetic(truth)}))
    result = calibrate(CPU, load_records(path))
    for key in ("matmul_eff", "memory_eff", "comm_eff"):
        assert result.fitted[key] == pytest.approx(getattr(truth, key), rel=0.01)
    assert result.mdape_before > 10 and result.mdape_after < 0.1
    assert "median |error|" in result.table()


def test_calibration_fits_one_efficiency_per_dtype() -> None:
    truth = CPU.with_factors(matmul_eff={"bf16": 0.9, "fp32": 0.45}, memory_eff={"bf16": 0.4, "fp32": 0.65},
                             comm_eff=0.5)
    records = _synthetic(truth, ("bf16", "fp32"))
    result = calibrate(CPU, records)
    for key in ("matmul_eff", "memory_eff"):
        for dtype in ("bf16", "fp32"):
            assert result.fitted[f"{key}[{dtype}]"] == pytest.approx(truth.eff(key, dtype), rel=0.01)
    assert result.mdape_after < 0.1
    shared = calibrate(CPU, records, per_dtype=False)  # one factor cannot serve both kernels
    assert "matmul_eff" in shared.fitted and shared.mdape_after > 10


def test_calibration_fits_pope_table2() -> None:
    result = calibrate(load_hardware("tpu-v4"), table2_records())
    assert result.mdape_after < 5 < result.mdape_before
    assert result.mdape_after == pytest.approx(3.8, abs=0.1)  # as in docs/costmodel.md
    assert all(0 < v <= 1 for v in result.fitted.values())


def test_calibration_record_errors() -> None:
    good = {"arch": "gpt", "preset": "mini-gpt", "tp": 1, "batch": 1, "prompt_len": 8, "dtype": "bf16",
            "phase": "prefill", "link_gbps": None, "seconds": 0.01}
    assert parse_record(good).link_bw is None
    assert parse_record(good | {"link_gbps": 8}).link_bw == pytest.approx(1e9)
    with pytest.raises(ConfigError, match="missing"):
        parse_record({k: v for k, v in good.items() if k != "seconds"})
    with pytest.raises(ConfigError, match="arch"):
        parse_record(good | {"arch": "kraken"})
    with pytest.raises(ConfigError, match="phase"):
        parse_record(good | {"phase": "train"})
    with pytest.raises(ConfigError, match="fields"):
        calibrate(CPU, [good], fields=("peak_flops",))


# CLI and plots --------------------------------------------------------------------------------------
def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="verb", required=True)
    add_predict_parser(sub)
    add_plan_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_predict_json_and_table(capsys) -> None:
    assert _run(["predict", "--model", "palm-540b", "--hardware", "tpu-v4", "--chips", "64", "--batch", "64",
                 "--prompt", "1984", "--generate", "64", "--dtype", "int8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["decode"]["layout"].startswith("2d-ws") and data["chips"] == 64
    assert _run(["predict", "--model", "kraken4-1.3b", "--chips", "4", "--layout", "kraken"]) == 0
    out = capsys.readouterr().out
    assert "TTFT" in out and "kraken" in out
    ttft = {}
    for head in ("sharded", "replicated"):  # the whole LM head on each rank can only cost more
        assert _run(["predict", "--model", "gpt2-124m", "--hardware", "cpu-gloo", "--chips", "2", "--prompt", "512",
                     "--lm-head", head, "--json"]) == 0
        ttft[head] = json.loads(capsys.readouterr().out)["ttft_s"]
    assert ttft["replicated"] > ttft["sharded"]


def test_cli_plan(capsys, tmp_path) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(get_preset("gpt-1.3b").to_dict()))
    assert _run(["plan", "--config", str(cfg), "--chips", "8", "--batches", "1,4", "--objective", "latency",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["best"]["estimate"]["chips"] in (1, 2, 4, 8) and data["ranked"]
    with pytest.raises(ConfigError, match="batches"):
        _run(["plan", "--model", "gpt-1.3b", "--batches", "one"])


def test_make_plots(tmp_path) -> None:
    paths = make_plots(tmp_path)
    assert len(paths) == 6
    for p in paths:
        assert p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG"


def test_calibrate_cli_on_shipped_bench_results(tmp_path, capsys):
    from krakenlm.cli import main

    fitted = tmp_path / "fitted.json"
    records = RESULTS / "bench-124m-t512.json"
    assert main(["calibrate", "--records", str(records), "--save", str(fitted)]) == 0
    out = capsys.readouterr().out
    before, after = (float(x) for x in out.split("median |error|: ")[1].split("% before, ")[0:1]
                     + out.split("% before, ")[1].split("% after")[0:1])
    assert after < 10 < before
    spec = load_hardware(fitted)
    assert spec.name == "fitted" and "bench-124m-t512.json (32 records)" in spec.description
    assert main(["calibrate", "--records", str(RESULTS / "bench-124m-t512-run2-loopback.json"), "--markdown",
                 "--fields", "matmul_eff,attention_eff,memory_eff,alpha,layer_overhead_s,link_bw",
                 "--validate", str(RESULTS / "bench-124m-t512-run1.json")]) == 0
    out = capsys.readouterr().out
    assert "| point | measured ms |" in out and "Held out" in out and out.count(" 1Gb/s |") == 12
    assert main(["calibrate", "--records", str(tmp_path / "missing.json")]) == 2
    assert "cannot read records" in capsys.readouterr().err


def test_contaminated_cells_are_dropped_on_request() -> None:
    run1 = RESULTS / "bench-124m-t512-run1.json"
    everything, clean = load_records(run1), load_records(run1, clean_only=True)
    assert len(everything) == 32  # run1's loopback cells had no clean round
    assert len(clean) == 12 and all(r["link_gbps"] == 1.0 for r in clean if r["tp"] == 2)


@pytest.fixture(scope="module")
def cpu() -> CpuCalibration:
    return cpu_calibration()


def test_shipped_records_calibrate_within_10_percent_held_out(cpu) -> None:
    assert cpu.fit.mdape_before > 30  # the nominal spec is far off
    assert cpu.fit.mdape_after <= 10
    assert mdape(cpu.loo) <= 10
    for held in cpu.held_out:
        assert mdape(held.rows) <= 10, held.name
    assert "median \\|error\\|" in cpu.fit_markdown() and "Held out" in cpu.held_out_markdown()


def test_shipped_records_need_per_dtype_efficiencies(cpu) -> None:
    fitted = cpu.fit.fitted
    # bf16 GEMMs (avx512_bf16) run at over twice the fp32 fraction of peak on this CPU.
    assert fitted["matmul_eff[bf16]"] > 1.5 * fitted["matmul_eff[fp32]"]
    assert all(0 < fitted[f"attention_eff[{d}]"] < 0.5 for d in ("bf16", "fp32"))  # attention < GEMM rate
    shared = calibrate(CPU, load_records(RESULTS / "bench-124m-t512.json"), fields=FIT_FIELDS, per_dtype=False)
    assert shared.mdape_after > 2 * cpu.fit.mdape_after


def test_bundled_cpu_gloo_is_the_shipped_fit(cpu) -> None:
    from krakenlm.costmodel.hardware import SPEC_DIR

    bundled = load_hardware("cpu-gloo")  # the file, whatever an earlier test (the demo) calibrated here
    assert bundled == load_hardware(SPEC_DIR / "cpu-gloo.json")
    for key, value in cpu.fit.fitted.items():
        field, _, dtype = key.rstrip("]").partition("[")
        got = bundled.eff(field, dtype) if dtype else getattr(bundled, field)
        assert got == pytest.approx(value, rel=1e-6), key


def test_calibrated_spec_only_by_its_own_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from krakenlm.costmodel import hardware

    monkeypatch.setattr(hardware, "machine_spec", lambda: None)
    with pytest.raises(ConfigError, match="cpu-gloo@here"):
        load_hardware("cpu-gloo@here")
    here = load_hardware("cpu-gloo-nominal").with_factors(name="cpu-gloo@here", alpha=1e-3)
    monkeypatch.setattr(hardware, "machine_spec", here.to_dict)
    assert load_hardware("cpu-gloo@here") == here
    assert load_hardware("cpu-gloo") == load_hardware(hardware.SPEC_DIR / "cpu-gloo.json") != here


def test_validation_tables_render() -> None:
    t1 = table1_markdown()
    assert "| multiquery-batch | 42,653 | 43,000 | -0.8% |" in t1
    grid = kraken_speedup_grid_markdown()
    assert grid.count("\n| ") == 5 and "paper (measured, TensorRT-LLM): 1.356x" in grid


def test_generated_doc_tables_are_current(cpu) -> None:
    blocks = doc_blocks(cpu)
    for path in DOCS:
        text = path.read_text()
        assert fill_blocks(text, blocks) == text, f"stale: python -m krakenlm.costmodel.studies --write ({path})"
    assert all(f"<!-- costmodel:{name} -->" in DOCS[0].read_text() for name in blocks)
