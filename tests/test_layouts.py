"""Pope et al.'s layouts executed: every layout equals one device, and what each rank moves and holds
is what the cost model says (krakenlm.costmodel), exactly, up to the differences stated here:

- the runtime keeps embeddings, norms and out-projection biases whole on every rank (the cost model
  splits every parameter n ways): weights = cost + (n-1)/n * those bytes;
- with attn-heads and fewer K/V heads than ranks, each rank stores and computes its own copy of a K/V
  head (the cost model's KV memory counts this replication; its weights and 2D traffic do not): the
  excess is 2 * head_size * (ceil(kv/n) - kv/n) rows of W_qkv, and T times that in the 2D
  reduce-scatter over x (X members);
- 2D with E split over x (X > 1) all-reduces two float32 norm statistics per token per pair (listed
  as "stats"; the cost model does not price them);
- Kraken's last layer has no exchange (the conjunction, an LM-head collective, sums the sub-layers).
"""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

from krakenlm.cli import main as cli_main
from krakenlm.config import ModelConfig
from krakenlm.costmodel.estimator import Workload, max_context
from krakenlm.costmodel.hardware import load_hardware
from krakenlm.costmodel.layout_choice import check_layout, choose
from krakenlm.costmodel.layouts import layer_pairs, split_2d_axes
from krakenlm.errors import ConfigError
from krakenlm.layout import Layout
from krakenlm.parallel.launch import run_ranks
from krakenlm.parallel.layouts import Mesh
from krakenlm.parallel.ledger import predicted
from krakenlm.presets import get_preset
from tests.conftest import tiny


def shape(name: str) -> ModelConfig:
    """MHA with biases; GQA with a small FFN (2D splits its E at 4 ranks); MQA with rope and SwiGLU;
    a multiquery parallel block."""
    base = dict(n_layer=2, n_embd=32, n_head=4)
    return {"mha": tiny("gpt", **base),
            "gqa": tiny("gpt", **base, n_kv_head=2, ffn_hidden=32, bias=False),
            "mqa": tiny("gpt", **base, n_kv_head=1, ffn_hidden=16, position="rope", mlp="swiglu", bias=False,
                        norm="rmsnorm"),
            "parallel-mqa": tiny("parallel", **base, n_kv_head=1, ffn_hidden=16, bias=False)}[name]


FULL = "KRAKENLM_LAYOUTS_FULL"
ALL = ["1d-ws/attn-heads", "1d-ws/attn-batch", "2d-ws/attn-heads", "2d-ws/attn-batch",
       "wg-x/attn-batch,2d-ws/attn-batch", "wg-xyz/attn-batch,1d-ws/attn-batch"]
# Per world: (shape, layout) pairs. One rank runs every layout; 2 ranks the layouts whose mesh is one
# axis (2D there is X = 1: Pope's 1D with an E-split residual); 4 ranks the 2x2 mesh: 2D with E split
# over x for every shape, and wg-x gathering half the ranks. (1d-ws/attn-heads is Megatron:
# test_parallel's subject.) The 4-rank grid keeps one case per code path so the suite stays fast;
# FULL_GRID adds the remaining combinations (KRAKENLM_LAYOUTS_FULL=1, benchmarks/verify_layouts.py).
GRID = {
    1: [(s, lay) for s in ("gqa", "mqa") for lay in ALL],
    2: [(s, lay) for s in ("mha", "gqa", "mqa") for lay in ("1d-ws/attn-batch", "wg-xyz/attn-batch,2d-ws/attn-batch")]
    + [("mqa", "2d-ws/attn-heads"), ("gqa", "2d-ws/attn-batch"), ("parallel-mqa", "wg-xy/attn-batch,1d-ws/attn-batch")],
    4: [("mha", "2d-ws/attn-heads"), ("mqa", "2d-ws/attn-heads"), ("gqa", "2d-ws/attn-batch")]
    + [("mqa", "1d-ws/attn-batch", 2)]  # 2 sequences on 4 ranks: two ranks hold none
    + [("mha", "wg-x/attn-batch,2d-ws/attn-batch"), ("parallel-mqa", "2d-ws/attn-batch")],
}
FULL_GRID = {4: [("gqa", "2d-ws/attn-heads"), ("mha", "2d-ws/attn-batch"), ("mqa", "2d-ws/attn-batch"),
                 ("mqa", "wg-x/attn-batch,2d-ws/attn-batch"), ("gqa", "1d-ws/attn-batch")]}
INT8 = {2: [("mha", "1d-ws/attn-heads"), ("gqa", "2d-ws/attn-batch"), ("mqa", "wg-xyz/attn-batch,1d-ws/attn-batch")],
        4: [("mqa", "wg-x/attn-batch,2d-ws/attn-batch")]}


def cases(world: int) -> dict[str, dict]:
    out = {f"{name} {layout}" + (f" batch {more[0]}" if more else ""):
           {"config": shape(name).to_dict(), "layout": layout, "prompts": more[0] if more else 4}
           for name, layout, *more in GRID[world] + (FULL_GRID.get(world, []) if os.environ.get(FULL) else [])}
    for name, layout in INT8.get(world, []):
        out[f"{name} int8 {layout}"] = {"config": shape(name).to_dict(), "layout": layout, "quantize": "int8"}
    if world > 1:
        out["kraken"] = {"config": tiny("kraken", n_layer=2, n_sub=2).to_dict(), "layout": "kraken"}
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_layout_equals_one_device_and_the_cost_model(world, tmp_path):
    want = cases(world)
    out = tmp_path / "r.json"
    assert run_ranks("tests.layout_workers:equivalence", world, {"cases": want, "out": str(out), "decode_steps": 32},
                     grace=60) == 0
    results = json.loads(out.read_text())
    assert results.keys() == want.keys()
    for name, case in want.items():
        ranks = results[name]["ranks"]
        if ranks[0]["batch"] % world:  # uneven sequences per rank: the cost model's bytes are the ranks' mean
            for phase in ("ledger_prefill", "ledger_decode"):
                mean = sum(r[phase]["volume"] for r in ranks) / world
                assert len({r[phase]["volume"] for r in ranks}) > 1
                for r in ranks:
                    r[phase]["volume"] = mean
        for rank, r in enumerate(ranks):
            assert r["prefill"] <= 1e-4 and r["decode"] <= 1e-4, (name, rank, r["prefill"], r["decode"])
            assert r["greedy_equal"], name
            check_ledger(ModelConfig.from_dict(case["config"]), Layout.parse(results[name]["layout"]), world, r,
                         case.get("quantize"), name)


def replicated_params(config: ModelConfig) -> int:
    """Parameters krakenlm keeps whole on every rank: embeddings, norms and out-projection biases (a
    Kraken sub-layer's go with its sub-layer)."""
    e, b = config.n_embd, 2 if config.bias else 1
    norms = 0 if config.arch == "kraken" else (1 if config.arch == "parallel" else 2) * e * b
    out_bias = 2 * e if config.bias and config.arch != "kraken" else 0
    conj = e if config.bias and config.arch == "kraken" else 0
    pos = config.block_size * e if config.position == "learned" else 0
    return config.vocab_size * e + pos + config.n_layer * (norms + out_bias) + e * b + conj


def kv_copies(config: ModelConfig, n: int, attention: str) -> float:
    """K/V heads per rank beyond an even split (attn-heads with fewer K/V heads than ranks)."""
    if attention != "heads" or config.arch == "kraken":
        return 0.0
    return math.ceil(config.kv_heads / n) - config.kv_heads / n


def x_sizes(config: ModelConfig, n: int) -> list[int]:
    mesh = Mesh.for_ranks(n).dims
    return [math.prod(mesh[a] for a in split_2d_axes(p, mesh)[0]) for p in layer_pairs(config)]


def expected_comm(config, lay, n, batch, width, phase, quantize) -> float:
    """The cost model's layer traffic, for int8 weights with our fp32 activations: solved from its fp32
    (4 bytes each) and int8 (activations 2, weights 1) predictions, activations x 4 + weights x 1."""
    c32 = predicted(config, str(lay), n, batch, width, phase, "fp32")["comm"]
    if not quantize:
        return c32
    c8 = predicted(config, str(lay), n, batch, width, phase, "int8")["comm"]
    acts = c8 - c32 / 4
    return 4 * acts + (c32 / 4 - acts)


def check_ledger(config, layout, n, r, quantize, name):
    batch = r["batch"]
    tokens = {"prefill": batch * r["width"], "decode": batch}
    for phase in ("prefill", "decode"):
        lay, got = layout.phase(phase), r[f"ledger_{phase}"]
        expect = expected_comm(config, lay, n, batch, r["width"], phase, quantize)
        copies = kv_copies(config, n, lay.attention)
        attn_x = x_sizes(config, n)[0] if lay.ffn == "2d-ws" else 1
        expect += config.n_layer * (attn_x > 1) * tokens[phase] * attn_x * 2 * config.head_size * copies * 4
        if lay.ffn == "kraken":
            expect -= 2 * tokens[phase] * config.n_embd * 4  # no exchange after the last layer
        assert got["volume"] == pytest.approx(expect, abs=0.5), (name, phase, got)
        split_x = [x for x in x_sizes(config, n) if x > 1] if lay.ffn == "2d-ws" else []
        assert got["stats"] == len(split_x) * config.n_layer * 2 * (tokens[phase] * 2 * 4), (name, phase)
    kv = predicted(config, str(layout.decode), n, batch, r["width"], "decode", cache_len=64)["kv"]
    assert r["ledger_prefill"]["kv"] == kv, (name, r["ledger_prefill"]["kv"], kv)
    if quantize:
        return
    whole = replicated_params(config) * 4
    # A weight-gathered prefill also keeps every W_in bias whole (it adds the gathered rows' biases).
    extra = 4 * config.n_layer * ((config.n_head + 2 * config.kv_heads) * config.head_size + config.ffn_size) \
        if config.bias and layout.prefill.gathered and n > 1 else 0
    assert n == 1 or r["replicated"] == whole + extra, (name, r["replicated"], whole, extra)
    copies = config.n_layer * config.n_embd * 2 * config.head_size * kv_copies(config, n, layout.decode.attention) * 4
    if config.arch == "kraken" and n > config.n_sub:  # a sub-layer's norms sit on each of its k = n/N ranks
        copies += config.n_layer * 2 * config.n_sub * config.n_embd * (1 / config.n_sub - 1 / n) * 4
    weights = predicted(config, str(layout.decode), n, 4, 20, "decode")["weights"] + whole * (n - 1) / n
    assert r["weights"] == pytest.approx(weights + copies + extra, abs=0.5), (name, r["weights"], weights)


@pytest.mark.parametrize("world", [2, 4])
def test_batch_sharded_multiquery_attention_reaches_t_times_the_context(world, tmp_path):
    """Pope et al.'s multiquery result on this runtime: one per-rank KV budget (what head-sharded
    attention needs for 32 tokens), T times the context when the cache is sharded over the batch."""
    config = shape("mqa").replace(block_size=512)
    per_token_heads = 2 * config.n_layer * config.head_size * 4 * 4  # K and V, one head, 4 sequences, fp32
    budget = 32 * per_token_heads
    out = tmp_path / "kv.json"
    payload = {"case": {"config": config.to_dict()}, "batch": 4, "budget": budget, "out": str(out)}
    assert run_ranks("tests.layout_workers:kv_context", world, payload, grace=30) == 0
    hw = dataclasses.replace(load_hardware("cpu-gloo"), memory_bytes=float(budget))
    for r in json.loads(out.read_text()):
        assert r["heads"]["intercept"] == r["batch"]["intercept"] == 0
        assert r["heads"]["context"] == 32 and r["batch"]["context"] == 32 * world
        assert all(r[m]["fits"] and r[m]["finite"] for m in ("heads", "batch"))
        for mode in ("heads", "batch"):
            assert max_context(config, hw, world, 4, mode, "fp32", kv_fraction=1.0) == r[mode]["context"]


# Refusals ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config,layout,tp,match", [
    (tiny("gpt", n_embd=48, n_head=6, n_kv_head=3), "2d-ws/attn-heads", 2, "n_kv_head=3 to divide or be a multiple"),
    (tiny("gpt", n_head=4), "1d-ws/attn-heads,1d-ws/attn-heads", 8, "n_head=4 divisible by 8"),
    (tiny("gpt", n_head=4), "wg-x/attn-batch", 2, "weight-gathered layouts are for prefill"),
    (tiny("gpt", n_head=4), "wg-x/attn-heads,1d-ws/attn-heads", 2, "use wg-x/attn-batch"),
    (tiny("gpt", n_head=4), "1d-ws/attn-heads,2d-ws/attn-heads", 2, "must share the stored weights"),
    (tiny("gpt", n_head=4), "wg-x/attn-batch,2d-ws/attn-heads", 2, "must share the stored weights"),
    (tiny("kraken"), "1d-ws/attn-heads", 2, "Kraken models run 'kraken'"),
    (tiny("gpt"), "kraken", 2, "does not apply to arch='gpt'"),
    (tiny("ladder"), "2d-ws/attn-heads", 2, "does not apply to arch='ladder'"),
    (tiny("gpt", n_embd=24, n_head=2, n_kv_head=1, head_dim=12), "2d-ws/attn-batch", 8, "divisible by 8"),
    (tiny("gpt", ffn_hidden=30, n_embd=32, n_head=2), "1d-ws/attn-batch", 4, "ffn_size=30"),
])
def test_layouts_the_mesh_or_heads_cannot_take_are_refused(config, layout, tp, match):
    with pytest.raises(ConfigError, match=match):
        check_layout(config, Layout.parse(layout), tp)


@pytest.mark.parametrize("text", ["3d-ws", "1d-ws/heads", "1d-ws/attn-rows", "a,b,c", ""])
def test_bad_layout_strings_name_the_choices(text):
    with pytest.raises(ConfigError, match="layout"):
        Layout.parse(text)


def test_engine_refuses_at_start_up_on_every_rank(tmp_path):
    case = {"config": tiny("gpt", n_head=4, n_kv_head=2).to_dict(), "layout": "wg-xy/attn-batch,2d-ws/attn-heads"}
    out = tmp_path / "err.txt"
    assert run_ranks("tests.layout_workers:refused", 2, {"case": case, "out": str(out)}, grace=20) == 0
    assert "must share the stored weights" in out.read_text()


def test_mesh_groups_partition_the_ranks():
    mesh = Mesh.for_ranks(8)
    assert mesh.dims == (2, 2, 2)
    for axes in [(0,), (1, 2), (0, 2), ()]:
        groups = mesh.groups(axes)
        assert sorted(r for g in groups for r in g) == list(range(8))
        assert all(len(g) == math.prod(mesh.dims[a] for a in axes) for g in groups)
    assert mesh.group(5, (0,)) == (1, 5) and mesh.group(5, (2,)) == (4, 5)


# CLI ----------------------------------------------------------------------------------------------------------
def test_generate_with_a_layout_prints_megatrons_text(tmp_path):
    args = [sys.executable, "-m", "krakenlm", "generate", "--preset", "mini-gpt", "--prompt", "To be, or not",
            "--max-new-tokens", "6", "--tp", "2"]
    one, two = (subprocess.run(args + extra, capture_output=True, text=True, timeout=120)
                for extra in ([], ["--layout", "2d-ws/attn-batch"]))
    assert one.returncode == two.returncode == 0, two.stderr
    assert one.stdout == two.stdout and "layout 2d-ws/attn-batch" in two.stderr


def test_generate_auto_layout_with_int8_runs_a_layout_the_model_takes():
    args = [sys.executable, "-m", "krakenlm", "generate", "--preset", "mini-gpt", "--prompt", "To be", "--prompt",
            "or not", "--max-new-tokens", "4", "--tp", "2", "--layout", "auto", "--quantize", "int8"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    chosen = run.stderr.split("layout ")[1].split()[0]
    check_layout(get_preset("mini-gpt"), Layout.parse(chosen), 2)
    assert run.stdout.count("To be") == 1 and run.stdout.count("or not") == 1


def test_auto_follows_pope_weight_gathered_for_large_batch_prefill_stationary_for_decode():
    """Pope et al.'s policy: weight-gathered once tokens per batch exceed E, weight-stationary decode at
    small batch; a batch the ranks do not divide never gets a (sequence-sharded) gathered prefill."""
    config, hw = get_preset("gpt2-124m"), load_hardware("cpu-gloo")
    assert choose(config, 4, Workload(batch=64, prompt=1000, generate=1), hw).prefill.gathered
    small = choose(config, 4, Workload(batch=1, prompt=128, generate=64), hw)
    assert not small.prefill.gathered and small.decode.ffn in ("1d-ws", "2d-ws")
    assert not choose(config, 4, Workload(batch=66, prompt=1000, generate=1), hw).prefill.gathered


@pytest.mark.parametrize("args,message", [
    (["--layout", "3d-ws"], "layout: '3d-ws' is not a layout"),
    (["--layout", "1d-ws/attn-rows"], "attention must be attn-heads or attn-batch"),
    (["--layout", "2d-ws", "--pad-heads", "64"], "pad_heads: not supported together with a layout"),
])
def test_bad_layout_options_are_one_line(args, message, capsys):
    assert cli_main(["generate", "--preset", "mini-gpt", "--prompt", "x", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_plan_prints_the_command_that_runs_its_choice(capsys):
    argv = ["plan", "--model", "gpt2-124m", "--hardware", "cpu-gloo", "--chips", "4", "--pp", "1", "--batch", "8",
            "--prompt", "512", "--generate", "32", "--objective", "latency"]
    assert cli_main(argv) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("run it: krakenlm generate"))
    tp = int(line.split("--tp ")[1].split()[0])
    check_layout(get_preset("gpt2-124m"), Layout.parse(line.split("--layout ")[1].split()[0]), tp)
