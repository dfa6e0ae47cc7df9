"""Cost model validation against Pope et al. (2023) and internal consistency of its formulas."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from krakenlm.config import ModelConfig
from krakenlm.costmodel.cli import add_predict_parser
from krakenlm.costmodel.collectives import Group, collective_time
from krakenlm.costmodel.estimator import Layout, Workload, estimate, ladder_stack, max_context, phase_estimate
from krakenlm.costmodel.hardware import Hardware, hardware_names, load_hardware
from krakenlm.costmodel.layouts import (
    MatPair,
    comm_elements,
    continuous_ws_elements,
    kv_bytes_per_token,
    make_mesh,
    pair_ops,
)
from krakenlm.costmodel.pipeline import Pipeline
from krakenlm.costmodel.studies import (
    PAPER_SWITCH_POINTS,
    TABLE1,
    TABLE2,
    crossover_chips,
    palm_param_formula,
    palm_switch_points,
    table1,
    table2_mfu,
)
from krakenlm.errors import ConfigError
from krakenlm.presets import get_preset

TPU = load_hardware("tpu-v4")
A100 = load_hardware("a100-40gb-nvswitch")


# Published numbers -------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(TABLE1))
def test_table1_max_context_within_2_percent(variant: str) -> None:
    got = table1()[variant]
    for value, paper in zip(got, TABLE1[variant], strict=True):
        assert abs(value - paper) / paper < 0.02, (variant, value, paper)


def test_table1_batch_sharding_gives_about_32x_longer_context() -> None:
    rows = table1()
    assert rows["multiquery-batch"][0] / rows["multiquery-heads"][0] == pytest.approx(64, rel=0.01)
    assert rows["multiquery-batch"][0] / rows["multihead"][0] == pytest.approx(32, rel=0.01)


@pytest.mark.parametrize("column", list(TABLE2))
def test_table2_mfu_recomputed_from_latency(column: str) -> None:
    tokens, seconds, paper = TABLE2[column]
    mfu = table2_mfu()[column]
    assert abs(mfu - paper) < 0.55
    # The printed latency is rounded; some latency inside its rounding interval gives the printed MFU.
    half = {"low-latency prefill": 0.005, "low-latency decode": 0.005}.get(column, 0.05)  # printed precision
    lo, hi = (100 * 2 * 540e9 * tokens / (64 * 275e12 * (seconds + s)) for s in (half, -half))
    assert lo - 0.5 <= paper < hi + 0.5


def test_table2_mfu_with_config_param_count() -> None:
    n = get_preset("palm-540b").num_params()
    assert table2_mfu(n)["low-latency prefill"] == pytest.approx(43, abs=0.5)
    assert table2_mfu(n)["high-throughput prefill"] == pytest.approx(76, abs=0.5)


def test_weight_gathered_switch_points_match_paper() -> None:
    points = palm_switch_points()
    assert [(round(t), a, b) for t, a, b in points] == [
        (18_432, "2d-ws", "wg-x"), (73_728, "wg-x", "wg-xy"), (1_179_648, "wg-xy", "wg-xyz")]
    assert tuple(round(t) for t, _, _ in points) == PAPER_SWITCH_POINTS


@pytest.mark.parametrize("ratio", [4, 3, 8])
def test_2d_beats_1d_exactly_above_4f_over_e_chips(ratio: int) -> None:
    e, f = 18432, 18432 * ratio
    n0 = 4 * f / e
    one, two = (continuous_ws_elements(lay, e, f, n0, 1000) for lay in ("1d-ws", "2d-ws"))
    assert two == pytest.approx(one)
    assert continuous_ws_elements("2d-ws", e, f, n0 + 1, 1000) < continuous_ws_elements("1d-ws", e, f, n0 + 1, 1000)
    assert continuous_ws_elements("2d-ws", e, f, n0 - 1, 1000) > continuous_ws_elements("1d-ws", e, f, n0 - 1, 1000)
    assert crossover_chips(ratio) == pytest.approx(n0, rel=1e-6)


def test_2d_vs_1d_on_discrete_meshes() -> None:
    pair = MatPair(4096, 16384, 16384)
    vol = {n: {lay: comm_elements(pair_ops(lay, pair, 100, make_mesh(n))) for lay in ("1d-ws", "2d-ws")}
           for n in (8, 16, 64)}
    assert vol[8]["1d-ws"] < vol[8]["2d-ws"]
    assert vol[16]["1d-ws"] == pytest.approx(vol[16]["2d-ws"])
    assert vol[64]["2d-ws"] == pytest.approx(vol[64]["1d-ws"] / 2)  # 8BLE/(sqrt(n)) vs 2BLE


@pytest.mark.parametrize("name,paper", [("palm-8b", 8.6e9), ("palm-62b", 62.5e9), ("palm-540b", 540e9)])
def test_palm_param_counts(name: str, paper: float) -> None:
    n = get_preset(name).num_params()
    assert abs(n - palm_param_formula(get_preset(name))) / n < 0.005
    assert abs(n - paper) / paper < 0.01


def test_mtnlg_param_count() -> None:
    assert abs(get_preset("mt-nlg-530b").num_params() - 530e9) / 530e9 < 0.005


# Collectives --------------------------------------------------------------------------------------
def test_collective_formulas() -> None:
    hw = A100.with_factors(comm_eff=1.0, alpha=0.0)
    g = Group((8,))
    ag = collective_time("all_gather", 8e6, g, hw)
    assert ag == pytest.approx(8e6 * 7 / 8 / 300e9)
    assert collective_time("reduce_scatter", 8e6, g, hw) == pytest.approx(ag)
    assert collective_time("all_reduce", 8e6, g, hw) == pytest.approx(2 * ag)
    assert collective_time("all_to_all", 8e6, g, hw) == pytest.approx(ag)
    assert collective_time("all_gather", 8e6, g, hw.with_factors(ring_factor=False)) == pytest.approx(8e6 / 300e9)
    assert collective_time("all_reduce", 8e6, Group((1,)), hw) == 0.0


def test_collective_latency_steps_by_topology() -> None:
    base = dict(alpha=1e-6, comm_eff=1.0)
    small = 1.0  # bytes: latency dominates
    assert collective_time("all_gather", small, Group((8,)), A100.with_factors(**base)) == pytest.approx(1e-6, rel=1e-3)
    ring = A100.with_factors(topology="ring", **base)
    assert collective_time("all_gather", small, Group((8,)), ring) == pytest.approx(7e-6, rel=1e-3)
    torus = TPU.with_factors(**base)
    assert collective_time("all_gather", small, Group((4, 4)), torus) == pytest.approx(6e-6, rel=1e-3)
    assert collective_time("all_to_all", 1e9, Group((8,)), ring.with_factors(alpha=0.0)) == pytest.approx(
        collective_time("all_gather", 1e9, Group((8,)), ring.with_factors(alpha=0.0)) / 4)


def test_per_axis_bandwidth_on_torus() -> None:
    full = TPU.with_factors(alpha=0.0)
    per_axis = full.with_factors(axis_bandwidth="per_axis")
    one_axis = Group((4,))
    assert collective_time("all_gather", 1e9, one_axis, per_axis) == pytest.approx(
        3 * collective_time("all_gather", 1e9, one_axis, full))
    assert collective_time("all_gather", 1e9, Group((4, 4, 4)), per_axis) == pytest.approx(
        collective_time("all_gather", 1e9, Group((4, 4, 4)), full))


def test_bad_collective_kind() -> None:
    with pytest.raises(ConfigError, match="kind"):
        collective_time("broadcast", 1.0, Group((2,)), A100)


# Hardware specs -----------------------------------------------------------------------------------
def test_bundled_specs_load(tmp_path) -> None:
    assert {"tpu-v4", "a100-40gb-nvswitch", "h100-sxm", "h200", "cpu-gloo"} <= set(hardware_names())
    for name in hardware_names():
        hw = load_hardware(name)
        assert hw.peak("bf16") > 0 and hw.memory_bw > 0
    assert load_hardware("h200").peak("bf16") == load_hardware("h100-sxm").peak("bf16")
    A100.save(tmp_path / "x.json")
    assert load_hardware(tmp_path / "x.json") == A100
    assert A100.peak("int8") == A100.peak("bf16")  # weight-only int8 computes in bf16


def test_hardware_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown hardware"):
        load_hardware("tpu-v9")
    with pytest.raises(ConfigError, match="unknown field"):
        Hardware.from_dict(A100.to_dict() | {"bogus": 1})
    with pytest.raises(ConfigError, match="topology"):
        A100.with_factors(topology="mesh")
    with pytest.raises(ConfigError, match="comm_eff"):
        A100.with_factors(comm_eff=0)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_hardware(tmp_path / "bad.json")


def test_per_dtype_efficiency_factors() -> None:
    hw = A100.with_factors(matmul_eff={"bf16": 0.8, "fp16": 0.8, "tf32": 0.5, "fp32": 0.4})
    assert hw.flop_rate("bf16") == pytest.approx(312e12 * 0.8)
    assert hw.flop_rate("fp32") == pytest.approx(19.5e12 * 0.4)
    assert hw.flop_rate("int8") == hw.flop_rate("bf16")  # weight-only int8 computes in bf16
    assert hw.memory_rate("fp32") == pytest.approx(1.555e12 * 0.8)  # memory_eff stays one number
    with pytest.raises(ConfigError, match="per-dtype matmul_eff"):
        A100.with_factors(matmul_eff={"bf16": 0.8})  # every peak_flops dtype needs its factor
    with pytest.raises(ConfigError, match="attention_eff"):
        A100.with_factors(attention_eff=0)


# KV cache and memory ------------------------------------------------------------------------------
def test_kv_placement() -> None:
    palm = get_preset("palm-540b")
    # Multiquery sharded over heads: the single K/V head is replicated, so more chips do not help.
    assert kv_bytes_per_token(palm, 8, "heads", 2) == kv_bytes_per_token(palm, 64, "heads", 2)
    assert kv_bytes_per_token(palm, 64, "heads", 2) == 2 * 118 * 256 * 2
    # Over batch, each chip holds B/n sequences: max context grows with chips.
    c32 = max_context(palm, TPU, 32, 128, "batch", kv_fraction=0.3)
    c64 = max_context(palm, TPU, 64, 128, "batch", kv_fraction=0.3)
    assert c64 == pytest.approx(2 * c32, rel=0.01)


def test_multihead_kv_at_b512_is_about_3tb() -> None:
    mh = get_preset("palm-540b").replace(n_kv_head=None, head_dim=128)
    total = kv_bytes_per_token(mh, 1, "heads", 2) * 512 * 2048
    assert 2.5e12 < total < 3.5e12


# Estimator behaviour ------------------------------------------------------------------------------
def test_mfu_bounded_and_prefill_beats_decode() -> None:
    palm = get_preset("palm-540b")
    est = estimate(palm, TPU, Workload(batch=512, prompt=1984, generate=64), 64)
    assert 0 < est.decode.mfu < est.mfu < est.prefill.mfu <= 1.0
    assert est.total_s == pytest.approx(est.ttft_s + 64 * est.per_token_s)
    assert est.chip_seconds_per_token == pytest.approx(64 * est.total_s / (512 * (1984 + 64)))
    # Whole-request MFU: 2N per token over the chip-seconds each token costs.
    assert est.mfu == pytest.approx(2 * palm.num_params() / (TPU.peak("bf16") * est.chip_seconds_per_token))


def test_int8_weights_speed_up_memory_bound_decode() -> None:
    palm = get_preset("palm-540b")
    lay = Layout("2d-ws", "batch", 64)
    t = {d: phase_estimate(palm, TPU, Workload(64, 1984, 64, d), "decode", lay) for d in ("int8", "bf16")}
    assert t["bf16"].bound == "memory"
    assert t["int8"].time_s < t["bf16"].time_s
    # int8 halves the weight bytes: one byte less per parameter read per step.
    assert t["bf16"].memory_s - t["int8"].memory_s == pytest.approx(540e9 / 64 / 1.2e12, rel=0.02)


def test_serial_block_decodes_slower_than_parallel() -> None:
    par = get_preset("palm-540b")
    ser = par.replace(arch="gpt")
    lay = Layout("2d-ws", "batch", 64)
    wl = Workload(512, 1984, 64)
    t_par = phase_estimate(par, TPU, wl, "decode", lay).time_s
    t_ser = phase_estimate(ser, TPU, wl, "decode", lay).time_s
    assert 1.0 < t_ser / t_par < 1.5


def test_weight_gathered_wins_large_prefill_and_ws_wins_small() -> None:
    palm = get_preset("palm-540b")
    small = estimate(palm, TPU, Workload(batch=1, prompt=2048), 64)
    large = estimate(palm, TPU, Workload(batch=512, prompt=2048), 64)
    assert small.prefill.layout.startswith("2d-ws")
    assert large.prefill.layout.startswith("wg-")


def test_overlap_full_is_never_slower() -> None:
    cfg = get_preset("gpt-13b")
    wl = Workload(batch=4, prompt=512, generate=16)
    none = estimate(cfg, A100, wl, 8, layout="1d-ws")
    full = estimate(cfg, A100, wl, 8, layout="1d-ws", overlap="full")
    assert full.ttft_s < none.ttft_s and full.per_token_s <= none.per_token_s


def test_kraken_hides_allreduce_behind_attention() -> None:
    cfg = get_preset("kraken4-13b")
    wl = Workload(batch=1, prompt=2048)
    slow_link = A100.with_factors(link_bw=30e9)
    base = phase_estimate(cfg, A100, wl, "prefill", Layout("kraken", chips=4))
    slow = phase_estimate(cfg, slow_link, wl, "prefill", Layout("kraken", chips=4))
    assert base.exposed_comm_s < 0.05 * base.comm_s  # hidden
    assert slow.time_s > base.time_s  # but not for free once it outgrows attention


def test_layout_validation() -> None:
    with pytest.raises(ConfigError, match="does not apply"):
        estimate(get_preset("gpt-1.3b"), A100, Workload(), 4, layout="kraken")
    with pytest.raises(ConfigError, match="layout"):
        estimate(get_preset("gpt-1.3b"), A100, Workload(), 4, layout="3d-ws")
    with pytest.raises(ConfigError, match="Kraken"):
        estimate(get_preset("kraken4-1.3b"), A100, Workload(), 3)
    with pytest.raises(ConfigError, match="batch"):
        Workload(batch=0)
    with pytest.raises(ConfigError, match="dtype"):
        Workload(dtype="fp8")


def test_kraken_degree_mappings_all_estimate() -> None:
    cfg = get_preset("kraken4-6.7b")
    times = {t: estimate(cfg, A100, Workload(prompt=512), t).ttft_s for t in (1, 2, 4, 8)}
    assert times[1] > times[2] > times[4] > times[8]
    assert math.isfinite(times[8])


@pytest.mark.parametrize("name,layout", [("gpt-1.3b", "1d-ws"), ("parallel-1.3b", "2d-ws"), ("kraken4-1.3b", "kraken")])
def test_attention_flops_are_in_compute_time_for_every_layout(name: str, layout: str) -> None:
    cfg = get_preset(name)
    wl = Workload(batch=2, prompt=1024)
    lay = Layout(layout, chips=4)
    base = phase_estimate(cfg, A100, wl, "prefill", lay)
    slow = phase_estimate(cfg, A100.with_factors(attention_eff=0.5), wl, "prefill", lay)
    # QK^T and AV: 4 * tokens * context * (total query width) per layer, causal mean context (L+1)/2.
    attn = cfg.n_layer * 4 * wl.batch * wl.prompt * (wl.prompt + 1) / 2 * cfg.n_head * cfg.head_size * cfg.n_sub
    assert slow.compute_s - base.compute_s == pytest.approx(attn / 4 / A100.flop_rate("bf16"), rel=1e-9)
    assert slow.mfu < base.mfu  # MFU counts 2N per token only, so slower attention lowers it


def test_replicated_lm_head_costs_every_chip_the_whole_vocabulary() -> None:
    cfg = get_preset("gpt2-124m")
    wl = Workload(batch=1, prompt=512, generate=8)
    sharded = phase_estimate(cfg, A100, wl, "decode", Layout("1d-ws", chips=2))
    whole = phase_estimate(cfg, A100, wl, "decode", Layout("1d-ws", chips=2, head="replicated"))
    extra = cfg.vocab_size * cfg.n_embd / 2 * 2  # the other half of V*E, bf16
    assert whole.time_s - sharded.time_s == pytest.approx(extra / A100.memory_rate("bf16"), rel=1e-9)
    with pytest.raises(ConfigError, match="head"):
        Layout("1d-ws", head="split")


# Ladder Residual ---------------------------------------------------------------------------------
def test_ladder_stack_hand_computed() -> None:
    modules = [(3.0, 5.0), (4.0, 1.0), (2.0, 2.0)]
    # All async: 3, then max(4, 5), max(2, 1), then the last all-reduce 2; exposed (5-4) + 0 + 2.
    assert ladder_stack(modules, 0) == (12.0, 3.0)
    # The first module reduces in line: 3 + 5, then 4, max(2, 1), 2; exposed 5 + 0 + 2.
    assert ladder_stack(modules, 1) == (16.0, 7.0)


@pytest.mark.parametrize("gbps", [600.0, 0.05])  # all-reduces shorter than every module / longer than every one
@pytest.mark.parametrize("ladder_layers", [None, 1, 0])
def test_ladder_exposes_only_what_the_next_module_cannot_hide(gbps: float, ladder_layers: int | None) -> None:
    gpt = ModelConfig(arch="gpt", n_layer=2, n_embd=256, n_head=4, vocab_size=512, block_size=2048)
    ladder = gpt.as_ladder(ladder_layers)
    hw = A100.with_factors(link_bw=gbps * 1e9 / 8)
    wl, n = Workload(batch=4, prompt=2048), 2
    lay = Layout("1d-ws", chips=n)
    base, got = (phase_estimate(cfg, hw, wl, "prefill", lay) for cfg in (gpt, ladder))
    assert base.memory_s < base.compute_s / 4  # compute-bound modules: c = C below
    # Independent per-module pieces: matmuls, causal attention (mean context (L+1)/2), one all-reduce of T*E.
    tokens, e = wl.batch * wl.prompt, gpt.n_embd
    flops = A100.flop_rate("bf16")
    c_attn = (2 * tokens * 4 * e * e + 4 * tokens * (wl.prompt + 1) / 2 * e) / n / flops
    c_ffn = 2 * tokens * 8 * e * e / n / flops
    x = collective_time("all_reduce", tokens * e * 2, Group((n,)), hw)
    expected = {None: c_attn + max(c_ffn, x) + max(c_attn, x) + max(c_ffn, x) + x,
                1: c_attn + x + c_ffn + max(c_attn, x) + max(c_ffn, x) + x,
                0: 2 * (c_attn + x + c_ffn + x)}[ladder_layers]
    exposed = {None: max(x - c_ffn, 0) + max(x - c_attn, 0) + max(x - c_ffn, 0) + x,
               1: 2 * x + max(x - c_attn, 0) + max(x - c_ffn, 0), 0: 4 * x}[ladder_layers]
    gpt_layers = 2 * (c_attn + c_ffn + 2 * x)
    assert base.comm_s == pytest.approx(4 * x, rel=1e-9) == got.comm_s
    assert got.time_s - base.time_s == pytest.approx(expected - gpt_layers, rel=1e-6, abs=1e-12)
    assert got.exposed_comm_s == pytest.approx(exposed, rel=1e-9)


def test_ladder_layout_and_cli(capsys) -> None:
    cfg = get_preset("ladder-124m")
    with pytest.raises(ConfigError, match="Megatron"):
        estimate(cfg, A100, Workload(), 2, layout="2d-ws")
    with pytest.raises(ConfigError, match="Megatron"):
        estimate(cfg, A100, Workload(), 2, layout="1d-ws/attn-batch")
    parser = argparse.ArgumentParser()
    add_predict_parser(parser.add_subparsers(dest="verb", required=True))
    out = {}
    for name in ("gpt2-124m", "ladder-124m"):
        args = parser.parse_args(["predict", "--model", name, "--hardware", "cpu-gloo", "--chips", "2",
                                  "--prompt", "512", "--generate", "8", "--lm-head", "replicated", "--json"])
        assert args.func(args) == 0
        out[name] = json.loads(capsys.readouterr().out)
    lad, std = out["ladder-124m"], out["gpt2-124m"]
    assert lad["prefill"]["layout"] == lad["decode"]["layout"] == "1d-ws/attn-heads"
    assert lad["prefill"]["comm_s"] == pytest.approx(std["prefill"]["comm_s"])  # same all-reduces, hidden
    assert lad["prefill"]["exposed_comm_s"] < 0.2 * std["prefill"]["exposed_comm_s"]
    assert lad["ttft_s"] < std["ttft_s"] and lad["per_token_s"] <= std["per_token_s"]


@pytest.mark.parametrize("gbps", [600.0, 0.05])
def test_ladder_pipeline_stages_start_their_schedule_at_their_first_layer(gbps: float) -> None:
    """Two stages of two layers, one micro-batch: the hybrid with ladder in layers 2-3 has gpt's first stage
    and the all-ladder model's second, so it sits exactly halfway (a stage priced as if it held layer 0
    would reduce its first modules in line and break this)."""
    gpt = ModelConfig(arch="gpt", n_layer=4, n_embd=256, n_head=4, vocab_size=512, block_size=2048)
    hw, wl, lay = A100.with_factors(link_bw=gbps * 1e9 / 8), Workload(batch=1, prompt=1024), Layout("1d-ws", chips=2)
    pipe = Pipeline(stages=2, prefill_microbatches=1)
    gpt_t, hybrid, full = (phase_estimate(cfg, hw, wl, "prefill", lay, pipeline=pipe).time_s
                           for cfg in (gpt, gpt.as_ladder(2), gpt.as_ladder(None)))
    assert full < hybrid < gpt_t
    assert hybrid - gpt_t == pytest.approx(full - hybrid, rel=1e-9)
