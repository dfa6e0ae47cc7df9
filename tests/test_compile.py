"""The decode step compiles without graph breaks (fullgraph=True) for every architecture and for
partitioning layouts, on one device and on 2 ranks (functional collectives), and compiled generation
equals eager token for token.

Capturing is checked with the aot_eager backend (dynamo + AOT autograd: every graph break or
untraceable collective fails there); code generation with inductor, the engine's backend, is checked
on representative cases because it takes tens of seconds per model on 2 cores."""

import json

import pytest

from krakenlm.parallel.launch import run_ranks
from tests.conftest import tiny

ARCHS = {"gpt": tiny("gpt", n_layer=2), "parallel": tiny("parallel", n_layer=2), "kraken": tiny("kraken", n_layer=2),
         "ladder": tiny("ladder", n_layer=2)}
# Pope's layouts: their modules' collectives are functional while traced (krakenlm.parallel.layout_comm).
LAYOUTS = {"gpt 2d-ws/attn-batch": "2d-ws/attn-batch", "gpt wg-xyz/attn-batch,1d-ws/attn-batch":
           "wg-xyz/attn-batch,1d-ws/attn-batch"}


@pytest.mark.parametrize("world", [1, 2])
def test_decode_step_compiles_fullgraph_and_equals_eager(world, tmp_path):
    cases = {arch: {"config": cfg.to_dict(), "backend": "aot_eager", "inductor": arch == "kraken"}
             for arch, cfg in ARCHS.items()}
    cases |= {name: {"config": ARCHS["gpt"].to_dict(), "backend": "aot_eager", "layout": layout}
              for name, layout in LAYOUTS.items()}
    payload = {"cases": cases, "out": str(tmp_path / "r.json")}
    assert run_ranks("tests.tp_workers:compiled_decode", world, payload, grace=60) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert results.keys() == cases.keys()
    for arch, r in results.items():
        assert r["capture_diff"] <= 1e-5, (arch, r)
    assert results["kraken"]["compiled_equal"]
