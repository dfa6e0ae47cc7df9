"""Rank programs for the system-overlap tests (importable, so launched ranks can run them)."""

import json
import os
from pathlib import Path

import torch.distributed as dist

from krakenlm.config import ModelConfig
from krakenlm.engine import Engine, EngineOptions
from krakenlm.source import ModelSource
from tests.layout_workers import PROMPTS, _reference, compare
from tests.tp_workers import staggered


def equivalence(payload: dict) -> int:
    """Per case: standard TP with the case's overlap mode on WORLD_SIZE ranks against one device."""
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    results, engines = {}, []
    for name, case in payload["cases"].items():
        options = EngineOptions(tp=world, device="cpu", timeout=60, tp_overlap=case["overlap"],
                                compile=case.get("compile", False), quantize=case.get("quantize"))
        engine = Engine(ModelSource(config=ModelConfig.from_dict(case["config"]), seed=0), options)
        engines.append(engine)  # the first one owns the process group: closed last
        mine = compare(engine, _reference(case), payload["decode_steps"], PROMPTS[:case.get("prompts", 4)])
        result = engine.generate(PROMPTS[:2], 4)
        mine["hidden"] = result.exchange_hidden
        everyone = [mine]
        if world > 1:
            everyone = [None] * world
            dist.all_gather_object(everyone, mine)
        results[name] = everyone
    if rank == 0:
        Path(payload["out"]).write_text(json.dumps(results))
    engines[0].barrier()
    engines[0].close()
    return 0


def serving_rows(payload: dict) -> int:
    """The server's row operations (staggered prefills and batched decode steps) under each overlap mode."""
    world, results, engines = int(os.environ["WORLD_SIZE"]), {}, []
    for mode in payload["modes"]:
        options = EngineOptions(tp=world, device="cpu", timeout=60, tp_overlap=mode)
        engine = Engine(ModelSource(config=ModelConfig.from_dict(payload["config"]), seed=0), options)
        engines.append(engine)  # the first one owns the process group: closed last
        engine.open_serving(4)
        results[mode] = staggered(engine, payload["prompts"], 8)
    if int(os.environ["RANK"]) == 0:
        Path(payload["out"]).write_text(json.dumps(results))
    engines[0].barrier()
    engines[0].close()
    return 0
