"""Cost model at cluster scale: node hierarchy, placement, pipeline parallelism, per-phase batch,
whole-request metrics, and the validation of specs, splits and workloads (issue 15's reproductions)."""

from __future__ import annotations

import json
import math

import pytest

from krakenlm.cli import main
from krakenlm.config import ModelConfig
from krakenlm.costmodel.collectives import KINDS, Group, collective_time, p2p_time
from krakenlm.costmodel.estimator import (
    Layout,
    Workload,
    estimate,
    kv_per_chip,
    phase_estimate,
    stage_params,
    weights_per_chip,
)
from krakenlm.costmodel.hardware import Hardware, load_hardware
from krakenlm.costmodel.layouts import check_split, group_nodes, kraken_ops, kv_cache_bytes_per_chip, pair_ops
from krakenlm.costmodel.pipeline import Pipeline, crosses_node, pipeline_time, stage_layers
from krakenlm.costmodel.planner import plan
from krakenlm.errors import ConfigError
from krakenlm.presets import get_preset

H100 = load_hardware("h100-sxm")
A100 = load_hardware("a100-40gb-nvswitch")
TPU = load_hardware("tpu-v4")


# Hierarchical collectives -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("hw", [A100, H100, A100.with_factors(topology="ring", ring_factor=False)])
def test_one_node_is_exactly_the_flat_formula(kind: str, hw: Hardware) -> None:
    flat = hw.with_factors(chips_per_node=0)
    for size in (2, 4, 8):
        group = Group((size,), group_nodes((size,), (0,), hw.chips_per_node))
        assert group.nodes == 1
        assert collective_time(kind, 3.3e6, group, hw) == collective_time(kind, 3.3e6, Group((size,)), flat)


def test_whole_estimates_do_not_move_when_a_node_holds_every_chip() -> None:
    wl = Workload(batch=4, prompt=512, generate=16)
    for name, chips in (("gpt-13b", 8), ("parallel-6.7b", 8), ("kraken8-6.7b", 8), ("kraken4-1.3b", 8)):
        cfg = get_preset(name)
        for hw in (A100, H100):
            big_node = hw.with_factors(chips_per_node=64)
            a, b = estimate(cfg, hw, wl, chips), estimate(cfg, big_node, wl, chips)
            assert (a.ttft_s, a.per_token_s) == (b.ttft_s, b.per_token_s)
            flat = hw.with_factors(chips_per_node=0)
            c = estimate(cfg, flat, wl, chips)
            assert (a.ttft_s, a.per_token_s, a.memory_per_chip_bytes) == (c.ttft_s, c.per_token_s,
                                                                           c.memory_per_chip_bytes)


# Values of the implementation before the node hierarchy and pipelines (main at 625146d), exact.
GOLDEN = [
    ("palm-540b", TPU, 64, Workload(16, 512, 64, "int8"), None, "sharded", "none", 0.6777095095941774,
     0.01038044525037037),
    ("kraken4-13b", A100, 8, Workload(1, 128, 8), None, "sharded", "none", 0.0036976060820292957,
     0.0034148369101822075),
    ("gpt2-124m", load_hardware("cpu-gloo"), 2, Workload(4, 1000, 0, "fp32"), "1d-ws/attn-batch", "replicated",
     "none", 5.198035413808534, 0.0),
    ("parallel-1.3b", H100, 2, Workload(16, 512, 64, "int8"), ("wg-xyz/attn-batch", "2d-ws/attn-heads"), "sharded",
     "full", 0.014611399938593438, 0.0005638541373134328),
]


@pytest.mark.parametrize("name,hw,chips,wl,layout,head,overlap,ttft,step", GOLDEN)
def test_one_stage_reproduces_the_previous_numbers_exactly(name, hw, chips, wl, layout, head, overlap, ttft,
                                                           step) -> None:
    for pipeline in (None, 1, Pipeline(stages=1, prefill_microbatches=1, decode_microbatches=1)):
        est = estimate(get_preset(name), hw, wl, chips, layout=layout, overlap=overlap, lm_head=head,
                       pipeline=pipeline)
        assert (est.ttft_s, est.per_token_s) == (ttft, step)


def test_two_nodes_hand_computed() -> None:
    d, group = 8e6, Group((16,), nodes=2)
    intra_bw, net_bw = 450e9 * 0.75, 50e9 * 0.8
    ag = 4e-6 + d * 7 / 8 / intra_bw + 1 * 1e-5 + d / 8 * (1 / 2) / net_bw
    assert collective_time("all_gather", d, group, H100) == pytest.approx(ag, rel=1e-12)
    assert collective_time("reduce_scatter", d, group, H100) == pytest.approx(ag, rel=1e-12)
    assert collective_time("all_reduce", d, group, H100) == pytest.approx(2 * ag, rel=1e-12)
    a2a = 4e-6 + d / 2 * 7 / 8 / intra_bw + 1e-5 + d / 2 / net_bw
    assert collective_time("all_to_all", d, group, H100) == pytest.approx(a2a, rel=1e-12)
    # Four nodes, one chip each (Kraken's exchange when its groups sit in different nodes): ring over the network.
    assert collective_time("all_reduce", d, Group((4,), nodes=4), H100) == pytest.approx(
        2 * (3 * 1e-5 + d * 3 / 4 / net_bw), rel=1e-12)
    switch_net = H100.with_factors(inter_node_topology="switch")
    assert collective_time("all_gather", 1.0, Group((32,), nodes=4), switch_net) == pytest.approx(
        4e-6 + 1e-5, rel=1e-3)  # latency-bound: one step inside, one across


def test_point_to_point_uses_the_nic_across_nodes() -> None:
    assert p2p_time(1e6, H100, across_nodes=False) == pytest.approx(4e-6 + 1e6 / (450e9 * 0.75))
    assert p2p_time(1e6, H100, across_nodes=True) == pytest.approx(1e-5 + 1e6 / (50e9 * 0.8))
    assert [crosses_node(s, 4, 8) for s in range(3)] == [False, True, False]
    assert all(crosses_node(s, 8, 8) for s in range(3)) and not crosses_node(0, 8, 0)


# Placement ----------------------------------------------------------------------------------------
def test_mesh_groups_know_their_nodes() -> None:
    mesh = (4, 2, 2)  # 16 chips, last axis fastest, 8 per node
    assert group_nodes(mesh, (0, 1, 2), 8) == 2
    assert group_nodes(mesh, (1, 2), 8) == 1  # inner axes stay in a node
    assert group_nodes(mesh, (0,), 8) == 2
    assert group_nodes(mesh, (0,), 0) == 1
    ops = pair_ops("1d-ws", get_preset_pair(), 10, mesh, 8)
    assert all(op.group.nodes == 2 and op.group.size == 16 for op in ops)


def get_preset_pair():
    from krakenlm.costmodel.layouts import MatPair
    return MatPair(1024, 4096, 4096)


def test_kraken_keeps_sub_layer_shards_together_and_the_exchange_crosses_nodes() -> None:
    cfg = get_preset("kraken8-6.7b")
    shards_a, shards_b, exchange = kraken_ops(cfg, 16, 100, chips_per_node=8)
    assert (shards_a.group.size, shards_a.group.nodes) == (2, 1)
    assert (exchange.group.size, exchange.group.nodes, exchange.overlapped) == (8, 2, True)
    inside = kraken_ops(cfg, 8, 100, chips_per_node=8)[0]
    assert (inside.group.size, inside.group.nodes) == (8, 1)


def test_a_tp_group_across_nodes_costs_the_slower_link() -> None:
    cfg, wl = get_preset("gpt-6.7b"), Workload(batch=1, prompt=2048)
    lay = Layout("1d-ws", chips=16)
    one_fabric = phase_estimate(cfg, H100.with_factors(chips_per_node=0), wl, "prefill", lay)
    two_nodes = phase_estimate(cfg, H100, wl, "prefill", lay)
    assert two_nodes.comm_s > 1.5 * one_fabric.comm_s  # D/16 of each chip crosses at 40 GB/s vs 337.5 inside
    # Kraken's exchange crossing nodes hides under attention; standard TP's blocking all-reduces do not.
    kraken = phase_estimate(get_preset("kraken8-6.7b"), H100, wl, "prefill", Layout("kraken", chips=16))
    assert kraken.exposed_comm_s < 0.5 * two_nodes.exposed_comm_s


# Pipeline parallelism -----------------------------------------------------------------------------
TOY_HW = Hardware(name="toy", peak_flops={"bf16": 1e18}, memory_bytes=1e12, memory_bw=1e18, link_bw=1e18,
                  alpha=1e-4, topology="switch", layer_overhead_s=1e-3)  # 1 ms per layer, 0.1 ms per send


def _toy(n_layer: int) -> ModelConfig:
    return ModelConfig(arch="gpt", n_layer=n_layer, n_embd=64, n_head=4, vocab_size=256, block_size=64)


def test_pipeline_formulas_hand_computed() -> None:
    assert pipeline_time("prefill", [2.0, 2.0], [0.1], 1) == pytest.approx(4.1)
    assert pipeline_time("prefill", [2.0, 2.0], [0.1], 2) == pytest.approx(6.1)
    assert pipeline_time("prefill", [2.0] * 4, [0.1] * 3, 4) == pytest.approx(14.3)
    assert pipeline_time("decode", [2.0, 2.0], [0.1], 1) == pytest.approx(4.1)  # the round trip
    assert pipeline_time("decode", [2.0, 2.0], [0.1], 4) == pytest.approx(8.0)  # the beat, 4 times
    assert pipeline_time("decode", [2.0] * 4, [0.1] * 3, 4) == pytest.approx(8.3)
    assert pipeline_time("prefill", [1.0, 1.0], [3.0], 3) == pytest.approx(5.0 + 2 * 3.0)  # the link is the beat
    assert stage_layers(5, 2) == [3, 2] and stage_layers(8, 4) == [2, 2, 2, 2]


@pytest.mark.parametrize("stages,layers,phase,batch,micro,expected_ms", [
    (2, 4, "prefill", 1, 1, 4.1), (2, 4, "prefill", 2, 2, 6.1), (2, 4, "decode", 1, 1, 4.1),
    (2, 4, "decode", 4, 4, 8.0), (4, 8, "prefill", 1, 1, 8.3), (4, 8, "prefill", 4, 4, 14.3),
    (4, 8, "decode", 4, 4, 8.3), (4, 8, "decode", 8, 8, 16.0), (2, 5, "prefill", 2, 2, 8.1)])
def test_pipelined_phase_hand_computed(stages, layers, phase, batch, micro, expected_ms) -> None:
    # Compute, memory and links are ~free on TOY_HW: a stage of l layers takes l ms, a send 0.1 ms.
    wl = Workload(batch=batch, prompt=8, generate=4)
    pipe = Pipeline(stages, prefill_microbatches=micro, decode_microbatches=micro)
    est = phase_estimate(_toy(layers), TOY_HW, wl, phase, Layout("1d-ws"), pipeline=pipe)
    assert est.time_s * 1e3 == pytest.approx(expected_ms, rel=1e-6)
    assert (est.stages, est.microbatches) == (stages, micro)
    assert est.p2p_s * 1e3 == pytest.approx(0.1 * (stages - 1), rel=1e-6)
    busiest = math.ceil(layers / stages)
    assert est.bubble_s * 1e3 == pytest.approx(expected_ms - micro * busiest, abs=1e-6)


def test_automatic_microbatches_take_the_fastest() -> None:
    wl = Workload(batch=8, prompt=8, generate=4)
    auto = phase_estimate(_toy(8), TOY_HW, wl, "decode", Layout("1d-ws"), pipeline=Pipeline(4))
    each = {m: phase_estimate(_toy(8), TOY_HW, wl, "decode", Layout("1d-ws"),
                              pipeline=Pipeline(4, decode_microbatches=m)).time_s for m in (1, 2, 4, 8)}
    assert auto.time_s == min(each.values())
    with pytest.raises(ConfigError, match="microbatches"):
        phase_estimate(_toy(8), TOY_HW, wl, "decode", Layout("1d-ws"), pipeline=Pipeline(4, decode_microbatches=3))


def test_pipeline_memory_per_stage() -> None:
    cfg = get_preset("gpt-13b")
    parts = stage_params(cfg, 4)
    assert sum(parts) == cfg.num_params() + cfg.vocab_size * cfg.n_embd  # the last stage's copy of the tied head
    assert weights_per_chip(cfg, 8, "bf16") == cfg.num_params() * 2 / 8
    assert weights_per_chip(cfg, 8, "bf16", stages=4) == max(parts) * 2 / 8
    assert kv_per_chip(cfg, 8, 1024, 8, "heads", 2, stages=4) == pytest.approx(
        kv_cache_bytes_per_chip(cfg, 8, 1024, 8, "heads", 2) / 4)
    est = estimate(cfg, H100, Workload(batch=8, prompt=1024, generate=64), 16, pipeline=2)
    assert (est.tp, est.stages, est.chips) == (8, 2, 16)
    assert est.weights_per_chip_bytes == pytest.approx(max(stage_params(cfg, 2)) * 2 / 8)


def test_a_layout_object_must_match_the_chips_per_stage() -> None:
    cfg, wl = get_preset("gpt-13b"), Workload(batch=1, prompt=256)
    assert estimate(cfg, H100, wl, 16, layout=Layout("1d-ws", chips=8), pipeline=2).tp == 8
    with pytest.raises(ConfigError, match="chips per stage"):
        estimate(cfg, H100, wl, 16, layout=Layout("1d-ws", chips=4), pipeline=2)


def test_pipeline_across_nodes_pays_the_network() -> None:
    cfg, wl = get_preset("gpt-13b"), Workload(batch=1, prompt=2048)
    tp8_pp2 = estimate(cfg, H100, wl, 16, pipeline=2)
    one_fabric = estimate(cfg, H100.with_factors(chips_per_node=0), wl, 16, pipeline=2)
    assert tp8_pp2.prefill.p2p_s > one_fabric.prefill.p2p_s > 0


# Per-phase batch, whole request, the memory fix ----------------------------------------------------
def test_per_phase_batch_and_whole_request_numbers() -> None:
    cfg = get_preset("gpt-6.7b")
    est = estimate(cfg, H100, Workload(batch=1, prompt=512, generate=128, decode_batch=32), 8)
    assert est.prefill.tokens == 512 and est.decode.tokens == 32
    request_chip_s = 8 * (est.ttft_s / 1 + 128 * est.per_token_s / 32)
    assert est.chip_seconds_per_token == pytest.approx(request_chip_s / (512 + 128))
    assert est.mfu == pytest.approx(2 * cfg.num_params() * (512 + 128) / (989e12 * request_chip_s))
    assert est.requests_per_s == pytest.approx(8 / request_chip_s)
    same = estimate(cfg, H100, Workload(batch=32, prompt=512, generate=128), 8)
    assert same.decode.time_s == est.decode.time_s and same.ttft_s > est.ttft_s


def test_prefill_only_memory_counts_the_batch_sharded_cache() -> None:
    # Issue 16: PaLM 62B, 32 chips, batch 512, wg-xyz/attn-batch prefill with --generate 0 reported the
    # heads-sharded cache (64 GiB, "does not fit"); sharded over batch it is 16 sequences per chip, 2 GiB.
    cfg = get_preset("palm-62b")
    est = estimate(cfg, TPU, Workload(batch=512, prompt=2048), 32, layout="wg-xyz/attn-batch")
    assert est.kv_per_chip_bytes == est.kv_prefill_bytes == 2 * cfg.n_layer * 1 * 256 * 2 * 16 * 2048 == 2 ** 31
    assert est.fits and not est.notes
    heads = estimate(cfg, TPU, Workload(batch=512, prompt=2048), 32, layout="wg-xyz/attn-heads")
    assert heads.kv_per_chip_bytes == 2 ** 36 and not heads.fits  # the replicated multiquery head: 64 GiB


# Planner ------------------------------------------------------------------------------------------
def test_plan_searches_pipeline_stages_and_honours_the_memory_limit() -> None:
    cfg, wl = get_preset("gpt-13b"), Workload(batch=1, prompt=1024, generate=64, decode_batch=16)
    result = plan(cfg, A100, wl, 16, objective="latency", batches=(8, 16))
    pairs = {(c.estimate.tp, c.estimate.stages) for c in result.ranked}
    assert (8, 2) in pairs and (4, 2) in pairs and (8, 1) in pairs
    assert result.rejected["split"] > 0  # 16 and 32 do not split gpt-13b's 40 heads
    tight = plan(cfg, A100, wl, 16, objective="latency", batches=(8, 16), memory_limit=10 * 2 ** 30)
    assert all(c.estimate.memory_per_chip_bytes <= 10 * 2 ** 30 for c in tight.ranked)
    assert tight.rejected["memory"] > result.rejected["memory"]


def test_plan_throughput_counts_replicas() -> None:
    result = plan(get_preset("gpt-1.3b"), H100, Workload(prompt=512, generate=64), 8, objective="throughput",
                  batches=(8, 32))
    best = result.best
    assert best.replicas == 8 // best.estimate.chips
    assert best.tokens_per_s == max(c.tokens_per_s for c in result.ranked)
    assert best.tokens_per_s == pytest.approx(best.replicas * best.estimate.requests_per_s * (512 + 64))


# Issue 15: every bad input a clear error ----------------------------------------------------------
BAD_SPECS = [
    ("peak_flops", [312e12], "peak_flops"), ("memory_bw", "1.5e12", "memory_bw"), ("torus_axes", 4, "torus_axes"),
    ("memory_bw", float("nan"), "memory_bw"), ("matmul_eff", 5.0, "matmul_eff"), ("link_bw", float("inf"), "link_bw"),
    ("ring_factor", "no", "ring_factor"), ("alpha", -1e-6, "alpha"), ("peak_flops", {"bf16": "fast"}, "peak_flops"),
    ("chips_per_node", 8.5, "chips_per_node"), ("inter_node_bw", 0.0, "inter_node_bw"),
    ("memory_eff", {"bf16": 0.5}, "memory_eff"), ("comm_eff", True, "comm_eff"), ("name", "", "name"),
]


@pytest.mark.parametrize("key,value,field", BAD_SPECS)
def test_bad_hardware_fields_name_the_field(tmp_path, capsys, key, value, field) -> None:
    spec = H100.to_dict() | {key: value}
    with pytest.raises(ConfigError, match=field):
        Hardware.from_dict(spec)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))  # NaN / Infinity as Python's json writes them, which json.loads reads
    assert main(["predict", "--model", "gpt-1.3b", "--hardware", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and field in err


@pytest.mark.parametrize("argv,field", [
    (["plan", "--model", "kraken4-1.3b", "--chips", "8", "--kraken-degrees", "0,4"], "kraken degree"),
    (["plan", "--model", "kraken4-1.3b", "--chips", "8", "--kraken-degrees", "-2"], "kraken degree"),
    (["plan", "--model", "kraken4-13b", "--chips", "8", "--kraken-degrees", "3"], "kraken degree"),
    (["size", "--budget", "124000000", "--layers", "-1", "--heads", "12", "--n-sub", "2"], "n_layer"),
    (["size", "--budget", "124000000", "--layers", "12", "--heads", "12", "--n-sub", "0"], "n_sub"),
    (["size", "--budget", "0", "--layers", "12", "--heads", "12", "--n-sub", "2"], "budget"),
    (["size", "--budget", "1000", "--layers", "12", "--heads", "12", "--n-sub", "2"], "budget"),
    (["predict", "--model", "gpt-1.3b", "--prompt", "100000"], "prompt"),
    (["predict", "--model", "gpt-1.3b", "--generate", "100000"], "generate"),
    (["predict", "--model", "gpt-13b", "--chips", "3"], "heads"),
    (["predict", "--model", "gpt-13b", "--chips", "1000000"], "chips"),
    (["predict", "--model", "gpt-13b", "--chips", "16", "--pp", "3"], "chips"),
    (["predict", "--model", "gpt-13b", "--chips", "8", "--pp", "80"], "stages"),
    (["predict", "--model", "gpt-1.3b", "--chips", "12", "--pp", "3"], "nodes"),
    (["predict", "--model", "gpt-1.3b", "--batch", "0"], "batch"),
    (["predict", "--model", "gpt-1.3b", "--batch", "1,2,3"], "batch"),
    (["predict", "--model", "gpt-1.3b", "--chips", "2", "--batch", "4", "--pp", "2", "--microbatches", "3"],
     "microbatches"),
    (["plan", "--model", "gpt-1.3b", "--chips", "0"], "chips"),
    (["plan", "--model", "gpt-1.3b", "--memory-limit", "nan"], "memory limit"),
    (["plan", "--model", "gpt-1.3b", "--target-latency", "-1"], "target latency"),
])
def test_bad_cost_model_arguments_are_one_line_errors(capsys, argv, field) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"krakenlm {argv[0]}: error:") and field in err


def test_chips_beyond_the_width_and_head_splits() -> None:
    with pytest.raises(ConfigError, match="40 attention heads do not split evenly over 3 chips"):
        check_split(get_preset("gpt-13b"), 3)
    with pytest.raises(ConfigError, match="exceed the model width"):
        check_split(get_preset("gpt-13b"), 1_000_000)
    check_split(get_preset("palm-540b"), 64)  # 48 heads padded to 64, as Pope et al. do
    with pytest.raises(ConfigError, match="per sub-layer"):
        check_split(get_preset("kraken4-13b"), 16)  # 10 heads per sub-layer over 4 shards
    with pytest.raises(ConfigError, match="tile nodes"):
        check_split(get_preset("gpt-1.3b"), 4, stages=3, chips_per_node=8)
    check_split(get_preset("gpt-1.3b"), 4, stages=2, chips_per_node=8)  # 8 chips, one node


# The issue-16 study -------------------------------------------------------------------------------
def test_cluster_study_where_kraken_pays() -> None:
    from krakenlm.costmodel.studies import cluster_study

    rows = {(r.size, r.prompt, r.nodes): r for r in cluster_study()}
    assert len(rows) == 20
    assert rows[("13b", 128, 2)].standard["across"] is None  # 40 heads do not split over 16 chips
    assert rows[("13b", 128, 2)].speedup(8, "across") is None and rows[("13b", 128, 2)].speedup(8, "inside") > 1
    small, large = rows[("1.3b", 128, 2)], rows[("65b", 2048, 2)]
    assert small.speedup(8, "inside") > small.speedup(8, "across")  # latency-bound: the paper's regime
    assert large.speedup(8, "across") > large.speedup(8, "inside")  # the network exchange hidden under attention
    for size in ("1.3b", "6.7b"):  # small models: TP across nodes only adds latency-bound network all-reduces
        for nodes in (2, 4):
            r = rows[(size, 128, nodes)]
            assert r.standard["across"] > r.standard["inside"]
    big = rows[("175b", 128, 2)]  # the 175B model's compute is worth splitting over 16 chips
    assert big.standard["across"] < big.standard["inside"]
