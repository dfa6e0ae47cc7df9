"""Rank programs for the layout tests (importable, so launched ranks can run them)."""

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from krakenlm.config import ModelConfig
from krakenlm.engine import Engine, EngineOptions
from krakenlm.errors import KrakenError
from krakenlm.generate import left_pad
from krakenlm.source import ModelSource

# Four prompts of different lengths (left padding), divisible over 1, 2 and 4 ranks (weight-gathered).
PROMPTS = [list(range(3, 23)), list(range(40, 53)), list(range(60, 80)), list(range(100, 109))]
CACHE_LEN = 64


def _engine(case: dict, tp: int) -> Engine:
    options = EngineOptions(tp=tp, device="cpu", timeout=60, layout=case.get("layout"), quantize=case.get("quantize"),
                            dtype=case.get("dtype", "fp32"))
    return Engine(ModelSource(config=ModelConfig.from_dict(case["config"]), seed=0), options)


def _reference(case: dict) -> Engine:
    """The same model on one device (int8 cases: the one-device int8 model)."""
    return Engine(ModelSource(config=ModelConfig.from_dict(case["config"]), seed=0),
                  EngineOptions(device="cpu", quantize=case.get("quantize"), dtype=case.get("dtype", "fp32")),
                  local=True)


def _ledger_summary(ledger) -> dict:
    return {"volume": ledger.layer_volume(), "stats": ledger.volume("stats"), "weight": ledger.volume("weight"),
            "counts": dict(ledger.counts()), "layer0": ledger.per_layer(0), "kv": ledger.kv_bytes}


def compare(engine: Engine, ref: Engine, steps: int, prompts: list[list[int]]) -> dict:
    """Max |logit difference| in prefill and over ``steps`` decode steps, greedy tokens, and the ledgers."""
    idx, valid, pos = left_pad(prompts)
    batch = len(prompts)
    with torch.inference_mode():
        with engine.record() as pre_ledger:
            cache = engine.new_cache(batch, CACHE_LEN)
            a = engine.forward(idx, cache=cache, valid=valid, positions=pos)
        ref_cache = ref.new_cache(batch, CACHE_LEN)
        b = ref.forward(idx, cache=ref_cache, valid=valid, positions=pos)
        prefill, decode = (a - b).abs().max().item(), 0.0
        token, next_pos = b[:, -1].argmax(-1), pos[:, -1] + 1
        slots = torch.full((batch,), idx.shape[1])
        for step in range(steps):
            with engine.record() as dec_ledger:
                a = engine.decode_step(token, slots, next_pos, cache)
            if step == 0:
                decode_summary = _ledger_summary(dec_ledger)
            b = ref.decode_step(token, slots, next_pos, ref_cache)
            decode = max(decode, (a - b).abs().max().item())
            token, slots, next_pos = b.argmax(-1), slots + 1, next_pos + 1
    greedy = engine.generate(prompts, 12).tokens == ref.generate(prompts, 12).tokens
    return {"prefill": prefill, "decode": decode, "greedy_equal": greedy, "ledger_prefill": _ledger_summary(pre_ledger),
            "ledger_decode": decode_summary, "weights": pre_ledger.weights_bytes,
            "replicated": pre_ledger.replicated_bytes, "width": idx.shape[1], "batch": batch}


def equivalence(payload: dict) -> int:
    """Per case: the layout on WORLD_SIZE ranks against one device; every rank's ledger goes to rank 0."""
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    results, engines = {}, []
    for name, case in payload["cases"].items():
        engine = _engine(case, world)
        engines.append(engine)  # the first one owns the process group: closed last
        mine = compare(engine, _reference(case), payload["decode_steps"], PROMPTS[:case.get("prompts", 4)])
        everyone = [mine]
        if world > 1:
            everyone = [None] * world
            dist.all_gather_object(everyone, mine)
        results[name] = {"ranks": everyone, "layout": str(engine.layout)}
    if rank == 0:
        Path(payload["out"]).write_text(json.dumps(results))
    engines[0].barrier()
    engines[0].close()
    return 0


def refused(payload: dict) -> int:
    """Start an engine that must be refused; rank 0 writes the error message."""
    try:
        _engine(payload["case"], int(os.environ["WORLD_SIZE"]))
    except KrakenError as err:
        if int(os.environ["RANK"]) == 0:
            Path(payload["out"]).write_text(str(err))
        return 0
    return 1


def kv_context(payload: dict) -> int:
    """Per attention mode: KV bytes per token of context measured on this rank's cache, the longest context
    within ``budget`` bytes, and a prefill of that many tokens per sequence to show it runs there."""
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    case, batch, out = payload["case"], payload["batch"], {}
    engines = []
    for mode in ("heads", "batch"):
        engine = _engine(case | {"layout": f"1d-ws/attn-{mode}"}, world)
        engines.append(engine)
        small, large = engine.new_cache(batch, 64).nbytes(), engine.new_cache(batch, 128).nbytes()
        per_token = (large - small) // 64
        context = payload["budget"] // per_token
        sizes = [engine.new_cache(batch, length).nbytes() for length in (context, context + 1)]
        fits = sizes[0] <= payload["budget"] < sizes[1]
        idx = torch.randint(0, 200, (batch, context), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            logits = engine.forward(idx, cache=engine.new_cache(batch, context), logits_at="last")
        out[mode] = {"per_token": per_token, "intercept": small - 64 * per_token, "context": context, "fits": fits,
                     "finite": bool(torch.isfinite(logits).all())}
    everyone = [None] * world
    dist.all_gather_object(everyone, out)
    if rank == 0:
        Path(payload["out"]).write_text(json.dumps(everyone))
    engines[0].close()
    return 0
