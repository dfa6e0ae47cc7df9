"""Tensor-parallel runtime on gloo: every plan equals the single-device model."""

import json
import time

import pytest

from krakenlm.checkpoint import save_checkpoint
from krakenlm.errors import ConfigError
from krakenlm.parallel.launch import run_ranks
from krakenlm.parallel.plan import ParallelPlan
from krakenlm.source import build_model
from tests.conftest import tiny

LLAMA = dict(norm="rmsnorm", mlp="swiglu", position="rope", rope_theta=500000.0, tie_embeddings=False, bias=False)
CASES = {
    1: {"gpt": tiny("gpt"), "kraken2-T1": tiny("kraken"), "ladder": tiny("ladder")},
    2: {"gpt": tiny("gpt"), "gpt-mqa-rope-swiglu": tiny("gpt", n_kv_head=1, position="rope", mlp="swiglu"),
        "parallel": tiny("parallel"), "kraken2-T=N": tiny("kraken"),
        "kraken4-T<N": tiny("kraken", n_sub=4, n_head=1, n_embd=16), "ladder": tiny("ladder"),
        "ladder-llama-gqa": tiny("ladder", n_kv_head=2, **LLAMA), "kraken2-llama": tiny("kraken", **LLAMA)},
    4: {"gpt": tiny("gpt"), "gpt-gqa": tiny("gpt", n_kv_head=2), "parallel": tiny("parallel"),
        "kraken4-T=N": tiny("kraken", n_sub=4, n_head=1, n_embd=16),
        "kraken8-T<N": tiny("kraken", n_sub=8, n_head=1, n_embd=16),
        "kraken2-T=2N": tiny("kraken", bias=True), "ladder": tiny("ladder"),
        "ladder-last-2-of-3-gqa": tiny("ladder", n_kv_head=2, ladder_layers=2)},
}


@pytest.mark.parametrize("world", sorted(CASES))
def test_tensor_parallel_equals_single_device(world, tmp_path):
    payload = {"out": str(tmp_path), "decode_steps": 32, "timeline": world == 2, "options": {"lm_head": "split"},
               "cases": {k: v.to_dict() for k, v in CASES[world].items()}}
    assert run_ranks("tests.tp_workers:equivalence", world, payload, grace=30) == 0
    results = json.loads((tmp_path / f"results-{world}.json").read_text())
    assert results.keys() == CASES[world].keys()
    for name, r in results.items():
        assert r["prefill"] <= 1e-4, (name, r)
        assert r["decode"] <= 1e-4, (name, r)
        assert r["greedy_equal"], name
        per = -(-CASES[world][name].vocab_size // world)  # the head's slices gathered: 2 rows, padded to per
        assert r["vocab_gathers"] == ([] if world == 1 else [["all_gather", 2 * per * world * 4]]), (name, r)
    if world == 2:
        tl = results["kraken2-T=N"]["timeline"]
        assert tl["exchanges"] == CASES[2]["kraken2-T=N"].n_layer - 1
        assert tl["issued_before_next_layer"] and tl["completed"]
        assert 0.0 <= tl["hidden"] <= 1.0
        trace = json.loads((tmp_path / "trace-rank0.json").read_text())
        assert any(e["name"].startswith("exchange") for e in trace["traceEvents"])
        tl = results["ladder"]["timeline"]  # every module's sum is issued async
        assert tl["ladder"] == 2 * CASES[2]["ladder"].n_layer
        assert tl["awaited_after_next_issued"] and tl["completed"]
        assert 0.0 <= tl["hidden"] <= 1.0


@pytest.mark.parametrize("arch", ["kraken", "ladder"])
def test_no_comm_ceiling_runs_with_right_shapes_and_wrong_numbers(tmp_path, arch):
    out = tmp_path / "r.json"
    assert run_ranks("tests.tp_workers:no_comm", 2, {"config": tiny(arch).to_dict(), "out": str(out)}) == 0
    r = json.loads(out.read_text())
    assert r["shape_ok"] and r["diff"] > 1e-3


def test_blocking_ladder_equals_single_device(tmp_path):
    """overlap=False waits for every ladder AllReduce at once: same numbers, no overlap."""
    payload = {"out": str(tmp_path), "decode_steps": 4, "options": {"overlap": False},
               "cases": {"ladder": tiny("ladder").to_dict()}}
    assert run_ranks("tests.tp_workers:equivalence", 2, payload, grace=30) == 0
    r = json.loads((tmp_path / "results-2.json").read_text())["ladder"]
    assert r["prefill"] <= 1e-4 and r["decode"] <= 1e-4 and r["greedy_equal"]


@pytest.mark.parametrize("when", [("prefill", 2), ("decode", 3)])
def test_dead_rank_makes_the_others_exit_with_a_message(when, capfd):
    payload = {"config": tiny("kraken", n_layer=4).to_dict(), "timeout": 20, "when": when, "how": "die"}
    start = time.monotonic()
    code = run_ranks("tests.tp_workers:failing", 2, payload, grace=20)
    elapsed = time.monotonic() - start
    err = capfd.readouterr().err
    assert code != 0 and elapsed < 40
    assert "rank 0" in err and "peer rank died or stalled" in err


def test_stalled_rank_times_out(capfd):
    payload = {"config": tiny("kraken", n_layer=4).to_dict(), "timeout": 4, "when": ("prefill", 2), "how": "stall"}
    start = time.monotonic()
    code = run_ranks("tests.tp_workers:failing", 2, payload, grace=4)
    assert code != 0 and time.monotonic() - start < 30
    assert "peer rank died or stalled" in capfd.readouterr().err


def test_ranks_with_different_weights_refuse_to_start(capfd):
    payload = {"config": tiny("gpt").to_dict(), "timeout": 20, "seeds": [0, 1]}
    assert run_ranks("tests.tp_workers:failing", 2, payload, grace=10) == 2
    assert "ranks disagree on 'source'" in capfd.readouterr().err


def test_rank_that_cannot_load_its_model_fails_its_peers_at_once(tmp_path, capfd):
    cfg = tiny("kraken")
    save_checkpoint(tmp_path / "ck", build_model(config=cfg, seed=0), cfg)
    payload = {"timeout": 60, "sources": [{"checkpoint": str(tmp_path / "ck")}, {"checkpoint": str(tmp_path / "no")}]}
    start = time.monotonic()
    assert run_ranks("tests.tp_workers:failing", 2, payload, grace=10) != 0
    assert time.monotonic() - start < 30  # well inside the 60 s collective timeout
    err = capfd.readouterr().err
    assert "rank 1 could not load the model" in err and "no such checkpoint" in err


def test_world_size_must_equal_tp(capfd):
    payload = {"config": tiny("gpt").to_dict(), "timeout": 20, "tp": 2, "seeds": [0, 0, 0]}
    assert run_ranks("tests.tp_workers:failing", 3, payload, grace=10) == 2
    assert "tp=2 but 3 ranks" in capfd.readouterr().err


@pytest.mark.parametrize("cfg,tp,match", [
    (tiny("kraken", n_sub=4, n_head=1, n_embd=16), 3, "does not fit"),
    (tiny("gpt"), 8, "n_head=4 is not divisible"),
    (tiny("gpt", n_kv_head=2, n_head=6, n_embd=48), 4, "n_head=6"),
])
def test_incompatible_tp_degrees_rejected_before_any_work(cfg, tp, match):
    with pytest.raises(ConfigError, match=match):
        ParallelPlan(cfg, tp)


def test_plan_groups_for_t_equals_k_times_n():
    plan = ParallelPlan(tiny("kraken"), 4)
    assert [plan.shard(r) for r in range(4)][3].sub_start == 1
    assert plan.shard_group(3) == [2, 3] and plan.exchange_group(3) == [1, 3]
    assert plan.collectives_per_forward() == {"blocking_allreduce": 6, "overlapped_allreduce": 2,
                                              "conjunction_allreduce": 1}


@pytest.mark.parametrize("arch,n_sub,tp", [("gpt", 1, 2), ("gpt", 1, 4), ("kraken", 2, 2), ("kraken", 2, 4),
                                           ("kraken", 4, 2), ("kraken", 4, 4), ("kraken", 2, 1)])
@pytest.mark.parametrize("vocab", [256, 257])
def test_ranks_split_the_vocabulary_into_ordered_disjoint_slices(arch, n_sub, tp, vocab):
    """A split LM head: rank r projects slice r (all_gather's order), slices cover the vocabulary once."""
    extra = {"n_sub": n_sub, "n_head": 2} if arch == "kraken" else {}
    cfg = tiny(arch, vocab_size=vocab, **extra)
    plan = ParallelPlan(cfg, tp)
    parts = [plan.shard(r).vocab_part(cfg) for r in range(tp)]
    per = -(-vocab // tp)
    assert parts == [(min(vocab, r * per), min(vocab, (r + 1) * per)) for r in range(tp)]
    assert parts[0][0] == 0 and parts[-1][1] == vocab


def test_ladder_plan_counts_its_async_sums():
    assert ParallelPlan(tiny("ladder"), 2).collectives_per_forward() == {
        "blocking_allreduce": 0, "overlapped_allreduce": 6, "conjunction_allreduce": 0}
    hybrid = ParallelPlan(tiny("ladder", ladder_layers=2), 2).collectives_per_forward()
    assert hybrid["blocking_allreduce"] == 1 and hybrid["overlapped_allreduce"] == 5
    assert ParallelPlan(tiny("ladder"), 1).collectives_per_forward()["overlapped_allreduce"] == 0


def test_lm_head_auto_splits_only_a_head_worth_a_gather():
    """lm_head=auto splits the vocabulary when each rank then skips >= SPLIT_HEAD_MIN_BYTES of the head's
    reads (GPT-2's 50257 x 768 fp32 at 2 ranks: 77 MB), not a tiny model's; split / whole force it."""
    from types import SimpleNamespace

    import torch

    from krakenlm.engine import Engine, EngineOptions

    def splits(vocab: int, lm_head: str = "auto", world: int = 2) -> bool:
        model = SimpleNamespace(wte=SimpleNamespace(weight=torch.empty(vocab, 768)), lm_head=None)
        return Engine._splits_head(SimpleNamespace(options=EngineOptions(lm_head=lm_head), model=model, world=world))

    assert splits(50257) and not splits(4096) and splits(4096, "split") and not splits(50257, "whole")
    with pytest.raises(ConfigError, match="lm_head"):
        EngineOptions(lm_head="sharded")
