"""Standard TP with its all-reduces overlapped by the runtime (chunked:K, collective-matmul): exact against
one device on 2 and 4 ranks, prefill (with left padding) and decode; refused where it does not apply."""

import json
import subprocess
import sys

import pytest

from krakenlm.cli import main
from krakenlm.engine import Engine, EngineOptions
from krakenlm.errors import ConfigError
from krakenlm.parallel.launch import run_ranks
from krakenlm.source import ModelSource
from tests.conftest import tiny

SHAPES = {
    "gpt": tiny("gpt", n_layer=2),
    "llama": tiny("gpt", n_layer=2, n_kv_head=2, position="rope", mlp="swiglu", norm="rmsnorm", bias=False,
                  tie_embeddings=False),
    "parallel": tiny("parallel", n_layer=2, n_kv_head=1, bias=False),
}
MODES = ("chunked:3", "collective-matmul")


def cases(world: int) -> dict[str, dict]:
    out = {f"{shape} {mode}": {"config": SHAPES[shape].to_dict(), "overlap": mode}
           for shape in SHAPES for mode in MODES}
    # one sequence: a decode step has fewer tokens than ranks (chunked: one chunk; the ring: empty rows)
    out["gpt collective-matmul one sequence"] = {"config": SHAPES["gpt"].to_dict(), "overlap": "collective-matmul",
                                                 "prompts": 1}
    out["parallel collective-matmul three sequences"] = {"config": SHAPES["parallel"].to_dict(),  # uneven rows
                                                         "overlap": "collective-matmul", "prompts": 3}
    out["gpt chunked:64 one sequence"] = {"config": SHAPES["gpt"].to_dict(), "overlap": "chunked:64", "prompts": 1}
    if world == 2:  # the compiled decode step: chunks as functional collectives (4 rows: 2 chunks)
        out["llama chunked:2 compiled"] = {"config": SHAPES["llama"].to_dict(), "overlap": "chunked:2",
                                           "compile": True}
        # int8 weights: the deferred projections multiply through the Int8Weight modules
        out["llama int8 collective-matmul"] = {"config": SHAPES["llama"].to_dict(), "overlap": "collective-matmul",
                                               "quantize": "int8"}
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_overlapped_standard_tp_equals_one_device(world, tmp_path):
    want = cases(world)
    out = tmp_path / "r.json"
    assert run_ranks("tests.overlap_workers:equivalence", world, {"cases": want, "out": str(out), "decode_steps": 6},
                     grace=60) == 0
    results = json.loads(out.read_text())
    assert results.keys() == want.keys()
    for name, ranks in results.items():
        for rank, r in enumerate(ranks):
            assert r["prefill"] <= 1e-4 and r["decode"] <= 1e-4, (name, rank, r["prefill"], r["decode"])
            assert r["greedy_equal"], name
            if not want[name].get("compile"):  # the timeline watched the overlapped transfers (eager only)
                assert 0.0 <= r["hidden"] <= 1.0, name
            check_ledger(want[name], r)


def check_ledger(case: dict, r: dict) -> None:
    """chunked:K issues min(K, tokens) all-reduces per pair; collective-matmul's loops move what the
    all-gather and reduce-scatter they decompose move (D = tokens x E x 4 bytes each)."""
    layer0 = r["ledger_prefill"]["layer0"]
    pairs = 1 if case["config"]["arch"] == "parallel" else 2  # a parallel block: one fused pair
    tokens = r["batch"] * r["width"]
    if case["overlap"].startswith("chunked") and case.get("prompts", 4) > 1:
        k = int(case["overlap"].split(":")[1])
        assert [site for _, site, _ in layer0] == ["chunked"] * pairs * min(k, tokens), layer0
    if case["overlap"] == "collective-matmul":
        d = tokens * case["config"]["n_embd"] * 4
        assert layer0 == [["all_gather", "ring all-gather", d], ["reduce_scatter", "ring reduce-scatter", d]] * pairs


def test_server_rows_under_overlap_equal_one_device(tmp_path):
    """Staggered one-row prefills and decode steps of 1-3 rows (fewer tokens than chunks, or than ranks)."""
    config = SHAPES["llama"]
    batch = [list(range(5, 5 + n)) for n in (9, 2, 17)]
    payload = {"config": config.to_dict(), "modes": list(MODES), "prompts": batch, "out": str(tmp_path / "r.json")}
    assert run_ranks("tests.overlap_workers:serving_rows", 2, payload, grace=30) == 0
    one = Engine(ModelSource(config=config, seed=0), EngineOptions(device="cpu"))
    want = [one.generate([p], 8).tokens[0] for p in batch]
    assert json.loads((tmp_path / "r.json").read_text()) == {mode: want for mode in MODES}


@pytest.mark.parametrize(("arch", "options", "match"), [
    ("kraken", {"tp_overlap": "chunked:4"}, "Kraken and ladder models overlap by their own schedule"),
    ("ladder", {"tp_overlap": "collective-matmul"}, "Kraken and ladder models overlap by their own schedule"),
    ("gpt", {"tp_overlap": "collective-matmul", "compile": True}, "drop --compile"),
    ("gpt", {"tp_overlap": "chunked:2", "layout": "2d-ws/attn-heads"}, "partitioning layout"),
])
def test_overlap_is_refused_where_it_does_not_apply(arch, options, match):
    with pytest.raises(ConfigError, match=match):
        Engine(ModelSource(config=tiny(arch, n_layer=2), seed=0), EngineOptions(device="cpu", **options))


@pytest.mark.parametrize("text", ["full", "chunked:0", "chunked", "ring"])
def test_bad_overlap_values_are_refused(text):
    with pytest.raises(ConfigError, match="overlap"):
        EngineOptions(tp_overlap=text)


def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "krakenlm", "generate", "--prompt", "To be, or not",
                           "--max-new-tokens", "5", "--dtype", "fp32", *args], capture_output=True, text=True,
                          timeout=180)


@pytest.mark.parametrize("preset", ["mini-gpt", "mini-parallel"])
def test_generate_with_overlap_matches_one_device(preset):
    one = _generate("--preset", preset)
    two = _generate("--preset", preset, "--tp", "2", "--overlap", "collective-matmul")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert one.stdout == two.stdout
    assert "AllReduce time hidden by the --overlap mode" in two.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--preset", "mini-kraken-2way", "--overlap", "chunked:4"], "Kraken and ladder models overlap"),
    (["--preset", "mini-gpt", "--overlap", "chunked:x"], "overlap: must be none"),
])
def test_generate_refuses_overlap_in_one_line(args, message, capsys):
    assert main(["generate", "--prompt", "x", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
