"""System-overlapped standard TP (overlap chunked:K, collective-matmul): limits, monotonicity, hand-computed
cases against formulas written out here, errors, the CLI and calibration of the slowdown factor."""

from __future__ import annotations

import json

import pytest

from krakenlm.cli import main
from krakenlm.costmodel.calibrate import calibrate, parse_record, predict_point
from krakenlm.costmodel.collectives import Group, collective_time, p2p_time
from krakenlm.costmodel.estimator import Layout, Workload, estimate, phase_estimate
from krakenlm.costmodel.hardware import Hardware, load_hardware
from krakenlm.costmodel.layouts import layer_pairs
from krakenlm.costmodel.overlap import Overlap, parse_overlap, pipelined, segment
from krakenlm.costmodel.studies import (
    OVERLAP_PROMPTS,
    STANDARD_OVERLAPS,
    OverlapRow,
    geomean,
    overlap_grid_markdown,
    overlap_markdown,
    overlap_study,
)
from krakenlm.errors import ConfigError
from krakenlm.presets import get_preset

A100 = load_hardware("a100-40gb-nvswitch")
H100 = load_hardware("h100-sxm")
# Memory traffic negligible, no per-step cost, no latency: only compute and link bytes remain.
IDEAL = A100.with_factors(memory_bw=1e18, overlap_slowdown=0.0, overlap_step_s=0.0, ring_slowdown=0.0,
                          ring_step_s=0.0, alpha=0.0)
# Each mode's own (slowdown, step) pair: what changing it moves, and what it leaves alone.
MODE_FIELDS = {"chunked:4": ("overlap_slowdown", "overlap_step_s"),
               "collective-matmul": ("ring_slowdown", "ring_step_s")}


def _ttft(name: str, hw, overlap: str, prompt: int = 2048, chips: int = 8, layout: str | None = "1d-ws") -> float:
    config = get_preset(name).replace(block_size=max(prompt, 2048))
    return estimate(config, hw, Workload(prompt=prompt, dtype="fp16"), chips, layout=layout, overlap=overlap).ttft_s


def _pair_terms(name: str, hw, prompt: int, chips: int) -> list[tuple[float, float, float, float]]:
    """(C_in, C_out, X = all_reduce of T*E, D bytes) per pair of one layer, from the config alone."""
    config, rate = get_preset(name), hw.flop_rate("fp16")
    out = []
    for pair in layer_pairs(config):
        d = prompt * pair.e * 2
        x = collective_time("all_reduce", d, Group((chips,)), hw)
        out.append((2 * prompt * pair.e * pair.f_in / chips / rate, 2 * prompt * pair.f_out * pair.e / chips / rate,
                    x, d))
    return out


def test_parse_overlap() -> None:
    assert parse_overlap("chunked:4") == Overlap("chunked", 4) and str(parse_overlap("chunked:4")) == "chunked:4"
    assert parse_overlap("collective-matmul").system and not parse_overlap("full").system
    for bad in ("chunked", "chunked:0", "chunked:x", "chunked:5000", "full:2", "async", ""):
        with pytest.raises(ConfigError, match="overlap"):
            parse_overlap(bad)


def test_pipeline_hand_computed() -> None:
    assert segment(2.0, 3.0, 0.5) == 3.5  # compute 2 loses half of the transfer's 3: 2 + 1.5
    assert segment(5.0, 3.0, 0.0) == 5.0 and segment(1.0, 3.0, 1.0) == 4.0
    # chunked, 4 chunks of 2 s compute, 3 s transfers, slowdown 0.5: 2 + 3 * 3.5 + 3 (the last transfer drains)
    assert pipelined(2.0, 3.0, 4, 0.5, drain=True) == 15.5
    assert pipelined(2.0, 3.0, 4, 0.5, drain=False) == 12.5  # looped: the first step computes on local data
    assert pipelined(2.0, 3.0, 1, 0.5, drain=True) == 5.0  # one chunk: blocking


@pytest.mark.parametrize("name", ["gpt-6.7b", "parallel-6.7b"])
@pytest.mark.parametrize("hw,chips", [(A100, 8), (H100, 16)])
def test_one_chunk_is_blocking(name: str, hw, chips: int) -> None:
    for prompt in (1, 128, 2048):
        none, one = (_ttft(name, hw, ov, prompt, chips) for ov in ("none", "chunked:1"))
        assert one == pytest.approx(none, rel=1e-12)
    # a decode step of one token has one chunk whatever K is
    config, wl = get_preset(name), Workload(prompt=512, generate=8, dtype="fp16")
    steps = [estimate(config, hw, wl, chips, layout="1d-ws", overlap=ov).per_token_s for ov in ("none", "chunked:8")]
    assert steps[1] == pytest.approx(steps[0], rel=1e-12)


@pytest.mark.parametrize("name", ["gpt-13b", "parallel-13b"])
@pytest.mark.parametrize("chunks", [2, 8, 2048])
def test_chunked_without_slowdown_is_max_of_compute_and_comm_plus_first_and_last_chunk(name: str,
                                                                                          chunks: int) -> None:
    """Each pair's out-projection C_out and all-reduce X pipeline into (K-1)/K max(C_out, X) + (C_out + X)/K,
    where blocking paid C_out + X; the layer's other work is unchanged."""
    layers = get_preset(name).n_layer
    expected = _ttft(name, IDEAL, "none") + layers * sum(
        (chunks - 1) / chunks * max(c_out, x) + (c_out + x) / chunks - c_out - x
        for _, c_out, x, _ in _pair_terms(name, IDEAL, 2048, 8))
    assert _ttft(name, IDEAL, f"chunked:{chunks}") == pytest.approx(expected, rel=1e-9)
    if chunks == 2048:  # the limit: max(C_out, X) per pair, within the last chunk's 1/K
        limit = _ttft(name, IDEAL, "none") + layers * sum(
            max(c_out, x) - c_out - x for _, c_out, x, _ in _pair_terms(name, IDEAL, 2048, 8))
        assert _ttft(name, IDEAL, f"chunked:{chunks}") == pytest.approx(limit, rel=1e-3)


def test_collective_matmul_hand_computed() -> None:
    """Looped all-gather and reduce-scatter: 8 steps of C/8 each, 7 ring hops of D/8 under steps 2..8; with
    no slowdown a loop exposes 7 max(0, hop - C/8); blocking paid X."""
    hw, n, layers = IDEAL.with_factors(alpha=2e-6), 8, get_preset("gpt-6.7b").n_layer
    hop = lambda d: 2e-6 + d / n / (hw.link_bw * hw.comm_eff)  # noqa: E731
    for prompt in (64, 2048):
        extra = sum((n - 1) * (max(0.0, hop(d) - c_in / n) + max(0.0, hop(d) - c_out / n)) - x
                    for c_in, c_out, x, d in _pair_terms("gpt-6.7b", hw, prompt, n))
        got = _ttft("gpt-6.7b", hw, "collective-matmul", prompt)
        assert got == pytest.approx(_ttft("gpt-6.7b", hw, "none", prompt) + layers * extra, rel=1e-9)


def test_collective_matmul_hand_computed_with_slow_hops() -> None:
    """Nothing hidden (ring_slowdown 1): a loop costs C + (n-1) hop, so each pair adds 2 (n-1) (hop + step)
    and saves the blocking X; a hop at ring_hop_eff 0.4 moves D/n at 0.4 of the link's achievable rate."""
    hw = IDEAL.with_factors(alpha=2e-6, ring_slowdown=1.0, ring_step_s=7e-6, ring_hop_eff=0.4)
    n, layers = 8, get_preset("gpt-6.7b").n_layer
    hop = lambda d: 2e-6 + d / n / (hw.link_bw * hw.comm_eff * 0.4)  # noqa: E731
    for prompt in (64, 2048):
        extra = sum(2 * (n - 1) * (hop(d) + 7e-6) - x for _, _, x, d in _pair_terms("gpt-6.7b", hw, prompt, n))
        got = _ttft("gpt-6.7b", hw, "collective-matmul", prompt)
        assert got == pytest.approx(_ttft("gpt-6.7b", hw, "none", prompt) + layers * extra, rel=1e-9)


@pytest.mark.parametrize("overlap", ["chunked:4", "collective-matmul"])
def test_monotonic_in_slowdown_step_cost_and_link(overlap: str) -> None:
    slowdown, step = MODE_FIELDS[overlap]
    times = [_ttft("gpt-13b", A100.with_factors(**{slowdown: s}), overlap) for s in (0.0, 0.1, 0.5, 1.0)]
    assert times == sorted(times) and times[0] < times[-1]
    steps = [_ttft("gpt-13b", A100.with_factors(**{step: s}), overlap) for s in (0.0, 1e-5, 1e-4)]
    assert steps == sorted(steps) and steps[0] < steps[-1]
    links = [_ttft("gpt-13b", A100.with_factors(link_bw=bw), overlap) for bw in (25e9, 100e9, 300e9)]
    assert links == sorted(links, reverse=True)
    # nothing hidden when compute stops for every transfer: never faster than blocking
    assert _ttft("gpt-13b", A100.with_factors(**{slowdown: 1.0}), overlap) >= _ttft("gpt-13b", A100, "none")


def test_ring_hop_efficiency_prices_only_the_ring() -> None:
    """A slower hop (lower ring_hop_eff) never speeds collective matmul up and slows it where hops are exposed;
    chunked, blocking and pipeline-parallel sends (p2p_time without eff) do not see it."""
    hw = A100.with_factors(ring_slowdown=1.0)
    ring = [_ttft("gpt-13b", hw.with_factors(ring_hop_eff=e), "collective-matmul") for e in (0.1, 0.5, 1.0)]
    assert ring == sorted(ring, reverse=True) and ring[0] > ring[-1]
    for overlap in ("none", "chunked:4"):
        assert _ttft("gpt-13b", hw.with_factors(ring_hop_eff=0.1), overlap) == _ttft("gpt-13b", hw, overlap)
    assert p2p_time(1e6, hw.with_factors(ring_hop_eff=0.1), False) == p2p_time(1e6, hw, False)
    assert p2p_time(1e6, hw, True, eff=0.5) == pytest.approx(2 * p2p_time(1e6, hw, True) - hw.inter_node_alpha)


@pytest.mark.parametrize("overlap", ["chunked:4", "collective-matmul"])
def test_each_mode_reads_only_its_own_factors(overlap: str) -> None:
    other = next(v for k, v in MODE_FIELDS.items() if k != overlap)
    moved = A100.with_factors(**{other[0]: 1.0, other[1]: 1e-3})
    assert _ttft("gpt-13b", moved, overlap) == _ttft("gpt-13b", A100, overlap)
    for prompt in (1, 2048):  # one chunk is blocking whatever the factors
        odd = A100.with_factors(overlap_slowdown=1.0, overlap_step_s=1e-3, ring_slowdown=1.0, ring_hop_eff=0.2)
        assert _ttft("gpt-13b", odd, "chunked:1", prompt) == pytest.approx(_ttft("gpt-13b", odd, "none", prompt),
                                                                         rel=1e-12)


def test_breakdown_exposed_plus_hidden_is_the_communication() -> None:
    config, wl = get_preset("gpt-13b"), Workload(prompt=2048, dtype="fp16")
    none = estimate(config, A100, wl, 8, layout="1d-ws").prefill
    chunked = estimate(config, IDEAL, wl, 8, layout="1d-ws", overlap="chunked:8").prefill
    assert none.hidden_comm_s == pytest.approx(0.0, abs=1e-12) and none.exposed_comm_s == pytest.approx(none.comm_s)
    assert 0 < chunked.hidden_comm_s < chunked.comm_s
    assert chunked.exposed_comm_s + chunked.hidden_comm_s == pytest.approx(chunked.comm_s)
    assert estimate(config, A100, wl, 8, overlap="collective-matmul").prefill.layout == "1d-ws/attn-heads"


def test_system_modes_refuse_what_they_do_not_overlap() -> None:
    wl = Workload(prompt=128, dtype="fp16")
    for name, layout in (("kraken8-1.3b", None), ("ladder-1.3b", None), ("gpt-1.3b", "2d-ws")):
        with pytest.raises(ConfigError, match="overlap"):
            estimate(get_preset(name), A100, wl, 8, layout=layout, overlap="chunked:4")
    with pytest.raises(ConfigError, match="overlap"):
        phase_estimate(get_preset("gpt-1.3b"), A100, wl, "prefill", Layout("1d-ws", "heads", 8), "chunked:")


def test_cli_overlap_modes(capsys) -> None:
    argv = ["predict", "--model", "gpt-13b", "--chips", "8", "--prompt", "2048", "--dtype", "fp16", "--layout", "1d-ws"]
    assert main(argv + ["--overlap", "chunked:4"]) == 0
    out = capsys.readouterr().out
    assert "hidden" in out and "TTFT" in out
    assert main(argv + ["--overlap", "collective-matmul", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["prefill"]["hidden_comm_s"] > 0
    assert main(argv + ["--overlap", "chunked:zero"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "overlap" in err
    assert main(["plan", "--model", "gpt-6.7b", "--chips", "8", "--overlap", "chunked:4", "--objective",
                 "latency"]) == 0
    assert "1d-ws" in capsys.readouterr().out


def test_calibration_fits_the_slowdown_from_overlap_records() -> None:
    cpu = load_hardware("cpu-gloo-nominal")
    truth = cpu.with_factors(overlap_slowdown=0.35, overlap_step_s=2e-4)
    records = []
    for overlap in ("none", "chunked:2", "chunked:4", "collective-matmul"):
        for gbps in (None, 1.0):
            rec = {"arch": "gpt", "preset": "gpt2-124m", "tp": 2, "batch": 1, "prompt_len": 512, "dtype": "bf16",
                   "phase": "prefill", "link_gbps": gbps, "seconds": 1.0, "overlap": overlap}
            rec["seconds"] = predict_point(parse_record(rec), truth)
            records.append(rec)
    fit = calibrate(cpu, records, fields=("overlap_slowdown", "overlap_step_s"))
    assert fit.fitted["overlap_slowdown"] == pytest.approx(0.35, rel=0.01)
    assert fit.fitted["overlap_step_s"] == pytest.approx(2e-4, rel=0.01)
    assert fit.rows[4]["label"].endswith("prefill chunked:4") and fit.mdape_after < 0.01
    with pytest.raises(ConfigError, match="overlap"):
        parse_record(dict(records[0], overlap="sometimes"))
    # a bench variant label names the mode when the record has no overlap field
    named = {k: v for k, v in records[4].items() if k != "overlap"} | {"variant": "gpt/chunked:4"}
    assert parse_record(named).overlap == Overlap("chunked", 4)
    assert parse_record(named | {"variant": "gpt/blocking"}).overlap == Overlap("none")
    with pytest.raises(ConfigError, match="overlap"):
        parse_record(named | {"variant": "gpt/chunked:0"})


def test_calibration_fits_the_ring_factors_from_collective_matmul_records() -> None:
    """ring_slowdown, ring_step_s and ring_hop_eff come back from collective-matmul records over three links
    and two prompts; chunked's factors are not touched by them."""
    cpu = load_hardware("cpu-gloo-nominal")
    truth = cpu.with_factors(ring_slowdown=0.8, ring_step_s=3e-4, ring_hop_eff=0.5)
    records = []
    for prompt in (128, 512):
        for gbps in (None, 1.0, 10.0):
            rec = {"arch": "gpt", "preset": "gpt2-124m", "tp": 2, "batch": 1, "prompt_len": prompt,
                   "dtype": "fp32", "phase": "prefill", "link_gbps": gbps, "seconds": 1.0,
                   "overlap": "collective-matmul"}
            records.append(rec | {"seconds": predict_point(parse_record(rec), truth)})
    fit = calibrate(cpu, records, fields=("ring_slowdown", "ring_step_s", "ring_hop_eff"))
    for key, value in (("ring_slowdown", 0.8), ("ring_step_s", 3e-4), ("ring_hop_eff", 0.5)):
        assert fit.fitted[key] == pytest.approx(value, rel=0.02)
    assert fit.hardware.overlap_factors("chunked") == cpu.overlap_factors("chunked")


@pytest.fixture(scope="module")
def study() -> list[OverlapRow]:
    return overlap_study()


def test_overlap_study_best_standard_is_the_fastest_mode(study) -> None:
    row = next(r for r in study if r.platform.startswith("8x A100") and r.link_gbs == 300 and r.size == "65b"
               and r.prompt == 2048)
    config = get_preset("gpt-65b")
    times = {ov: estimate(config, A100, Workload(prompt=2048, dtype="fp16"), 8, overlap=ov).ttft_s
             for ov in STANDARD_OVERLAPS}
    assert row.standard == min(times.values()) and times[row.mode] == row.standard
    assert row.mode != "none" and row.standard < times["none"]  # overlapping pays for 65B at 2,048 tokens
    assert row.speedup("kraken") == pytest.approx(
        times[row.mode] / estimate(get_preset("kraken8-65b"), A100, Workload(prompt=2048, dtype="fp16"), 8).ttft_s)


def test_overlap_study_conclusions(study) -> None:
    """What docs/costmodel.md says the study shows."""
    def speedups(platform: str, link: float, prompt: int) -> list[float]:
        return [v for r in study if r.platform.startswith(platform) and r.link_gbs == link and r.prompt == prompt
                and (v := r.speedup("kraken")) is not None]

    assert all(v > 1 for p in (128, 512, 2048) for v in speedups("8x A100", 300, p))
    assert sum(v > 1 for v in speedups("8x A100", 300, 4096)) == 2  # 65B/175B: overlapped standard TP wins
    assert all(v > 1 for p in OVERLAP_PROMPTS for link in (450, 150, 50) for v in speedups("8x H100", link, p))
    assert all(v > 1.3 for p in OVERLAP_PROMPTS for link in (50, 25, 12.5) for v in speedups("2x8", link, p))
    for prompt in OVERLAP_PROMPTS:  # a slower link only widens Kraken's lead on one node
        by_link = [geomean(speedups("8x A100", link, prompt)) for link in (300, 100, 25)]
        assert by_link == sorted(by_link)
    assert not any(r.mode == "collective-matmul" for r in study if r.platform.startswith("2x8"))
    rendered = overlap_markdown(study)
    assert rendered.count("\n| ") == 3 * 3 * len(OVERLAP_PROMPTS) and "| 5/5 |" in rendered
    assert "| 2x8 H100, TP 16 over IB | 13b | n/a |" in overlap_grid_markdown(study)


@pytest.mark.parametrize("key,value", [("overlap_slowdown", 1.5), ("overlap_slowdown", -0.1),
                                       ("overlap_slowdown", float("nan")), ("overlap_step_s", -1e-6),
                                       ("overlap_step_s", 2.0), ("overlap_step_s", "3us"),
                                       ("ring_slowdown", 1.01), ("ring_slowdown", None), ("ring_step_s", -1.0),
                                       ("ring_hop_eff", 0.0), ("ring_hop_eff", 1.5), ("ring_hop_eff", True)])
def test_bad_overlap_fields_name_the_field(key: str, value) -> None:
    with pytest.raises(ConfigError, match=key):
        Hardware.from_dict(A100.to_dict() | {key: value})
    valid = 1.0 if key == "ring_hop_eff" else 0.0
    assert getattr(Hardware.from_dict(A100.to_dict() | {key: valid}), key) == valid
