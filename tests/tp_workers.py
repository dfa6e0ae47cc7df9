"""Rank programs for the tensor-parallel tests (importable, so launched ranks can run them)."""

import json
import os
import time
from pathlib import Path

import torch

from krakenlm.batching.scheduler import BatchingPolicy, Request, Scheduler
from krakenlm.config import ModelConfig
from krakenlm.engine import Engine, EngineOptions
from krakenlm.generate import SamplingConfig, generate, left_pad
from krakenlm.parallel.comm import DistComm
from krakenlm.source import ModelSource, build_model

PROMPTS = [list(range(3, 23)), list(range(40, 53))]  # different lengths: the left-padding path too


def engine_for(source: dict, tp: int, timeout: float = 60, **options) -> Engine:
    return Engine(ModelSource.from_dict(source), EngineOptions(tp=tp, device="cpu", timeout=timeout, **options))


def compare(engine: Engine, cfg: ModelConfig, decode_steps: int) -> dict:
    """Max |logit difference| against the single-device model in prefill and in decode, and greedy text."""
    ref = build_model(config=cfg, seed=0)
    idx, valid, pos = left_pad(PROMPTS)
    with torch.inference_mode():
        c_tp, c_ref = engine.new_cache(2, 64), ref.new_cache(2, 64)
        a = engine.forward(idx, cache=c_tp, valid=valid, positions=pos)
        b = ref(idx, cache=c_ref, valid=valid, positions=pos)
        prefill = (a - b).abs().max().item()
        decode = 0.0
        token, next_pos = b[:, -1].argmax(-1), pos[:, -1] + 1
        slots = torch.full((2,), idx.shape[1])
        for _ in range(decode_steps):
            a = engine.decode_step(token, slots, next_pos, c_tp)
            b = ref.decode(token, slots, next_pos, c_ref)
            decode = max(decode, (a - b).abs().max().item())
            token = b.argmax(-1)
            slots, next_pos = slots + 1, next_pos + 1
    greedy = engine.generate(PROMPTS, 16).tokens == generate(ref, PROMPTS, 16).tokens
    with engine.record() as ledger, torch.inference_mode():  # a decode step's head: vocabulary slices, gathered
        engine.decode_step(token, slots, next_pos, c_tp)
    gathers = [(c.kind, c.nbytes) for c in ledger.collectives if c.site == "vocab"]
    return {"prefill": prefill, "decode": decode, "greedy_equal": greedy, "vocab_gathers": gathers}


def equivalence(payload: dict) -> int:
    out, cases = Path(payload["out"]), payload["cases"]
    world = int(os.environ["WORLD_SIZE"])
    results = {}
    for name, cfg_dict in cases.items():
        engine = engine_for({"config": cfg_dict, "seed": 0}, world, **payload.get("options", {}))
        results[name] = compare(engine, ModelConfig.from_dict(cfg_dict), payload["decode_steps"])
        if payload.get("timeline") and engine.config.arch in ("kraken", "ladder"):
            results[name]["timeline"] = _timeline(engine, out)
    if engine.rank == 0:
        (out / f"results-{world}.json").write_text(json.dumps(results))
    engine.barrier()
    engine.close()
    return 0


def _timeline(engine: Engine, out: Path) -> dict:
    idx = torch.randint(0, engine.config.vocab_size, (1, 96))
    engine.forward(idx, logits_at="last")  # warm-up
    tl = engine.comm.timeline
    tl.clear()
    tl.enabled = True
    engine.forward(idx, logits_at="last")
    tl.enabled = False
    begins = {layer: mark for layer, mark in tl.layers}
    completed = all(e.duration is not None and e.duration >= 0 for e in tl.collectives)
    if engine.config.arch == "ladder":
        # The paper's schedule: a module's sum is awaited only after the next module issued its own.
        sums = [e for e in tl.collectives if e.name == "ladder"]
        after = all(b.start <= a.wait_start for a, b in zip(sums, sums[1:], strict=False))
        return {"ladder": len(sums), "awaited_after_next_issued": after, "completed": completed,
                "hidden": tl.hidden_fraction()}
    exchanges = [e for e in tl.collectives if e.name == "exchange"]
    ordered = all(e.start < begins[e.layer + 1] for e in exchanges)  # issued before the next layer starts
    tl.chrome_trace(out / f"trace-rank{engine.rank}.json", engine.rank)
    return {"exchanges": len(exchanges), "issued_before_next_layer": ordered, "completed": completed,
            "hidden": tl.hidden_fraction()}


def no_comm(payload: dict) -> int:
    engine = engine_for({"config": payload["config"], "seed": 0}, int(os.environ["WORLD_SIZE"]), no_comm=True)
    idx, valid, pos = left_pad(PROMPTS)
    logits = engine.forward(idx, valid=valid, positions=pos)
    ref = build_model(config=ModelConfig.from_dict(payload["config"]), seed=0)(idx, valid=valid, positions=pos)
    if engine.rank == 0:
        Path(payload["out"]).write_text(json.dumps({"shape_ok": logits.shape == ref.shape,
                                                    "diff": (logits - ref).abs().max().item()}))
    engine.close()
    return 0


def failing(payload: dict) -> int:
    """Rank 1 dies (or stalls) at a chosen point; rank 0 must exit with a clear error."""
    rank = int(os.environ["RANK"])
    source = payload["sources"][rank] if "sources" in payload else {"config": payload["config"],
                                                                   "seed": payload.get("seeds", [0, 0])[rank]}
    engine = engine_for(source, payload.get("tp", int(os.environ["WORLD_SIZE"])), payload["timeout"])
    if rank == 1 and payload.get("when"):
        phase, count = payload["when"]
        hook = "layer_begin" if phase == "prefill" else "agree"
        original = getattr(engine.comm, hook)
        calls = {"n": 0}

        def trap(*args):
            calls["n"] += 1
            if calls["n"] == count:
                if payload["how"] == "die":
                    os._exit(3)
                time.sleep(3600)
            return original(*args)

        setattr(engine.comm, hook, trap)
    engine.generate(PROMPTS, 8)
    engine.close()
    return 0


def capture_decode(engine: Engine, backend: str):
    """The engine's decode step (functional collectives) compiled with fullgraph=True: a graph break fails."""
    model, comm = engine.decode_model
    comm = comm.variant(functional=True) if isinstance(comm, DistComm) else comm

    def step(tokens, slots, positions, cache):
        return model.decode(tokens, slots, positions, cache, comm=comm)

    return torch.compile(step, fullgraph=True, dynamic=False, backend=backend)


def compiled_decode(payload: dict) -> int:
    """Per case: fullgraph capture of the decode step equals eager; the engine's compiled generation
    (inductor) gives the eager tokens, token for token."""
    world = int(os.environ["WORLD_SIZE"])
    results = {}
    for name, case in payload["cases"].items():
        engine = engine_for({"config": case["config"], "seed": 0}, world, timeout=300, layout=case.get("layout"))
        eager = engine.generate(PROMPTS, 12).tokens
        with torch.inference_mode():
            cache_a, cache_b = engine.new_cache(2, 40), engine.new_cache(2, 40)
            idx, valid, pos = left_pad(PROMPTS)
            engine.forward(idx, cache=cache_a, valid=valid, positions=pos)
            engine.forward(idx, cache=cache_b, valid=valid, positions=pos)
            token, slots, next_pos = torch.tensor([7, 9]), torch.full((2,), idx.shape[1]), pos[:, -1] + 1
            captured = capture_decode(engine, case["backend"])(token, slots, next_pos, cache_a)
            plain = engine.decode_step(token, slots, next_pos, cache_b)
        results[name] = {"capture_diff": (captured - plain).abs().max().item()}
        if case.get("inductor"):
            results[name]["compiled_equal"] = engine.variant(compile=True).generate(PROMPTS, 12).tokens == eager
    if int(os.environ["RANK"]) == 0:
        Path(payload["out"]).write_text(json.dumps(results))


def staggered(engine: Engine, batch: list[list[int]], steps: int, sampling: list[SamplingConfig] | None = None,
              rows: list[int] | None = None) -> list[list[int]]:
    """Request i joins at step i into ``rows[i]``; each runs ``steps`` tokens; rows leave when done."""
    rows = rows or list(range(len(batch)))
    sampling = sampling or [SamplingConfig()] * len(batch)
    out: list[list[int]] = [[] for _ in batch]
    running: list[int] = []
    step = 0
    while step < len(batch) or running:
        decode = [i for i in running if len(out[i]) < steps]
        if step < len(batch):  # the scheduler's order: prefill newcomers, then decode the earlier ones
            out[step].append(engine.prefill_row(rows[step], batch[step], sampling[step]))
        if decode:
            for i, token in zip(decode, engine.decode_rows([rows[i] for i in decode]), strict=True):
                out[i].append(token)
        if step < len(batch):
            running.append(step)
        running = [i for i in running if len(out[i]) < steps]
        step += 1
    return out


def scheduled(engine: Engine, batch: list[list[int]], steps: int, policy: BatchingPolicy,
              sampling: list[SamplingConfig] | None = None) -> list[list[int]]:
    """Every prompt submitted at once and served as the server's engine loop serves them: each step's
    prompt chunks in one prefill_rows call (batched, chunked), then one decode step of the others."""
    sampling = sampling or [SamplingConfig()] * len(batch)
    sched = Scheduler(policy, engine.config.block_size)
    for i, prompt in enumerate(batch):
        sched.submit(Request(i, len(prompt), steps))
    out: list[list[int]] = [[] for _ in batch]
    while not sched.idle:
        plan = sched.plan()
        if plan.prefill:
            firsts = engine.prefill_rows([c.row for c in plan.prefill],
                                         [batch[c.request.id][c.start:c.stop] for c in plan.prefill],
                                         [sampling[c.request.id] for c in plan.prefill],
                                         starts=[c.start for c in plan.prefill], last=[c.last for c in plan.prefill])
            for chunk, token in zip(plan.prefill, firsts, strict=True):
                assert (token is None) != chunk.last
                if token is not None:
                    out[chunk.request.id].append(token)
                    sched.token(chunk.request.id)
        if plan.decode:
            for (request, _), token in zip(plan.decode, engine.decode_rows([row for _, row in plan.decode]),
                                           strict=True):
                out[request.id].append(token)
                sched.token(request.id)
    return out


def serving_rows(payload: dict) -> int:
    """Every case's prompts served through the row operations on this world (greedy, staggered)."""
    world = int(os.environ["WORLD_SIZE"])
    results = {}
    for name, cfg in payload["cases"].items():
        engine = engine_for({"config": cfg, "seed": 0}, world)
        engine.open_serving(8)
        results[name] = staggered(engine, payload["prompts"], 16)
        engine.open_serving(4)  # batched and chunked prefill: 8 requests in 4 rows, 16 prompt tokens a step
        results[name + " chunked"] = scheduled(engine, payload["prompts"], 16,
                                               BatchingPolicy(max_batch=4, prefill_chunk=16))
    if engine.rank == 0:
        (Path(payload["out"]) / "serving.json").write_text(json.dumps(results))
    engine.barrier()
    engine.close()
    return 0


def logits(payload: dict) -> int:
    """Full-forward logits of a model source on this TP degree; rank 0 saves them."""
    engine = engine_for(payload["source"], int(os.environ["WORLD_SIZE"]))
    out = engine.forward(torch.tensor(payload["idx"]))
    if engine.rank == 0:
        torch.save(out, payload["out"])
    engine.close()
    return 0


def gather(payload: dict) -> int:
    """Join through the launcher's rendezvous and gather one JSON value per rank."""
    import torch.distributed as dist

    from krakenlm.parallel.group import gather_json, init_distributed

    init_distributed(30, torch.device("cpu"))
    rank = dist.get_rank()
    values = gather_json({"rank": rank, "text": payload["text"] * (rank + 1), "nested": [[rank], None, 1.5]})
    if rank == 0:
        Path(payload["out"]).write_text(json.dumps(values))
    dist.destroy_process_group()
    return 0


def sleeper(payload: dict) -> int:
    """A rank that only waits (the launcher's own behaviour under test)."""
    time.sleep(payload["seconds"])
    return 0
