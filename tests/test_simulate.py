"""The serving simulator and its report: hand-computed queues, percentiles, traces, SLO planning, CLI."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from krakenlm.cli import main
from krakenlm.costmodel.hardware import load_hardware
from krakenlm.costmodel.simulate import (
    Arrival,
    ConstantTimes,
    CostModelTimes,
    Lengths,
    arrivals,
    load_trace,
    plan_slo,
    simulate,
)
from krakenlm.errors import ConfigError, InputError
from krakenlm.presets import get_preset
from krakenlm.serve.report import METRICS, RequestRecord, parse_slo_targets, percentile, summarize
from krakenlm.serve.scheduler import BatchingPolicy

A100 = load_hardware("a100-40gb-nvswitch")
REPORT_FIELDS = {"rate", "requests", "completed", "failed", "duration_s", "throughput_rps", "output_tokens_per_s",
                 "ttft_s", "tpot_s", "itl_s", "e2e_s", "goodput_rps"}


def _tokens(sim) -> list[tuple[float, tuple[float, ...]]]:
    return [(r.arrival, r.token_times) for r in sim.records]


def test_constant_arrivals_and_step_times_match_a_hand_computed_queue() -> None:
    # Prefill 1 s per request, decode 0.5 s per step, 2 rows, one request every 0.5 s, 2 tokens each.
    # t=0 admit r0, prefill -> 1.0 | t=1 r1, r2 arrived: admit r1 (rows full), prefill -> 2.0, decode r0 -> 2.5
    # t=2.5 r0 leaves, admit r2 -> 3.5, decode r1 -> 4.0 | t=4 r1 leaves, admit r3 -> 5.0, decode r2 -> 5.5
    # t=5.5 decode r3 -> 6.0.
    load = arrivals("constant", 2.0, 4, Lengths(10, 10), Lengths(2, 2))
    assert [a.time for a in load] == [0.0, 0.5, 1.0, 1.5]
    sim = simulate(load, BatchingPolicy(max_batch=2), 64, ConstantTimes(1.0, 0.5), rate=2.0)
    assert _tokens(sim) == [(0.0, (1.0, 2.5)), (0.5, (2.0, 4.0)), (1.0, (3.5, 5.5)), (1.5, (5.0, 6.0))]
    assert (sim.steps, sim.mean_decode_batch, sim.max_waiting) == (5, 1.0, 2)
    r = sim.report
    assert (r["requests"], r["completed"], r["failed"], r["duration_s"]) == (4, 4, 0, 6.0)
    assert r["ttft_s"]["mean"] == pytest.approx((1.0 + 1.5 + 2.5 + 3.5) / 4)
    assert r["e2e_s"]["p50"] == pytest.approx(4.0)  # e2e 2.5, 3.5, 4.5, 4.5
    assert r["tpot_s"]["mean"] == pytest.approx((1.5 + 2.0 + 2.0 + 1.0) / 4)
    assert r["throughput_rps"] == pytest.approx(4 / 6.0) and r["output_tokens_per_s"] == pytest.approx(8 / 6.0)


def test_mixed_lengths_hand_computed_with_batched_decode() -> None:
    # Prefill 1 s, decode 0.5 s, 2 rows. A(0, 3 tokens) B(0.5, 2) C(1.0, 2) D(4.0, 1):
    # t=0 admit A -> 1.0 | t=1 decode A, admit B -> B 2.0, A 2.5 | t=2.5 decode A,B -> 3.0 (both done)
    # t=3 admit C -> 4.0 | t=4 D arrives: admit D -> 5.0 (done), decode C -> 5.5.
    load = [Arrival(0.0, 10, 3), Arrival(0.5, 10, 2), Arrival(1.0, 10, 2), Arrival(4.0, 10, 1)]
    sim = simulate(load, BatchingPolicy(max_batch=2), 64, ConstantTimes(1.0, 0.5), slo={"ttft_s": 1.2})
    assert _tokens(sim) == [(0.0, (1.0, 2.5, 3.0)), (0.5, (2.0, 3.0)), (1.0, (4.0, 5.5)), (4.0, (5.0,))]
    r = sim.report
    assert r["ttft_s"]["p50"] == pytest.approx(1.25) and r["ttft_s"]["p90"] == pytest.approx(2.55)
    assert r["itl_s"]["mean"] == pytest.approx((1.5 + 0.5 + 1.0 + 1.5) / 4)
    assert r["tpot_s"]["mean"] == pytest.approx((1.0 + 1.0 + 1.5) / 3)  # D has one token: no TPOT
    assert r["goodput_rps"] == pytest.approx(2 / 5.5)  # A and D meet TTFT <= 1.2 s
    assert sim.mean_decode_batch == pytest.approx((1 + 2 + 1) / 3)


def test_a_full_queue_refuses_and_the_report_counts_failures() -> None:
    load = [Arrival(0.0, 4, 4) for _ in range(6)]
    sim = simulate(load, BatchingPolicy(max_batch=1, max_queue=2), 64, ConstantTimes(0.1, 0.1))
    r = sim.report
    assert (r["completed"], r["failed"]) == (2, 4)  # two queued, the rest refused (QueueFull)
    too_long = simulate([Arrival(0.0, 60, 10)], BatchingPolicy(), 64, ConstantTimes(0.1, 0.1))
    assert too_long.report["failed"] == 1 and too_long.report["ttft_s"]["p50"] is None


def test_cost_model_times_at_a_low_rate_are_the_idle_estimates() -> None:
    cfg = get_preset("gpt-1.3b")
    times = CostModelTimes(cfg, A100, 2)
    load = arrivals("constant", 0.01, 3, Lengths(256, 256), Lengths(9, 9))  # far apart: never queued
    sim = simulate(load, BatchingPolicy(max_batch=4), cfg.block_size, times)
    ttft = sim.report["ttft_s"]
    assert ttft["p50"] == pytest.approx(times.prefill(256), rel=1e-9)  # arrival times of 100 s round
    assert ttft["p99"] == pytest.approx(times.prefill(256), rel=1e-9)
    steps = [times.decode([256 + k]) for k in range(1, 9)]
    assert sim.report["e2e_s"]["p50"] == pytest.approx(times.prefill(256) + sum(steps), rel=1e-9)
    assert times.decode([300, 310]) == times.decode([305, 305])  # priced at the mean context


def test_report_percentiles_match_numpy_and_fields() -> None:
    rng = random.Random(3)
    values = [rng.random() for _ in range(101)]
    for q in (50, 90, 99):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None
    rec = RequestRecord(arrival=0.0, first_token=0.1, token_times=(0.1, 0.2, 0.4), end=0.4, output_tokens=3)
    report = summarize([rec, RequestRecord(arrival=0.5, ok=False)], rate=2.0)
    assert set(report) >= REPORT_FIELDS and all(set(report[m]) == {"p50", "p90", "p99", "mean"} for m in METRICS)
    assert report["tpot_s"]["p50"] == pytest.approx(0.15) and report["failed"] == 1
    json.dumps(report)  # JSON-ready
    with pytest.raises(InputError, match="slo"):
        summarize([rec], slo={"latency": 1})
    with pytest.raises(InputError, match="first_token"):
        RequestRecord(arrival=0.0)
    with pytest.raises(InputError, match="finite"):
        RequestRecord(arrival=float("nan"), ok=False)


def test_slo_targets_parse() -> None:
    targets = parse_slo_targets("p99_ttft<=200ms, p50_tpot <= 0.05s,mean_e2e<=1500000us")
    assert [(t.stat, t.metric, t.limit_s) for t in targets] == [
        ("p99", "ttft_s", pytest.approx(0.2)), ("p50", "tpot_s", 0.05), ("mean", "e2e_s", pytest.approx(1.5))]
    assert str(targets[0]) == "p99_ttft<=200ms"
    for bad in ("p98_ttft<=1s", "p99_ttft<200ms", "p99_ttft<=-1ms", "p99_ttft<=nanms", "p99_ttft<=1e999s", ""):
        with pytest.raises(InputError, match="slo"):
            parse_slo_targets(bad)


def test_poisson_arrivals_are_seeded(tmp_path) -> None:
    a = arrivals("poisson", 10.0, 2000, Lengths(10, 100), Lengths(5, 5), seed=1)
    assert a == arrivals("poisson", 10.0, 2000, Lengths(10, 100), Lengths(5, 5), seed=1)
    assert a != arrivals("poisson", 10.0, 2000, Lengths(10, 100), Lengths(5, 5), seed=2)
    assert a[-1].time / 1999 == pytest.approx(0.1, rel=0.1)
    assert {x.prompt_len for x in a} <= set(range(10, 101)) and len({x.prompt_len for x in a}) > 50
    with pytest.raises(ConfigError, match="rate"):
        arrivals("poisson", 0.0, 10, Lengths(1, 1), Lengths(1, 1))
    with pytest.raises(ConfigError, match="high"):
        Lengths.parse("100-10", "--prompt")


def test_trace_files(tmp_path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text('{"arrival": 1.5, "prompt_len": 10, "output_len": 3}\n{"arrival": 0.5, "prompt_len": 20, '
                    '"output_len": 2}\n')
    assert load_trace(path) == [Arrival(0.5, 20, 2), Arrival(1.5, 10, 3)]
    path.write_text(json.dumps([{"arrival": -1, "prompt_len": 1, "output_len": 1}]))
    with pytest.raises(ConfigError, match="arrival"):
        load_trace(path)
    path.write_text(json.dumps([{"arrival": 0, "prompt_len": 1.5, "output_len": 1}]))
    with pytest.raises(ConfigError, match="prompt_len"):
        load_trace(path)
    with pytest.raises(ConfigError, match="regular file"):
        load_trace(tmp_path)


def test_plan_slo_picks_the_fewest_chips_that_meet_the_targets() -> None:
    cfg = get_preset("gpt-6.7b")
    load = arrivals("poisson", 20.0, 60, Lengths(512, 512), Lengths(32, 32), seed=0)
    loose = plan_slo(cfg, A100, load, 8, parse_slo_targets("p99_ttft<=1s"), rate=20.0, batches=(4, 16))
    assert loose.best.met and loose.best.chips == min(c.chips for c in loose.tried if c.met)
    assert all(not c.met for c in loose.tried if c.chips < loose.best.chips)
    tight = plan_slo(cfg, A100, load, 8, parse_slo_targets("p99_ttft<=30ms"), rate=20.0, batches=(4, 16))
    assert tight.best.chips > loose.best.chips and tight.best.report["ttft_s"]["p99"] <= 0.03
    with pytest.raises(ConfigError, match="no deployment"):
        plan_slo(cfg, A100, load, 8, parse_slo_targets("p99_ttft<=1us"), rate=20.0, batches=(4,))


def test_simulate_and_plan_slo_cli(tmp_path, capsys) -> None:
    out = tmp_path / "report.json"
    argv = ["simulate", "--model", "gpt-1.3b", "--chips", "2", "--rate", "5", "--requests", "30", "--prompt",
            "64-256", "--generate", "8-16", "--max-batch", "4", "--goodput-slo", '{"ttft_s": 0.05}', "--out", str(out)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) >= REPORT_FIELDS and printed == json.loads(out.read_text())
    assert printed["completed"] == 30 and printed["simulation"]["policy"]["max_batch"] == 4
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps([{"arrival": 0.1 * i, "prompt_len": 100, "output_len": 4} for i in range(5)]))
    assert main(["simulate", "--model", "gpt-1.3b", "--arrivals", str(trace)]) == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 5
    assert main(["simulate", "--model", "gpt-1.3b"]) == 2
    assert "rate" in capsys.readouterr().err
    assert main(["plan", "--model", "gpt-1.3b", "--chips", "4", "--prompt", "256", "--generate", "16", "--slo",
                 "p99_ttft<=100ms", "--rate", "10", "--requests", "40", "--batches", "4,8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["best"]["report"]["ttft_s"]["p99"] <= 0.1 and data["tried"]
