"""The serving simulator and its report: hand-computed queues, percentiles, traces, SLO planning, CLI."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest

from krakenlm.batching.report import METRICS, RequestRecord, parse_slo_targets, percentile, summarize
from krakenlm.batching.scheduler import BatchingPolicy, decode_shape
from krakenlm.batching.workload import Arrival, Lengths, LoadSpec, arrivals, load_trace
from krakenlm.cli import main
from krakenlm.costmodel.estimator import Layout, Workload, phase_estimate
from krakenlm.costmodel.hardware import load_hardware
from krakenlm.costmodel.simulate import ConstantTimes, CostModelTimes, HostOverhead, plan_slo, simulate
from krakenlm.errors import ConfigError, InputError
from krakenlm.presets import get_preset
from krakenlm.serve.loadtest import prompt_ids

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


def test_cost_model_times_in_a_given_layout_with_host_overhead() -> None:
    """A pinned layout prices every step with phase_estimate in that layout; the host overhead adds per prefill,
    per decode step and per running row, nothing else."""
    cfg = get_preset("gpt-1.3b")
    layout = Layout("1d-ws", "heads", 2, "replicated")
    plain = CostModelTimes(cfg, A100, 2, dtype="fp16", layout=layout)
    for phase, batch, got in (("prefill", 1, plain.prefill(300)), ("decode", 3, plain.decode([290, 300, 310]))):
        want = phase_estimate(cfg, A100, Workload(batch=batch, prompt=300, dtype="fp16"), phase, layout).time_s
        assert got == pytest.approx(want, rel=1e-12)
    over = CostModelTimes(cfg, A100, 2, dtype="fp16", layout=layout, overhead=HostOverhead(0.01, 0.002, 0.0005))
    assert over.prefill(300) == pytest.approx(plain.prefill(300) + 0.01, rel=1e-12)
    assert over.decode([300] * 4) == pytest.approx(plain.decode([300] * 4) + 0.002 + 4 * 0.0005, rel=1e-12)
    assert CostModelTimes(cfg, A100, 2, dtype="fp16").decode([300]) <= plain.decode([300])  # the fastest layout
    with pytest.raises(ConfigError, match="layout"):
        CostModelTimes(cfg, A100, 2, layout=Layout("1d-ws", "heads", 4))
    with pytest.raises(ConfigError, match="row_s"):
        HostOverhead(row_s=-1e-3)


class _Recording(ConstantTimes):
    """Constant step times that remember the contexts every decode step was priced at."""

    def __init__(self) -> None:
        super().__init__(1.0, 1.0)
        self.decoded: list[list[int]] = []

    def decode(self, contexts) -> float:
        self.decoded.append(list(contexts))
        return self.decode_s


def test_engine_shapes_price_the_rows_and_keys_the_engine_computes() -> None:
    """A in row 0 (2 tokens) and B in row 1 (4 tokens), prompts of 100: after A leaves, the eager engine still
    computes rows 0-1 for B, over a key window of 112 (its 101-102 cached tokens rounded up to 16)."""
    assert decode_shape([0], [63], 8, 1024) == (1, 64) and decode_shape([5], [64], 8, 1024) == (6, 80)
    assert decode_shape([2, 0], [10, 3000], 8, 1024) == (3, 1024)
    assert decode_shape([5], [64], 8, 1024, compiled=True) == (8, 128)  # compiled: static rows, powers of two
    assert decode_shape([0], [64], 8, 1024, compiled=True) == (1, 128)  # ... or row 0 alone
    load = [Arrival(0.0, 100, 2), Arrival(0.0, 100, 4)]
    exact, engine = _Recording(), _Recording()
    simulate(load, BatchingPolicy(max_batch=4), 1024, exact)
    simulate(load, BatchingPolicy(max_batch=4), 1024, engine, engine_shapes=True)
    assert exact.decoded == [[101, 101], [102], [103]]
    assert engine.decoded == [[112, 112], [112, 112], [112, 112]]


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


def test_one_load_for_the_simulator_and_the_load_generator(tmp_path) -> None:
    spec = LoadSpec(4.0, 50, Lengths(8, 64), Lengths(2, 9), seed=5)
    load = spec.generate()
    assert load == spec.generate() == arrivals("poisson", 4.0, 50, Lengths(8, 64), Lengths(2, 9), seed=5)
    assert spec.offered_rate == 4.0 and LoadSpec(requests=3).offered_rate is None  # inf: a burst
    assert [a.time for a in LoadSpec(requests=3).generate()] == [0.0, 0.0, 0.0]
    # Fixed lengths draw nothing: loads of other fixed lengths arrive at the same times.
    fixed = [a.time for a in LoadSpec(4.0, 50, Lengths(128, 128), Lengths(32, 32), seed=5).generate()]
    assert fixed == [a.time for a in LoadSpec(4.0, 50, Lengths(7, 7), Lengths(3, 3), seed=5).generate()]
    assert fixed != [a.time for a in load]  # drawn lengths share the stream
    prompts = prompt_ids(load, 1000, spec.seed)  # the load generator's token ids: one prompt per arrival
    assert [len(p) for p in prompts] == [a.prompt_len for a in load] and prompts == prompt_ids(load, 1000, 5)
    assert all(0 <= t < 999 for p in prompts for t in p)
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps([{"arrival": 0.5, "prompt_len": 3, "output_len": 2}]))
    assert LoadSpec(arrivals=str(trace)).generate() == [Arrival(0.5, 3, 2)]
    assert LoadSpec(arrivals=str(trace)).offered_rate is None
    for bad, field in ((dict(arrivals="uniform"), "arrivals"), (dict(rate=float("nan")), "rate"),
                       (dict(requests=0), "requests"), (dict(seed=1.5), "seed")):
        with pytest.raises(ConfigError, match=field):
            LoadSpec(**bad)


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
    # A measured host overhead: a lone request's TTFT grows by exactly the per-prefill term.
    lone = ["simulate", "--model", "gpt-1.3b", "--arrivals", str(trace), "--max-batch", "1"]
    base = json.loads(capsys.readouterr().out if main(lone) == 0 else "{}")
    assert main([*lone, "--host-overhead", '{"prefill_s": 0.25}']) == 0
    slower = json.loads(capsys.readouterr().out)
    assert slower["simulation"]["host_overhead"]["prefill_s"] == 0.25
    assert main([*lone, "--engine-shapes"]) == 0 and json.loads(capsys.readouterr().out)["simulation"]["engine_shapes"]
    assert slower["ttft_s"]["p50"] > base["ttft_s"]["p50"] + 0.25 - 1e-9
    for bad in ('{"latency_s": 1}', '{"row_s": -1}', "[1]"):
        assert main([*lone, "--host-overhead", bad]) == 2
        assert "host" in capsys.readouterr().err
    assert main(["plan", "--model", "gpt-1.3b", "--chips", "4", "--prompt", "256", "--generate", "16", "--slo",
                 "p99_ttft<=100ms", "--rate", "10", "--requests", "40", "--batches", "4,8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["best"]["report"]["ttft_s"]["p99"] <= 0.1 and data["tried"]


def _profile_from(times, overhead: HostOverhead, widths=(1, 2, 4, 8), engine_shapes: bool = False):
    """A profile a server with exactly this host overhead would measure (the fit must give it back)."""
    from krakenlm.batching.profile import EngineProfile

    prompt, output, context = 128, 32, times.config.block_size
    mid = prompt + output // 2

    def step(w: int) -> float:
        if not engine_shapes:
            return times.decode([mid] * w)
        width, keys = decode_shape(list(range(w)), [mid - 1] * w, 8, context)
        return times.decode([keys] * width)

    return EngineProfile(prompt, output, (64, 128, 192), tuple(times.prefill(p) + overhead.prefill_s for p in
                                                                 (64, 128, 192)),
                         widths, tuple(step(w) + overhead.step_s + w * overhead.row_s for w in widths))


@pytest.mark.parametrize("engine_shapes", [False, True])
def test_host_overhead_fitted_to_a_profile_is_the_one_that_made_it(engine_shapes) -> None:
    from krakenlm.costmodel.simulate import fit_host_overhead

    cfg = get_preset("gpt2-124m")
    bare = CostModelTimes(cfg, load_hardware("cpu-gloo"), 2, dtype="fp32", lm_head="replicated")
    truth = HostOverhead(prefill_s=0.05, step_s=0.012, row_s=0.004)
    fitted = fit_host_overhead(bare, _profile_from(bare, truth, engine_shapes=engine_shapes), 8, cfg.block_size,
                               engine_shapes)
    assert fitted.prefill_s == pytest.approx(0.05) and fitted.step_s == pytest.approx(0.012)
    assert fitted.row_s == pytest.approx(0.004)
    # a server faster per row than the model says: the slope would be negative, so no per-row term
    slower = HostOverhead(step_s=0.03, row_s=0.0)
    profile = _profile_from(bare, slower)
    shrunk = dataclasses.replace(profile, itl_s=tuple(t - 0.001 * w for t, w in
                                                      zip(profile.itl_s, profile.widths, strict=True)))
    refit = fit_host_overhead(bare, shrunk, 8, cfg.block_size)
    assert refit.row_s == 0 and refit.step_s > 0


def test_engine_profiles_are_checked_and_read_by_name(tmp_path) -> None:
    from krakenlm.batching.profile import EngineProfile, engine_widths, load_profile, save_profiles

    assert engine_widths(8) == (1, 2, 4, 8) and engine_widths(6) == (1, 2, 4, 6) and engine_widths(1) == (1,)
    good = dict(prompt=128, output=32, prompts=(64, 128), ttft_alone_s=(0.1, 0.2), widths=(1, 2), itl_s=(0.05, 0.07))
    for bad, match in [({"itl_s": (0.05,)}, "same non-zero length"), ({"itl_s": (0.05, float("nan"))}, "positive"),
                       ({"widths": (2, 2)}, "two distinct widths"), ({"prompt": 0}, "prompt")]:
        with pytest.raises(ConfigError, match=match):
            EngineProfile(**(good | bad))
    one = EngineProfile(**good)
    assert one.capacity_rps == pytest.approx(1 / (0.15 + 32 * 0.035))
    save_profiles(tmp_path / "p.json", {"a": one, "b": one})
    assert load_profile(f"{tmp_path / 'p.json'}:b") == one
    for spec, match in [(str(tmp_path / "p.json"), "name one"), (f"{tmp_path / 'p.json'}:c", "not 'c'"),
                        (str(tmp_path / "missing.json"), "cannot read")]:
        with pytest.raises(ConfigError, match=match):
            load_profile(spec)


def test_simulate_cli_fits_the_host_overhead_to_a_profile(tmp_path, capsys) -> None:
    from krakenlm.batching.profile import save_profiles
    from krakenlm.costmodel.simulate import fit_host_overhead

    cfg = get_preset("gpt2-124m")
    bare = CostModelTimes(cfg, load_hardware("cpu-gloo"), 2, dtype="fp32")
    profile = _profile_from(bare, HostOverhead(prefill_s=0.03, step_s=0.01, row_s=0.002))
    save_profiles(tmp_path / "p.json", {"server": profile})
    argv = ["simulate", "--preset", "gpt2-124m", "--hardware", "cpu-gloo", "--chips", "2", "--dtype", "fp32",
            "--rate", "1", "--requests", "5", "--profile", str(tmp_path / "p.json")]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    used = json.loads(out)["simulation"]["host_overhead"]
    assert used == pytest.approx({"prefill_s": 0.03, "step_s": 0.01, "row_s": 0.002})
    assert "host overhead fitted to" in err
    assert main(argv + ["--host-overhead", '{"step_s": 0.01}']) == 2
    assert "not both" in capsys.readouterr().err
    assert fit_host_overhead(bare, profile, 8, cfg.block_size).row_s == pytest.approx(0.002)


def test_profile_times_read_the_measured_steps() -> None:
    """Prefill on the line through TTFT alone; a decode step at a measured width is that width's gap,
    between widths it is interpolated, past the widest it stays there."""
    from krakenlm.batching.profile import EngineProfile
    from krakenlm.costmodel.simulate import ProfileTimes

    profile = EngineProfile(128, 32, (64, 128, 192), (0.10, 0.14, 0.18), (1, 2, 4, 8), (0.05, 0.06, 0.10, 0.30))
    times = ProfileTimes(profile)
    assert times.prefill(64) == pytest.approx(0.10) and times.prefill(160) == pytest.approx(0.16)
    assert times.decode([100]) == pytest.approx(0.05) and times.decode([100] * 4) == pytest.approx(0.10)
    assert times.decode([100] * 3) == pytest.approx(0.08) and times.decode([100] * 6) == pytest.approx(0.20)
    assert times.decode([100] * 12) == pytest.approx(0.30)
    # through the simulator at the engine's widths: a lone request costs its prefill then one gap per token
    sim = simulate([Arrival(0.0, 128, 4)], BatchingPolicy(max_batch=8), 1024, times, engine_shapes=True)
    assert sim.records[0].token_times == pytest.approx((0.14, 0.19, 0.24, 0.29))
