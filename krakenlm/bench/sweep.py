"""The benchmark sweep: architectures x shapes x prompt lengths x batch x dtype x TP degree x link.

The coordinator (``run_sweep``) starts one subprocess per rank for every (link, TP degree), inside
per-rank network namespaces for shaped links, and merges what rank 0 reports. Each rank
(``run_rank``) measures one cell at a time: every variant of one shape (gpt, parallel, kraken, ladder,
their no-comm ceilings, Kraken and ladder with blocking AllReduces, the DTensor peer, single-device
models) is timed
once per round, round-robin, with a barrier before each forward; a sample is the max over ranks.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from krakenlm.bench.breakdown import MarkedComm, profile_forward
from krakenlm.bench.netns import Links
from krakenlm.bench.timing import RoundLog, Stats, paired_ratio, wait_for_idle
from krakenlm.config import ModelConfig, size_kraken
from krakenlm.costmodel.overlap import parse_overlap
from krakenlm.cpuload import process_cpu_seconds, system_busy_seconds
from krakenlm.dtypes import parse_dtype
from krakenlm.engine import Engine, EngineOptions
from krakenlm.errors import ConfigError, DistributedError
from krakenlm.model.layers import KVCache
from krakenlm.parallel.comm import DistComm
from krakenlm.parallel.group import gather_json, init_distributed, resolve_device
from krakenlm.parallel.launch import run_ranks
from krakenlm.parallel.layouts import Layout, check_layout
from krakenlm.presets import PRESETS
from krakenlm.source import ModelSource

# Paired ratios reported per cell: (name, numerator variant, denominator variant).
RATIOS = [("kraken/gpt", "kraken", "gpt"), ("kraken/parallel", "kraken", "parallel"),
          ("parallel/gpt", "parallel", "gpt"),
          ("kraken/no-comm", "kraken", "kraken/no-comm"), ("kraken/blocking", "kraken", "kraken/blocking"),
          ("gpt/no-comm", "gpt", "gpt/no-comm"), ("parallel/no-comm", "parallel", "parallel/no-comm"),
          ("kraken-nc/gpt-nc", "kraken/no-comm", "gpt/no-comm"),
          ("parallel-nc/gpt-nc", "parallel/no-comm", "gpt/no-comm"),
          ("gpt/dtensor", "gpt", "gpt/dtensor"), ("kraken-single/gpt-single", "kraken/single", "gpt/single"),
          ("kraken-compiled/gpt-compiled", "kraken/compiled", "gpt/compiled"),
          ("gpt-compiled/gpt", "gpt/compiled", "gpt"), ("kraken-compiled/kraken", "kraken/compiled", "kraken"),
          ("ladder/gpt", "ladder", "gpt"), ("ladder/kraken", "ladder", "kraken"),
          ("ladder/no-comm", "ladder", "ladder/no-comm"), ("ladder/blocking", "ladder", "ladder/blocking")]
OVERLAPPING = ("kraken", "ladder")  # architectures whose AllReduces run during compute (a blocking variant each)


def ratio_pairs(systems: dict[str, str]) -> list[tuple[str, str, str]]:
    """(name, numerator, denominator) of every paired ratio of a cell: RATIOS and, per system overlap variant
    (``systems``: label -> its blocking model's arch), the variant over that model and Kraken over it."""
    return (RATIOS + [(f"{arch}-{label.partition('/')[2]}/{arch}", label, arch) for label, arch in systems.items()]
            + [(f"kraken/{arch}-{label.partition('/')[2]}", "kraken", label) for label, arch in systems.items()])


@dataclass(frozen=True)
class Options:
    """The grid and the timing discipline (JSON-serialisable: it travels to every rank)."""

    shapes: list[str] = field(default_factory=lambda: ["124m", "1.3b:2"])
    prompts: list[int] = field(default_factory=lambda: [128, 512, 2048])
    batches: list[int] = field(default_factory=lambda: [1, 8])
    dtypes: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    tps: list[int] = field(default_factory=lambda: [2])
    links: list[float | None] = field(default_factory=lambda: [None, 0.5, 1.0, 2.5, 10.0])  # None = loopback
    rounds: int = 7
    max_rounds: int = 21
    warmup: int = 1
    decode_steps: int = 16
    peer: bool = True
    single: bool = True
    breakdown: bool = True
    roofline: bool = True  # probe this machine's GEMM peak at each model's shapes; report MFU per category
    attention: str = "auto"  # causal attention kernel of every model (auto: measured fastest here)
    idle_cores: float = 0.15  # other processes may use this many cores before a round starts
    max_other_cores: float = 0.25  # ... and on average during a round before it is dropped
    idle_wait_s: float = 30.0
    timeout_s: float = 900.0
    seed: int = 0
    # arch -> checkpoint directory: time these trained models (shape "checkpoints") instead of random weights
    checkpoints: dict[str, str] = field(default_factory=dict)
    pad_heads: int | None = None  # zero-pad every model's heads to this multiple (exact; better kernel shapes)
    device: str = "auto"  # cpu | cuda | auto: where every rank runs
    compile: bool = False  # also time compiled decode steps (variants "<arch>/compiled")
    layouts: list[str] = field(default_factory=list)  # partitioning layouts (variants "<arch>/<layout>", gpt/parallel)
    int8: bool = False  # also time int8 weights (variants "gpt/int8", "gpt/single-int8")
    overlaps: list[str] = field(default_factory=list)  # system overlap modes (variants "<arch>/<mode>", gpt/parallel)


# Shapes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    arch: str
    config: ModelConfig
    preset: str | None  # set when config is exactly a preset (calibration records name it)
    full_layers: int
    checkpoint: str | None = None  # weights to load; random weights (seeded) when None


def _tiny(arch: str, tp: int) -> ModelConfig:
    base = ModelConfig(name=f"tiny-{arch}", arch="gpt" if arch == "kraken" else arch, n_layer=2, n_embd=64,
                       n_head=4, vocab_size=256, block_size=4096, bias=arch == "gpt")
    if arch != "kraken":
        return base
    sized = size_kraken(12 * 64 * 64, 2, 4, tp, per_layer=True, vocab_size=256, block_size=4096)
    return base.replace(arch="kraken", n_sub=tp, n_embd=sized.n_embd, n_head=sized.n_head, bias=False)


def resolve_shape(spec: str, tp: int, checkpoints: dict[str, str] | None = None) -> dict[str, Model]:
    """gpt, parallel, Kraken (degree = tp) and ladder models of one shape; ``name:k`` truncates to k layers.

    Shapes: tiny (tests), 124m (GPT-2 124M vs the paper's equal-parameter Kraken), the latency
    study's 1.3b ... 175b (equal matmul parameters per layer), and "checkpoints": the trained models
    given as {arch: directory} (at least a gpt or a Kraken; a Kraken's degree must equal tp).
    """
    name, _, layers = spec.partition(":")
    if name == "checkpoints":
        return _checkpoint_models(checkpoints or {}, tp)
    if name == "tiny":
        configs = {arch: (_tiny(arch, tp), None) for arch in ("gpt", "parallel", "kraken", "ladder")}
    elif name == "124m":
        kraken = f"kraken-125m-{tp}way"
        if kraken not in PRESETS:
            raise ConfigError(f"bench: no equal-parameter Kraken 124M for tp={tp} (have 2, 4, 6)")
        gpt = PRESETS["gpt2-124m"]
        configs = {"gpt": (gpt, "gpt2-124m"), "parallel": (gpt.replace(arch="parallel", name="parallel-124m"), None),
                   "kraken": (PRESETS[kraken], kraken), "ladder": (PRESETS["ladder-124m"], "ladder-124m")}
    elif f"gpt-{name}" in PRESETS:
        gpt = PRESETS[f"gpt-{name}"]
        kraken_name = f"kraken{tp}-{name}"
        if kraken_name in PRESETS:
            kraken = PRESETS[kraken_name]
        else:
            sized = size_kraken(12 * gpt.n_embd ** 2, gpt.n_layer, gpt.n_head, tp, per_layer=True)
            kraken = gpt.replace(arch="kraken", n_sub=tp, n_embd=sized.n_embd, n_head=sized.n_head, name=kraken_name)
        configs = {"gpt": (gpt, gpt.name), "parallel": (PRESETS[f"parallel-{name}"], f"parallel-{name}"),
                   "kraken": (kraken, kraken.name if kraken_name in PRESETS else None),
                   "ladder": (PRESETS[f"ladder-{name}"], f"ladder-{name}")}
    else:
        raise ConfigError(f"bench: unknown shape {name!r}; use tiny, 124m or one of "
                          + ", ".join(n[4:] for n in PRESETS if n.startswith("gpt-")))
    out = {}
    for arch, (cfg, preset) in configs.items():
        full = cfg.n_layer
        if layers:
            if not layers.isdigit() or not 0 < int(layers) <= full:
                raise ConfigError(f"bench: shape {spec!r}: layers must be 1..{full}")
            if int(layers) < full:
                cfg, preset = cfg.replace(n_layer=int(layers), name=f"{cfg.name}-L{layers}"), None
        out[arch] = Model(arch, cfg, preset, full)
    return out


def _checkpoint_models(checkpoints: dict[str, str], tp: int) -> dict[str, Model]:
    from krakenlm.checkpoint import load_config

    if not checkpoints or set(checkpoints) - {"gpt", "parallel", "kraken", "ladder"}:
        raise ConfigError(f"bench: checkpoints must map gpt / parallel / kraken / ladder to directories, "
                          f"got {checkpoints}")
    out = {}
    for arch, path in checkpoints.items():
        cfg = load_config(path)
        if cfg.arch != arch:
            raise ConfigError(f"bench: {path} holds a {cfg.arch} model, given as {arch}")
        if arch == "kraken" and cfg.n_sub != tp:
            raise ConfigError(f"bench: {path} is a Kraken {cfg.n_sub}-way model; it needs tp={cfg.n_sub}, not {tp}")
        out[arch] = Model(arch, cfg, None, cfg.n_layer, checkpoint=str(path))
    return out


# One rank ---------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One timed configuration: an engine (or the DTensor peer) and the phases it is timed in.
    ``engine`` None: this rank sits the variant out (single-device models run on rank 0 only)."""

    label: str
    model: Model
    engine: Engine | None
    tp: int
    peer: torch.nn.Module | None = None
    phases: tuple[str, ...] = ("prefill", "decode")
    cache: KVCache | None = None  # for decode jobs; replaced every cell
    layout: str | None = None
    quantize: str | None = None
    overlap: str | None = None  # a system overlap mode of standard TP (chunked:K, collective-matmul)

    def runs(self, batch: int) -> bool:
        """A weight-gathered prefill shards the batch: it sits out batches the ranks do not divide."""
        return self.engine is None or not (self.engine.layout.prefill.gathered and batch % self.engine.world)

    @property
    def active(self) -> bool:
        return self.engine is not None or self.peer is not None

    def prefill(self, idx: Tensor) -> Tensor:
        """Logits at the last position of a full forward (no cache): time to first token."""
        if self.peer is not None:
            with torch.no_grad():
                return self.peer(idx)
        assert self.engine is not None
        return self.engine.forward(idx, logits_at="last")

    def decode(self, tokens: Tensor, prompt: int, steps: int) -> None:
        """``steps`` decode steps after a ``prompt``-token prefix (the cache's contents do not matter for
        timing, only its length)."""
        assert self.engine is not None and self.cache is not None
        slots = torch.full((tokens.shape[0],), prompt, dtype=torch.long, device=self.engine.device)
        positions = slots.clone()
        step = self.engine.decode_step
        with torch.inference_mode():
            for _ in range(steps):
                step(tokens, slots, positions, self.cache)
                slots += 1
                positions += 1

    def synchronize(self) -> None:
        if self.engine is not None:
            self.engine.synchronize()


def _options(opts: Options, dtype: str, tp: int, **changes: Any) -> EngineOptions:
    return EngineOptions(device=opts.device, dtype=dtype, tp=tp, threads=1, timeout=opts.timeout_s,
                         pad_heads=opts.pad_heads, attention=opts.attention, **changes)


def _source(model: Model, seed: int) -> ModelSource:
    return ModelSource(checkpoint=model.checkpoint) if model.checkpoint else ModelSource(config=model.config, seed=seed)


def _build_variants(models: dict[str, Model], dtype: str, opts: Options, world: int, rank: int) -> list[Variant]:
    variants = []
    for arch, model in models.items():
        engine = Engine(_source(model, opts.seed), _options(opts, dtype, world))
        dtype = engine.options.dtype  # 'auto' is resolved by the first model, once, for every variant
        variants.append(Variant(arch, model, engine, world))
        variants.append(Variant(f"{arch}/no-comm", model, engine.variant(no_comm=True), world))
        if arch in OVERLAPPING:
            variants.append(Variant(f"{arch}/blocking", model, engine.variant(overlap=False), world))
        if opts.compile:
            variants.append(Variant(f"{arch}/compiled", model, engine.variant(compile=True), world, phases=("decode",)))
    variants += _layout_variants(models, dtype, opts, world, rank)
    gpt = models.get("gpt")
    if opts.peer and gpt is not None and gpt.checkpoint is None:  # the peer builds its own seeded weights
        from krakenlm.bench.peer import build_peer

        peer = build_peer(gpt.config, opts.seed, parse_dtype(dtype), world, variants[0].engine.device)
        variants.append(Variant("gpt/dtensor", gpt, None, world, peer=peer, phases=("prefill",)))
    if opts.single:
        for arch in ("gpt", "kraken"):
            if arch in models:
                engine = (Engine(_source(models[arch], opts.seed), _options(opts, dtype, 1), local=True)
                          if rank == 0 else None)
                variants.append(Variant(f"{arch}/single", models[arch], engine, 1))
    return variants


def _layout_variants(models: dict[str, Model], dtype: str, opts: Options, world: int, rank: int) -> list[Variant]:
    """Pope's layouts and the system overlap modes (gpt and parallel blocks) and int8 weights (gpt, also on
    one device)."""
    out = []
    for arch in ("gpt", "parallel"):
        if arch in models:
            for lay in opts.layouts:
                engine = Engine(_source(models[arch], opts.seed), _options(opts, dtype, world, layout=lay))
                out.append(Variant(f"{arch}/{lay}", models[arch], engine, world, layout=lay))
            for mode in opts.overlaps:
                engine = Engine(_source(models[arch], opts.seed), _options(opts, dtype, world, tp_overlap=mode))
                out.append(Variant(f"{arch}/{mode}", models[arch], engine, world, overlap=mode))
    if opts.int8 and "gpt" in models:
        engine = Engine(_source(models["gpt"], opts.seed), _options(opts, dtype, world, quantize="int8"))
        out.append(Variant("gpt/int8", models["gpt"], engine, world, quantize="int8"))
        single = (Engine(_source(models["gpt"], opts.seed), _options(opts, dtype, 1, quantize="int8"), local=True)
                  if rank == 0 else None)
        out.append(Variant("gpt/single-int8", models["gpt"], single, 1, quantize="int8"))
    return out


@dataclass(frozen=True)
class Job:
    variant: Variant
    phase: str  # "prefill" | "decode"


def _run_job(job: Job, idx: Tensor, tok: Tensor, steps: int) -> float:
    """Seconds of one prefill, or of one decode step (mean over ``steps``), on this rank."""
    v = job.variant
    dist.barrier()
    start = time.perf_counter()
    if v.active:
        if job.phase == "prefill":
            v.prefill(idx)
        else:
            v.decode(tok, idx.shape[1], steps)
        v.synchronize()
    return (time.perf_counter() - start) / (steps if job.phase == "decode" else 1)


def _jobs(variants: list[Variant], batch: int, prompt: int, steps: int, idx: Tensor) -> list[Job]:
    """Prefill and decode jobs of every variant. The variants of one model share one KV cache holding
    the prompt."""
    variants = [v for v in variants if v.runs(batch)]
    jobs = [Job(v, "prefill") for v in variants if "prefill" in v.phases]
    caches: dict[int, KVCache] = {}
    for v in variants:
        if "decode" not in v.phases or steps == 0:
            continue
        if v.engine is not None:
            key = id(v.engine.model)
            if key not in caches:
                caches[key] = v.engine.new_cache(batch, prompt + steps)
                v.engine.forward(idx, cache=caches[key], logits_at="last")
            v.cache = caches[key]
        jobs.append(Job(v, "decode"))
    return jobs


def measure_cell(variants: list[Variant], batch: int, prompt: int, opts: Options, pids: list[int],
                 vocab: int) -> dict[str, Any] | None:
    """Interleaved rounds over every (variant, phase) of one cell; rank 0 returns the results."""
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(opts.seed)
    device = next(v.engine.device for v in variants if v.engine is not None)
    idx = torch.randint(0, vocab, (batch, prompt), generator=gen).to(device)
    tok = torch.randint(0, vocab, (batch,), generator=gen).to(device)
    jobs = _jobs(variants, batch, prompt, opts.decode_steps, idx)
    for _ in range(opts.warmup):
        for job in jobs:
            _run_job(job, idx, tok, opts.decode_steps)
    samples: list[list[float]] = [[] for _ in jobs]
    log, r = RoundLog(), 0
    while log.n_kept < opts.rounds and r < max(opts.rounds, opts.max_rounds):
        waited = wait_for_idle(pids, opts.idle_cores, opts.idle_wait_s)[0] if rank == 0 else 0.0
        dist.barrier()
        sys0, own0, t0 = system_busy_seconds(), process_cpu_seconds(), time.perf_counter()
        elapsed = [0.0] * len(jobs)
        for k in range(len(jobs)):  # rotate the order so no variant always runs first
            i = (k + r) % len(jobs)
            elapsed[i] = _run_job(jobs[i], idx, tok, opts.decode_steps)
        wall, own = time.perf_counter() - t0, process_cpu_seconds() - own0
        busy = system_busy_seconds() - sys0
        times = torch.tensor(elapsed, dtype=torch.float64)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        own_all = torch.tensor([own], dtype=torch.float64)
        dist.all_reduce(own_all)
        keep = torch.tensor([1.0 if log.add(max(0.0, busy - own_all.item()), wall, waited, opts.max_other_cores)
                             else 0.0])
        dist.broadcast(keep, src=0)  # rank 0's view of the machine decides for everyone
        log.kept[-1] = bool(keep.item())
        for i, t in enumerate(times.tolist()):
            samples[i].append(t)
        r += 1
    extras = _extras(variants, idx, opts)
    roofs = _rooflines(variants, batch, prompt, opts) if opts.roofline else {}
    if rank != 0:
        return None
    # Keep clean rounds only; if none was clean, report them all, flagged, rather than nothing.
    mask = log.kept if log.n_kept else [True] * len(log.kept)
    samples = [[t for t, k in zip(s, mask, strict=True) if k] for s in samples]
    result = _summarise(jobs, samples, log, extras) | {"all_rounds_contaminated": log.n_kept == 0}
    return result | _efficiency(roofs, result)


def _rooflines(variants: list[Variant], batch: int, prompt: int, opts: Options) -> dict[str, Any]:
    """Rank 0 measures (or reads from its cache) the GEMM throughput at each architecture's per-rank
    shapes while the other ranks wait: the ceiling every prefill of the cell is held to."""
    from krakenlm.dtypes import dtype_name
    from krakenlm.roofline import forward_shape, probe

    out: dict[str, Any] = {}
    if dist.get_rank() == 0:
        for v in variants:
            if v.label in ("gpt", "parallel", "kraken") and v.engine is not None:
                e = v.engine
                shape = forward_shape(e.config, e.shard, batch=batch, prompt=prompt, pad_heads=opts.pad_heads,
                                      itemsize=e.dtype.itemsize)
                out[v.label] = (shape, probe(shape, dtype_name(e.dtype), e.device))
    dist.barrier()
    return out


def _efficiency(roofs: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Each architecture's prefill against its roofline: MFU of the no-comm ceiling and of the real run,
    per-category rates from the breakdown, and the FLOP ratios the compute targets are stated in."""
    from krakenlm.roofline import efficiency

    out: dict[str, Any] = {}
    for label, (shape, roof) in roofs.items():
        variants = result["variants"]
        ceiling = variants.get(f"{label}/no-comm", {}).get("prefill", {}).get("median")
        entry = efficiency(shape, roof, ceiling, result.get("breakdown", {}).get(label))
        entry["mfu_with_comm"] = sum(entry["flops"].values()) / variants[label]["prefill"]["median"] / (
            roof.gemm_flops_per_s)
        out[label] = entry | {"roofline": roof.to_dict()}
    flops = {label: sum(e["flops"].values()) for label, e in out.items()}
    ratios = {f"{a}/gpt": flops[a] / flops["gpt"] for a in ("kraken", "parallel") if a in flops and "gpt" in flops}
    return {"roofline": out, "flop_ratio": ratios} if out else {}


def _extras(variants: list[Variant], idx: Tensor, opts: Options) -> dict[str, Any]:
    """Untimed runs after the rounds: the exchange timeline, the per-category breakdown, the peer check."""
    by_label = {v.label: v for v in variants}
    out: dict[str, Any] = {}
    for label in [*OVERLAPPING, *(v.label for v in variants if v.overlap)]:
        v = by_label.get(label)
        if v is not None and v.engine is not None and isinstance(v.engine.comm, DistComm):
            timeline = v.engine.comm.timeline
            timeline.clear()
            timeline.enabled = True
            v.prefill(idx)
            timeline.enabled = False
            out[f"{label}_timeline_hidden_fraction"] = timeline.hidden_fraction()
    if opts.breakdown:
        out["breakdown"] = {}
        for label in ("gpt", "parallel", "kraken", "kraken/blocking", "ladder", "ladder/blocking"):
            if label not in by_label:
                continue
            engine = by_label[label].engine
            assert engine is not None
            dist.barrier()
            comm = MarkedComm(engine.comm)

            def forward(e: Engine = engine, c: MarkedComm = comm) -> Tensor:
                return e.model(idx, logits_at="last", comm=c)

            with torch.inference_mode():
                out["breakdown"][label] = profile_forward(forward, engine.config.vocab_size)
    if "gpt/dtensor" in by_label:
        ours, peer = by_label["gpt"].prefill(idx).float(), by_label["gpt/dtensor"].prefill(idx).float()
        diff = (ours - peer).abs().max().item()
        scale = ours.abs().max().item()
        out["peer_check"] = {"max_abs_diff": diff, "max_abs_logit": scale,
                             "ok": diff <= (1e-3 if ours.dtype == torch.float32 else 0.05) * max(1.0, scale)}
    return out


def _summarise(jobs: list[Job], samples: list[list[float]], log: RoundLog, extras: dict[str, Any]) -> dict[str, Any]:
    variants: dict[str, dict[str, Any]] = {}
    series: dict[str, dict[str, list[float]]] = {"prefill": {}, "decode": {}}
    for job, s in zip(jobs, samples, strict=True):
        v = job.variant
        entry = variants.setdefault(v.label, {"arch": v.model.arch, "tp": v.tp, "preset": v.model.preset,
                                              "layout": v.layout, "quantize": v.quantize, "overlap": v.overlap,
                                              "config": v.model.config.to_dict(), "layers": v.model.config.n_layer,
                                              "full_layers": v.model.full_layers,
                                              "lm_head": "sharded" if v.engine is not None and v.engine.model.head_split
                                              else "replicated"})
        entry[job.phase] = asdict(Stats.of(s)) | {"samples": s}
        entry[f"{job.phase}_per_layer_s"] = entry[job.phase]["median"] / v.model.config.n_layer
        entry[f"{job.phase}_full_depth_estimate_s"] = entry[f"{job.phase}_per_layer_s"] * v.model.full_layers
        series[job.phase][v.label] = s
    # each system overlap mode against its blocking model (which is its "blocking" variant) and Kraken
    systems = {v.label: v.model.arch for v in (job.variant for job in jobs) if v.overlap}
    pairs = ratio_pairs(systems)
    ratios: dict[str, dict[str, Any]] = {}
    for phase, by_label in series.items():
        ratios[phase] = {name: asdict(paired_ratio(by_label[a], by_label[b])) for name, a, b in pairs
                         if a in by_label and b in by_label}
    blocking = {arch: f"{arch}/blocking" for arch in OVERLAPPING} | systems
    hidden = {label: {"in_place": _hidden_in_place(series["prefill"], label, blocking[label]),
                      "timeline": extras.pop(f"{label}_timeline_hidden_fraction", None)} for label in blocking}
    system_hidden = {label: hidden[label] for label in systems}
    return {"rounds": log.to_dict(), "variants": variants, "ratios": ratios,
            "hidden_fraction": hidden["kraken"] | {"ladder": hidden["ladder"]} | system_hidden, **extras}


def _hidden_in_place(pre: dict[str, list[float]], label: str, blocking: str) -> dict[str, Any] | None:
    """Share of the blocking variant's exposed AllReduce time that overlapping removed, per round: ``label``
    against ``blocking`` (Kraken / ladder: their blocking variants; a system mode: its standard model) and
    the architecture's no-comm ceiling."""
    ceiling = f"{label.partition('/')[0]}/no-comm"
    if not all(k in pre for k in (label, blocking, ceiling)):
        return None
    per_round = [(b - o) / (b - n) if b > n else float("nan")
                 for o, b, n in zip(pre[label], pre[blocking], pre[ceiling], strict=True)]
    finite = [x for x in per_round if x == x]
    return asdict(Stats.of(finite)) if finite else None


def run_rank(payload: dict[str, Any]) -> int:
    """Body of one rank: every cell of the grid for this link and TP degree."""
    opts = Options(**payload["options"])
    init_distributed(opts.timeout_s, resolve_device(opts.device))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    pids = gather_json(os.getpid())
    cells = []
    for dtype in opts.dtypes:
        for shape in opts.shapes:
            models = resolve_shape(shape, world, opts.checkpoints)
            variants = _build_variants(models, dtype, opts, world, rank)
            for prompt in (p for p in opts.prompts if p <= _context(models)):  # run_sweep names the rest
                for batch in opts.batches:
                    vocab = min(m.config.vocab_size for m in models.values())
                    result = measure_cell(variants, batch, prompt, opts, pids, vocab)
                    if rank == 0:
                        cells.append({"shape": shape, "tp": world, "prompt_len": prompt, "batch": batch,
                                      "dtype": _resolved_dtype(variants),
                                      "link_gbps": payload["link_gbps"],
                                      "oversubscribed": world > (os.cpu_count() or 1), **result})
                        link = payload["link_gbps"] or "loopback"
                        print(f"[bench] tp={world} link={link} {shape} {cells[-1]['dtype']} T={prompt} B={batch}: "
                              + _headline(result), file=sys.stderr, flush=True)
                        _save_cells(cells, Path(payload["out"]))
            del variants
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _context(models: dict[str, Model]) -> int:
    return min(m.config.block_size for m in models.values())


def _save_cells(cells: list[dict[str, Any]], out: Path) -> None:
    """Every finished cell, rewritten after each one (whole, via a rename): a launch that fails or is
    interrupted later keeps what it measured."""
    partial = out.with_suffix(".part")
    partial.write_text(json.dumps(cells))
    partial.replace(out)


def _resolved_dtype(variants: list[Variant]) -> str:
    return next(v.engine.options.dtype for v in variants if v.engine is not None)


def _headline(result: dict[str, Any]) -> str:
    r = result["ratios"]["prefill"]
    keys = ("kraken/gpt", "kraken/parallel", "kraken/no-comm", "ladder/gpt", "ladder/no-comm")
    return ", ".join(f"{k} {r[k]['median']:.3f}" for k in keys if k in r) \
        + f" ({result['rounds']['kept']} rounds kept, {result['rounds']['dropped']} dropped)"


# Coordinator ----------------------------------------------------------------------------------
def check_overlaps(modes: list[str]) -> None:
    """Each --overlap value a system mode the runtime runs (chunked:K or collective-matmul)."""
    for mode in modes:
        if not parse_overlap(mode).system:
            raise ConfigError(f"bench: --overlap {mode!r}: give chunked:K or collective-matmul (gpt and parallel "
                              "always run blocking too)")


def _launch(payload: dict[str, Any], world: int, links: Links | None, timeout: float) -> None:
    """Run every rank (inside its network namespace when links are shaped) through the one launcher."""
    env = {"OMP_NUM_THREADS": "1"}
    code = run_ranks("krakenlm.bench.sweep:run_rank", world, payload, timeout=timeout, grace=10.0,
                     master_addr=links.addresses[0] if links else "127.0.0.1",
                     port=29500 if links else None,  # each namespace has its own port space
                     prefix=links.prefix if links else None,
                     env=lambda rank: env | {"GLOO_SOCKET_IFNAME": links.interfaces[rank] if links else "lo"})
    if code:
        raise DistributedError(f"bench: a rank failed (exit code {code})")


def run_sweep(opts: Options, progress: Callable[[str], None] = print, partial: bool = False) -> dict[str, Any]:
    """Every (link, TP degree) launch of the grid. Returns the cells and what was skipped. A failed launch
    or Ctrl-C raises, unless ``partial``: then the sweep keeps the cells finished so far, goes on past a
    failed launch (listed under "failed") and stops at Ctrl-C ("interrupted")."""
    sweep: dict[str, Any] = {"cells": [], "skipped": [], "failed": [], "interrupted": False}
    check_overlaps(opts.overlaps)
    for tp in opts.tps:  # bad shapes and layouts fail here, in one line, before any process starts
        for shape in opts.shapes:
            models = resolve_shape(shape, tp, opts.checkpoints)
            for lay in opts.layouts:
                for arch in ("gpt", "parallel"):
                    if arch in models:
                        check_layout(models[arch].config, Layout.parse(lay), tp)
            for prompt in (p for p in opts.prompts if p > _context(models)):
                reason = f"{shape} T={prompt}: longer than the models' context ({_context(models)} tokens)"
                progress(f"bench: skipping {reason}")
                sweep["skipped"].append({"shape": shape, "tp": tp, "prompt_len": prompt, "reason": reason})
    # the stated timeout is per cell: a launch runs every cell of its link, so a long grid is not cut short
    deadline = opts.timeout_s * len(opts.dtypes) * len(opts.shapes) * len(opts.prompts) * len(opts.batches)
    for gbps in opts.links:
        for tp in opts.tps:
            label = f"tp={tp} link={'loopback' if gbps is None else f'{gbps:g} Gbit/s'}"
            progress(f"bench: {label}")
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "cells.json"
                payload = {"options": asdict(opts) | {"links": [], "single": opts.single and gbps is None},
                           "link_gbps": gbps, "out": str(out)}
                try:
                    _launch_link(payload, tp, gbps, deadline, sweep["skipped"], progress)
                except DistributedError as err:
                    if not partial:
                        raise
                    progress(f"bench: {label} failed ({err}); keeping the cells it finished")
                    sweep["failed"].append({"link_gbps": gbps, "tp": tp, "reason": str(err)})
                except KeyboardInterrupt:
                    if not partial:
                        raise
                    progress(f"bench: interrupted during {label}; keeping the cells finished so far")
                    sweep["interrupted"] = True
                if out.exists():
                    sweep["cells"] += json.loads(out.read_text())
            if sweep["interrupted"]:
                return sweep
    return sweep


def _launch_link(payload: dict[str, Any], tp: int, gbps: float | None, deadline: float,
                 skipped: list[dict[str, Any]], progress: Callable[[str], None]) -> None:
    """One launch: loopback, or inside shaped network namespaces (skipped, with the reason, where the
    machine cannot make them)."""
    if gbps is None:
        _launch(payload, tp, None, deadline)
        return
    from krakenlm.bench.netns import NetnsUnavailable

    try:
        with Links(tp, gbps) as links:
            _launch(payload, tp, links, deadline)
    except NetnsUnavailable as err:
        progress(f"bench: skipping {gbps:g} Gbit/s: {err}")
        skipped.append({"link_gbps": gbps, "tp": tp, "reason": str(err)})
