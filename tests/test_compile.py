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


@pytest.mark.parametrize("row", ["reduce", "library"])
@pytest.mark.parametrize("arch", ["gpt", "kraken"])
def test_one_row_forms_trace_as_named_and_equal_eager(arch, row):
    """A compiled batch-1 decode step runs its linears in the measured one-row form: the traced graph holds
    library linears exactly when the form is `library` (int8 and attention aside), and both equal eager."""
    import torch

    from krakenlm.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ARCHS[arch]).eval().set_forms("sdpa", "linear", "tanh", row)
    graphs = []

    def keep(gm, inputs):
        graphs.append(gm)
        return gm.forward

    def step(model, cache):
        return model.decode(torch.tensor([5]), torch.tensor([3]), torch.tensor([3]), cache)

    with torch.inference_mode():
        caches = [model.new_cache(1, 16) for _ in range(2)]
        for cache in caches:
            model(torch.tensor([[1, 2, 3]]), cache=cache)
        torch._dynamo.reset()
        traced = torch.compile(step, backend=keep, fullgraph=True)(model, caches[0])
        eager = step(model, caches[1])
    linears = sum(node.target is torch._C._nn.linear for gm in graphs for node in gm.graph.nodes)
    assert (linears > 0) == (row == "library"), linears
    assert (traced - eager).abs().max().item() <= 1e-4


def test_a_compiled_engine_measures_its_one_row_form(tmp_path, monkeypatch):
    """The one-row form is measured (and printed) only for an engine that compiles its decode step."""
    from krakenlm.engine import Engine, EngineOptions
    from krakenlm.model.gemm import ROW_FORMS
    from krakenlm.source import ModelSource

    monkeypatch.setenv("KRAKENLM_CACHE_DIR", str(tmp_path))
    source = ModelSource(config=ARCHS["gpt"], seed=0)
    with Engine(source, EngineOptions(device="cpu", dtype="fp32")) as eager:
        assert eager.choices.row == "reduce"  # not measured
        compiled = eager.variant(compile=True)
        assert compiled.choices.row in ROW_FORMS and f"row={compiled.choices.row}" in str(compiled.choices)
        assert compiled.generate([[1, 2, 3]], 4).tokens == eager.generate([[1, 2, 3]], 4).tokens
