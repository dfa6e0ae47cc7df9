"""Seeded fuzz over model configs, checkpoint files, CLI arguments, sampling parameters and `generate`
(tests/fuzz.py), and over every verb's arguments, the files verbs read and HTTP bodies (tests/fuzz_verbs.py):
every case is a valid result or a typed one-line krakenlm error naming the field or file. Samples run here
(~20 s each); `python benchmarks/fuzz_inputs.py --cases 1000` runs the long fuzz and prints the counts."""

from __future__ import annotations

import pytest

from tests.fuzz import run_fuzz


@pytest.mark.filterwarnings("ignore")
def test_fuzzed_inputs_are_valid_or_a_clear_error(tmp_path):
    bad: list[str] = []

    def record(case, outcome, detail):
        if outcome == "other":
            bad.append(f"[{case.family}] {case.description[:200]} -> {detail}")

    tally = run_fuzz(tmp_path, seed=0, counts={"config": 300, "checkpoint": 300, "cli": 150, "sampling": 300,
                                               "generate": 60,
                                               "engine": 150}, timeout_s=60,
                     on_case=record)
    assert not bad, "\n".join(bad[:20])
    for family, counts in tally.items():  # the sample exercises both sides of every family
        assert counts["valid"] > 0 and counts["clear error"] > 0, (family, counts)


@pytest.mark.filterwarnings("ignore")
def test_fuzzed_verbs_files_and_bodies_are_valid_or_a_clear_error(tmp_path):
    """Issue 26: every verb's arguments, the files verbs read and HTTP bodies (tests/fuzz_verbs.py), a
    bounded sample (~30 s)."""
    from tests.fuzz_verbs import VERB_FAMILIES, stop_servers

    bad: list[str] = []

    def record(case, outcome, detail):
        if outcome == "other":
            bad.append(f"[{case.family}] {case.description[:200]} -> {detail}")

    counts = dict.fromkeys(VERB_FAMILIES, 25) | {"files": 80, "server": 80, "eval-tasks": 4}
    try:
        tally = run_fuzz(tmp_path, seed=3, counts=counts, timeout_s=60, on_case=record, families=VERB_FAMILIES)
    finally:
        stop_servers()
    assert not bad, "\n".join(bad[:20])
    total = {k: sum(c[k] for c in tally.values()) for k in ("valid", "clear error")}
    assert total["valid"] >= 20 and total["clear error"] >= 100, tally
