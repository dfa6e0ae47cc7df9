"""Rank programs for the tensor-parallel tests (importable, so spawned ranks can run them)."""

import json
import os
import time
from pathlib import Path

import torch

from krakenlm.checkpoint import build_model
from krakenlm.config import ModelConfig
from krakenlm.generate import generate, left_pad
from krakenlm.parallel.runtime import Runtime

PROMPTS = [list(range(3, 23)), list(range(40, 53))]  # different lengths: the left-padding path too


def _compare(rt: Runtime, cfg: ModelConfig, decode_steps: int) -> dict:
    ref = build_model(config=cfg, seed=0)
    idx, valid, pos = left_pad(PROMPTS)
    with torch.inference_mode():
        c_tp, c_ref = rt.model.new_cache(2, 64), ref.new_cache(2, 64)
        a = rt.forward(idx, cache=c_tp, valid=valid, positions=pos)
        b = ref(idx, cache=c_ref, valid=valid, positions=pos)
        prefill = (a - b).abs().max().item()
        decode = 0.0
        token, next_pos = b[:, -1].argmax(-1), pos[:, -1] + 1
        for step in range(decode_steps):
            p = (next_pos + step).unsqueeze(1)
            a = rt.forward(token.unsqueeze(1), cache=c_tp, positions=p)
            b = ref(token.unsqueeze(1), cache=c_ref, positions=p)
            decode = max(decode, (a - b).abs().max().item())
            token = b[:, -1].argmax(-1)
    greedy = rt.generate(PROMPTS, 16).tokens == generate(ref, PROMPTS, 16).tokens
    return {"prefill": prefill, "decode": decode, "greedy_equal": greedy}


def equivalence(payload: dict) -> int:
    out, cases = Path(payload["out"]), payload["cases"]
    world = int(os.environ["WORLD_SIZE"])
    results = {}
    for name, cfg_dict in cases.items():
        rt = Runtime({"config": cfg_dict, "seed": 0}, world, timeout=60)
        results[name] = _compare(rt, ModelConfig.from_dict(cfg_dict), payload["decode_steps"])
        if payload.get("timeline") and rt.config.arch == "kraken":
            results[name]["timeline"] = _timeline(rt, out)
    if rt.rank == 0:
        (out / f"results-{world}.json").write_text(json.dumps(results))
    rt.barrier()
    rt.close()
    return 0


def _timeline(rt: Runtime, out: Path) -> dict:
    idx = torch.randint(0, rt.config.vocab_size, (1, 96))
    rt.forward(idx, logits_at="last")  # warm-up
    rt.comm.timeline.clear()
    rt.comm.timeline.enabled = True
    rt.forward(idx, logits_at="last")
    tl = rt.comm.timeline
    tl.enabled = False
    begins = dict(tl.layers)
    exchanges = [e for e in tl.collectives if e.name == "exchange"]
    ordered = all(e.start < begins[e.layer + 1] for e in exchanges)  # issued before the next layer starts
    tl.chrome_trace(out / f"trace-rank{rt.rank}.json", rt.rank)
    return {"exchanges": len(exchanges), "issued_before_next_layer": ordered,
            "completed": all(e.end >= e.start for e in exchanges), "hidden": tl.hidden_fraction()}


def no_comm(payload: dict) -> int:
    rt = Runtime({"config": payload["config"], "seed": 0}, int(os.environ["WORLD_SIZE"]), no_comm=True)
    idx, valid, pos = left_pad(PROMPTS)
    logits = rt.forward(idx, valid=valid, positions=pos)
    ref = build_model(config=ModelConfig.from_dict(payload["config"]), seed=0)(idx, valid=valid, positions=pos)
    if rt.rank == 0:
        Path(payload["out"]).write_text(json.dumps({"shape_ok": logits.shape == ref.shape,
                                                    "diff": (logits - ref).abs().max().item()}))
    rt.close()
    return 0


def failing(payload: dict) -> int:
    """Rank 1 dies (or stalls) at a chosen point; rank 0 must exit with a clear error."""
    rank = int(os.environ["RANK"])
    source = payload["sources"][rank] if "sources" in payload else {"config": payload["config"],
                                                                   "seed": payload.get("seeds", [0, 0])[rank]}
    rt = Runtime(source, int(os.environ["WORLD_SIZE"]) if "tp" not in payload else payload["tp"],
                 timeout=payload["timeout"])
    if rank == 1 and payload.get("when"):
        phase, count = payload["when"]
        hook = "layer_begin" if phase == "prefill" else "agree"
        original = getattr(rt.comm, hook)
        calls = {"n": 0}

        def trap(*args):
            calls["n"] += 1
            if calls["n"] == count:
                if payload["how"] == "die":
                    os._exit(3)
                time.sleep(3600)
            return original(*args)

        setattr(rt.comm, hook, trap)
    rt.generate(PROMPTS, 8)
    rt.close()
    return 0
