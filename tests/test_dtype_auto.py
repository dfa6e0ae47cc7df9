"""--dtype auto: the faster of bf16 and fp32 for a model's GEMMs here, measured once and cached."""

import json

import pytest
import torch

from krakenlm import roofline
from krakenlm.dtypes import AUTO_CANDIDATES, parse_dtype
from krakenlm.engine import Engine, EngineOptions
from krakenlm.errors import ConfigError
from krakenlm.roofline import resolve_dtype
from krakenlm.source import ModelSource
from krakenlm.train.trainer import TrainConfig
from tests.conftest import tiny


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("KRAKENLM_CACHE_DIR", str(tmp_path))
    roofline.PROBES.forget()
    yield tmp_path
    roofline.PROBES.forget()


def test_auto_resolves_to_a_real_dtype(cache):
    name = resolve_dtype("auto", tiny("kraken"))
    assert name in AUTO_CANDIDATES and parse_dtype(name) in (torch.bfloat16, torch.float32)
    assert resolve_dtype("bfloat16", tiny()) == "bf16"  # a named dtype passes through


@pytest.mark.parametrize("faster", ["bf16", "fp32"])
def test_choice_is_the_cache_entrys_with_no_measurement(cache, monkeypatch, faster):
    cfg = tiny()
    shape = roofline.forward_shape(cfg, prompt=cfg.block_size)
    device = torch.device("cpu")
    entries = {roofline.gemm_key(g, d, device): (1e12 if d == faster else 1e9)
               for g in shape.gemms for d in AUTO_CANDIDATES}
    (cache / "roofline.json").write_text(json.dumps(entries))

    def no_timing(*args):
        raise AssertionError("measured although the cache had every entry")

    monkeypatch.setattr(roofline, "_time_gemm", no_timing)
    assert all(resolve_dtype("auto", cfg) == faster for _ in range(3))


def test_corrupt_cache_is_ignored_with_a_warning(cache):
    (cache / "roofline.json").write_text("\x00 definitely not json")
    with pytest.warns(RuntimeWarning, match="ignoring the unreadable measurement cache"):
        assert resolve_dtype("auto", tiny()) in AUTO_CANDIDATES
    assert isinstance(json.loads((cache / "roofline.json").read_text()), dict)  # replaced by a good one


def test_engine_ranks_agree_on_the_resolved_dtype(cache):
    """Rank 0 resolves 'auto' and the follower takes its answer: a 2-rank generation runs, in that dtype."""
    source = ModelSource(config=tiny("kraken"), seed=0)
    with Engine.launch(source, EngineOptions(tp=2, device="cpu", dtype="auto")) as engine:
        assert engine.options.dtype in AUTO_CANDIDATES
        assert next(engine.model.parameters()).dtype == parse_dtype(engine.options.dtype)
        result = engine.generate([[1, 2, 3]], 4)
    assert len(result.tokens[0]) == 4


def test_bad_dtype_names_fail_early():
    assert TrainConfig(dtype="auto").dtype == "auto"
    for bad in ("float8", "AUTO"):
        with pytest.raises(ConfigError, match="dtype"):
            TrainConfig(dtype=bad)
        with pytest.raises(ConfigError, match="dtype"):
            EngineOptions(dtype=bad)


def test_busy_cores_run_while_the_context_lasts_and_stop_after():
    """The calibration's stand-in for the run's other ranks: threads computing during the probe, gone after."""
    import threading

    from krakenlm.machine import busy_cores

    def busy() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("krakenlm-busy-")]

    with busy_cores(2):
        assert len(busy()) == 2 and all(t.is_alive() for t in busy())
    assert busy() == []
    with busy_cores(0):
        assert busy() == []


@pytest.mark.parametrize("call_s, calls", [(0.0, 7), (0.6, 2), (1.2, 1)], ids=["quick", "long", "very-long"])
def test_long_calls_are_timed_once(monkeypatch, call_s, calls):
    """A probe of a call that takes seconds (bf16 GEMMs without bf16 instructions) costs one or two calls,
    not minutes; quick calls still get their repeats. The clock is faked: the count is what is tested."""
    from krakenlm import machine

    now = [0.0]
    count = [0]

    def run() -> None:
        count[0] += 1
        now[0] += call_s

    monkeypatch.setattr(machine.time, "thread_time", lambda: now[0])
    monkeypatch.setattr(machine.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(machine, "LONG_CALL_S", 0.5)
    seconds = machine.fastest_seconds(run, torch.device("cpu"), repeats=5, budget_s=0.0, idle_wait_s=0.0)
    assert count[0] == calls and seconds == call_s


@pytest.mark.parametrize("slowdown, warns", [(50.0, True), (1.5, False)], ids=["no-bf16-instructions", "xeon-like"])
def test_a_named_16bit_dtype_far_slower_than_fp32_warns(cache, slowdown, warns):
    """bf16 chosen by name on a CPU where its GEMMs crawl (AMD Zen 2: ~50x fp32's time) warns; a modest
    gap does not. The cached ratio is what decides: no timing here."""
    import warnings

    from krakenlm.machine import machine_key

    key = f"{machine_key(torch.device('cpu'))}|bf16 vs fp32|gemm {roofline.SLOW_16BIT_PROBE}"
    (cache / "roofline.json").write_text(json.dumps({key: slowdown}))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert resolve_dtype("bf16", tiny()) == "bf16" and resolve_dtype("fp32", tiny()) == "fp32"
    assert [("50x slower than fp32" in str(w.message)) for w in seen] == ([True] if warns else [])


def test_the_16bit_slowdown_is_measured_once_and_cached(cache):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resolve_dtype("bf16", tiny())
    entries = json.loads((cache / "roofline.json").read_text())
    (ratio,) = [v for k, v in entries.items() if k.endswith(f"bf16 vs fp32|gemm {roofline.SLOW_16BIT_PROBE}")]
    assert ratio > 0
