"""Every layout combination the test suite samples, checked in full (minutes on 2 cores).

tests/test_layouts.py runs one 4-rank case per code path to keep the suite fast; this runs the same
test with the whole grid (every shape x 2D mode at 4 ranks, MQA's wg-x, GQA's 1D batch-sharded):
equal to one device within 1e-4 over prefill + 32 decode steps, identical greedy text, and ledgers
equal to the cost model. Run from the repository root:

    python benchmarks/verify_layouts.py
"""

import os
import sys

import pytest

if __name__ == "__main__":
    os.environ["KRAKENLM_LAYOUTS_FULL"] = "1"
    sys.exit(pytest.main(["-q", "tests/test_layouts.py::test_every_layout_equals_one_device_and_the_cost_model"]))
