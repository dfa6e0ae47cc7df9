"""A cost-model hardware spec calibrated on the running machine, in seconds, from first principles.

The bundled ``cpu-gloo`` spec was fitted to one machine's benchmark; machines change between
sessions, and on another CPU it predicted a third of the measured time. This spec is built from
probes instead of a fit to the thing it predicts:

- peak_flops per dtype: the GEMM throughput at the model's own per-rank shapes (krakenlm/roofline.py),
  so matmul_eff is 1; this and the two compute probes below run while the machine's other cores (one per
  other rank of the run) do GEMMs too, as they do in the run predicted (krakenlm.machine.busy_cores);
- attention_eff: causal attention's measured rate (the kernel chosen for the shape) over that peak;
- memory_bw: a large copy;
- link_bw and alpha: what a loopback all-reduce between two gloo ranks adds to a forward-like step
  (a GEMM, then the collective) at several sizes (see allreduce_rank), fitted to t = 2 alpha + bytes / bw
  (the 2-rank ring the estimator assumes);
- layer_overhead_s: a one-layer forward's time beyond its GEMMs and attention (norms, activations,
  residuals, Python), from the difference of a 2-layer and a 1-layer model.

One thread per rank, as the benchmark runs. The spec is cached per machine (krakenlm/machine.py) and
read by name: ``load_hardware("cpu-gloo@here")``; ``cpu-gloo`` stays the bundled file everywhere.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from krakenlm.choices import attention_kernel
from krakenlm.choices import resolve as resolve_choices
from krakenlm.config import ModelConfig
from krakenlm.costmodel.hardware import CALIBRATED, Hardware, load_hardware
from krakenlm.dtypes import parse_dtype
from krakenlm.errors import DistributedError
from krakenlm.machine import MACHINE_SPECS, busy_cores, cpu_model, fastest_seconds, spec_key
from krakenlm.model import Shard, Transformer
from krakenlm.model.attention import causal_attention
from krakenlm.parallel.launch import run_ranks
from krakenlm.parallel.plan import ParallelPlan
from krakenlm.roofline import ForwardShape, forward_shape, probe

ALLREDUCE_SIZES = (4096, 65536, 1 << 20, 8 << 20)
PROBE_GEMM = 384  # the all-reduce probe's compute step: a 384^3 GEMM, ~1-2 ms in fp32 on one core
PROBES_VERSION = 3  # part of the cache key: a spec probed the way an earlier version did is measured again


def allreduce_rank(payload: dict[str, Any]) -> int:
    """One rank of the loopback probe: what an all-reduce adds to a forward, per size (rank 0 writes it).

    In a forward each collective follows a layer's compute, so its cost includes waiting for the
    slower rank (compute times differ per rank and per layer) and waking a vCPU that idled; an
    all-reduce timed alone after a barrier sees neither (2-vCPU AMD EPYC Zen 2: 0.3 ms alone, ~2 ms
    per collective in the demo's forward). So each step here is a ~1 ms GEMM then the all-reduce, and
    the cost is the median step minus the median of the same GEMM alone (blocks alternate, paired)."""
    import torch.distributed as dist

    from krakenlm.parallel.group import init_distributed

    init_distributed(60.0, torch.device("cpu"))
    torch.set_num_threads(1)
    a = torch.randn(PROBE_GEMM, PROBE_GEMM)
    added = {}
    for size in payload["sizes"]:
        x = torch.ones(size // 4)
        with_collective, alone = [], []
        for _ in range(3):
            with_collective += _steps(a, x, collective=True)
            alone += _steps(a, x, collective=False)
        added[size] = max(float(np.median(with_collective) - np.median(alone)), 1e-6)
    if dist.get_rank() == 0:
        Path(payload["out"]).write_text(json.dumps(added))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _steps(a: torch.Tensor, x: torch.Tensor, collective: bool, steps: int = 8) -> list[float]:
    """Seconds of each of ``steps`` forward-like steps (a GEMM, then the all-reduce if ``collective``),
    after a barrier; the first step is a warm-up and not returned."""
    import torch.distributed as dist

    dist.barrier()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        torch.mm(a, a)
        if collective:
            dist.all_reduce(x)
        times.append(time.perf_counter() - start)
    return times[1:]


def loopback_link(sizes: tuple[int, ...] = ALLREDUCE_SIZES) -> tuple[float, float, dict[int, float]]:
    """(alpha s, link bytes/s, seconds per size) of a 2-rank loopback all-reduce inside a forward."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "allreduce.json"
        code = run_ranks("krakenlm.bench.spec:allreduce_rank", 2, {"sizes": list(sizes), "out": str(out)},
                         timeout=120.0, env=lambda rank: {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})
        if code:
            raise DistributedError(f"calibration: the loopback all-reduce probe failed (exit code {code})")
        measured = {int(k): v for k, v in json.loads(out.read_text()).items()}
    slope, intercept = np.polyfit(list(measured), list(measured.values()), 1)
    return max(intercept / 2, 1e-6), 1.0 / max(slope, 1e-15), measured


def _attention_seconds(shape: ForwardShape, config: ModelConfig, shard: Shard, batch: int, prompt: int,
                       dtype: torch.dtype) -> float:
    """One layer's causal attention at the rank's shape, with the kernel chosen for it."""
    heads = config.n_head // shard.parts
    size = config.head_size
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch * shard.sub_count, heads, prompt, size, generator=gen).to(dtype) for _ in range(3))
    kernel = attention_kernel(batch * shard.sub_count * heads, 1, prompt, size, dtype, torch.device("cpu"), False)
    with torch.no_grad():
        return fastest_seconds(lambda: causal_attention(q, k, v, size ** -0.5, kernel), torch.device("cpu"))


def _layer_seconds(config: ModelConfig, shard: Shard, batch: int, prompt: int, dtype: torch.dtype) -> float:
    """Time of one more layer: a 2-layer minus a 1-layer forward (embedding and LM head cancel)."""
    idx = torch.randint(0, config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    seconds = []
    for layers in (1, 2):
        model = Transformer(config.replace(n_layer=layers), shard).to(dtype).eval()
        choices = resolve_choices(model, str(dtype)[6:], dtype, torch.device("cpu"), sequences=batch, prompt=prompt)
        model.set_forms(choices.attention, choices.linear, choices.gelu)  # as an engine runs it
        with torch.inference_mode():
            seconds.append(fastest_seconds(lambda m=model: m(idx, logits_at="last"), torch.device("cpu")))
    return max(seconds[1] - seconds[0], 0.0)


def calibrate_machine(config: ModelConfig, tp: int = 2, prompt: int = 256, batch: int = 1,
                      dtypes: tuple[str, ...] = ("bf16", "fp32"), link: tuple[float, float] | None = None) -> Hardware:
    """Probe this machine at one rank's shapes of ``config`` split over ``tp`` ranks and cache the spec
    (also as the machine's ``cpu-gloo@here``). ``link``: a loopback (alpha, bytes/s) measured already."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    siblings = max(0, min(tp, os.cpu_count() or 1) - 1)  # the other ranks on this machine compute meanwhile
    try:
        shard = ParallelPlan(config, tp).shard(0)
        shape = forward_shape(config, shard, batch=batch, prompt=prompt)
        peak, attention, overhead = {}, {}, []
        for name in dtypes:
            dtype = parse_dtype(name)
            with busy_cores(siblings, dtype):
                roof = probe(shape, name, busy=siblings)
                peak[name] = roof.gemm_flops_per_s
                layer_flops = shape.flops()["GEMM"] / config.n_layer
                attn_s = _attention_seconds(shape, config, shard, batch, prompt, dtype)
                attention[name] = min(1.0, shape.attention_flops / config.n_layer / attn_s / peak[name])
                layer_s = _layer_seconds(config, shard, batch, prompt, dtype)
            overhead.append(layer_s - layer_flops / peak[name] - attn_s)
        alpha, link_bw = link or loopback_link()[:2]
    finally:
        torch.set_num_threads(threads)
    spec = load_hardware("cpu-gloo-nominal").with_factors(
        name=CALIBRATED, peak_flops=peak, matmul_eff=1.0, attention_eff=attention, memory_eff=1.0,
        memory_bw=roof.memory_bytes_per_s, link_bw=link_bw, alpha=alpha, comm_eff=1.0,
        layer_overhead_s=max(float(np.mean(overhead)), 0.0),
        description=f"Calibrated on this machine ({cpu_model()}, torch {torch.__version__}, one thread per rank) "
                    f"at {config.name or config.arch}'s shapes on {tp} ranks, batch {batch}, prompt {prompt}, "
                    f"by krakenlm.bench.spec at {time.strftime('%Y-%m-%d %H:%M')}: GEMM peaks at the model's "
                    "shapes, attention with the kernel chosen there, a large copy, a loopback all-reduce, and "
                    "one layer's time beyond its GEMMs and attention.")
    MACHINE_SPECS.put(_shape_key(config, tp, prompt, batch), spec.to_dict())
    MACHINE_SPECS.put(spec_key(), spec.to_dict())  # what `predict --hardware cpu-gloo@here` reads
    return spec


def _shape_key(config: ModelConfig, tp: int, prompt: int, batch: int) -> str:
    shape = json.dumps(config.replace(name="").to_dict(), sort_keys=True)
    return f"{spec_key()}|probes v{PROBES_VERSION}|tp {tp}|batch {batch}|prompt {prompt}|{shape}"


def calibrated_spec(config: ModelConfig, tp: int = 2, prompt: int = 256, batch: int = 1,
                    link: tuple[float, float] | None = None) -> Hardware:
    """The spec calibrated here at these shapes: from the cache, or measured now (seconds)."""
    cached = MACHINE_SPECS.get(_shape_key(config, tp, prompt, batch))
    if isinstance(cached, dict):
        return Hardware.from_dict(cached)
    return calibrate_machine(config, tp, prompt, batch, link=link)
