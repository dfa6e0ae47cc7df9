"""The inference engine: one typed API over one device or N ranks, used by every verb that runs a model.

    engine = Engine.launch(ModelSource(preset="gpt2-124m"), EngineOptions(tp=2, device="auto"))
    result = engine.generate([[15496, 995]], 32)
    engine.close()

An Engine is one rank's shard of the model plus its Comm, device, dtype and KV caches. It runs in
one of two ways:
- SPMD: every rank builds an Engine and calls the same methods in lockstep (the benchmark, tests).
- Driven: ``Engine.launch`` makes this process rank 0 and starts the other ranks as followers (or,
  under torchrun, turns ranks >= 1 into followers). Rank 0's calls of lockstep methods are sent to
  the followers first (JSON over a gloo control group), so a caller (generate, lm-eval, the server,
  the demo) sees one object whatever the TP degree.

The decode step needs no host reads, so ``compile=True`` compiles it with fullgraph (functional
collectives) and, on CUDA, replays it as CUDA graphs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from krakenlm.batching.scheduler import decode_shape
from krakenlm.checkpoint import refuse_overflow
from krakenlm.choices import Choices
from krakenlm.choices import resolve as resolve_choices
from krakenlm.config import ModelConfig, dataclass_fields
from krakenlm.costmodel.estimator import Workload
from krakenlm.costmodel.overlap import parse_overlap
from krakenlm.dtypes import check_dtype, parse_dtype
from krakenlm.errors import CheckpointError, ConfigError, DistributedError, InputError, ResourceError
from krakenlm.generate import (
    Generation,
    GenerationResult,
    RowSampler,
    SamplingConfig,
    Stop,
    validate_prompts,
)
from krakenlm.layout import Layout
from krakenlm.model import LOCAL, Comm, KVCache, Transformer
from krakenlm.model.attention import check_kernel
from krakenlm.model.quant import QUANTIZE
from krakenlm.parallel.comm import DistComm, watch_layers
from krakenlm.parallel.group import agree, check_device_name, init_distributed, resolve_device
from krakenlm.parallel.launch import Ranks, under_torchrun
from krakenlm.parallel.layout_comm import LayoutRun
from krakenlm.parallel.layouts import RankPlan, resolve
from krakenlm.parallel.ledger import Ledger
from krakenlm.parallel.overlap_comm import OverlapComm, check_system_overlap, overlap_view
from krakenlm.parallel.plan import ParallelPlan
from krakenlm.parallel.rank_model import build_rank_model, held_bytes
from krakenlm.preflight import check_engine, check_ranks
from krakenlm.resources import require_memory
from krakenlm.roofline import agreed_dtype
from krakenlm.source import ModelSource, OpenedSource
from krakenlm.validation import check_float, check_int

# How the decode step compiles per device. CUDA: CUDA graphs. CPU: every intermediate a GEMV reads is
# written once (realize_reads_threshold=1) instead of inlined into the reduction, which otherwise
# recomputes the embedding + LayerNorm for each of the 2304 output rows of a QKV projection; measured
# on GPT-2 124M, batch 1, one thread (AMD EPYC Zen 5): 23.8 -> 17.3 ms per token in bf16, 31.4 -> 25.7
# in fp32 (benchmarks/decode_speed.py).
COMPILE_SETTINGS: dict[str, dict[str, Any]] = {"cuda": {"mode": "reduce-overhead"},
                                               "cpu": {"options": {"realize_reads_threshold": 1}}}

LM_HEAD_MODES = ("auto", "split", "whole")
# Under lm_head=auto the ranks split the LM head's vocabulary when that spares each rank at least this many
# bytes of weight reads per step: a gloo all-gather of the logits costs ~0.4 ms between two CPU processes
# here (Intel Xeon family 6 model 167), the time one core takes to read ~4.5 MB, so a tiny model's head
# (the demo's 4096 x 256) is cheaper whole; GPT-2's spares 77 MB in fp32.
SPLIT_HEAD_MIN_BYTES = 16 << 20
DEFAULT_WORKLOAD = Workload(batch=1, prompt=128, generate=32)  # what an engine's choices are measured for
CLOSE_WAIT_S = 10.0  # a follower takes the goodbye and exits within this, or it is stopped or stalled: killed


@dataclass(frozen=True)
class EngineOptions:
    """How to run a model: device, dtype, TP degree and the runtime switches. Plain data (JSON)."""

    device: str = "auto"  # cpu | cuda | cuda:N | auto (CUDA when there is one)
    dtype: str = "fp32"  # fp32 | bf16 | fp16 | auto (the faster of bf16 and fp32 here; the CLI's default)
    tp: int = 1
    no_comm: bool = False  # skip every collective: wrong numbers, right timing (the ceiling)
    overlap: bool = True  # Kraken's exchange in flight during the next attention (False: blocking)
    compile: bool = False  # torch.compile the decode step (CUDA: CUDA graphs)
    pad_heads: int | None = None  # zero-pad heads to this multiple (exact; friendlier kernel shapes)
    attention: str = "auto"  # causal attention kernel: auto (measured fastest here), sdpa, blocked[:rows]
    timeout: float = 60.0  # seconds any rank waits for a peer before failing
    threads: int | None = None  # CPU threads per rank (default: cores / ranks on this node)
    layout: str | None = None  # "2d-ws/attn-batch", "PREFILL,DECODE", "auto" (parallel.layouts); None: Megatron/Kraken
    quantize: str | None = None  # "int8": weight-only int8 made from the checkpoint at load
    tp_overlap: str = "none"  # gpt / parallel: none, chunked:K or collective-matmul (parallel.overlap_comm)
    lm_head: str = "auto"  # split | whole | auto (split when each rank skips >= SPLIT_HEAD_MIN_BYTES of it)

    def __post_init__(self) -> None:
        check_int(self.tp, "tp")
        check_dtype(self.dtype)
        check_kernel(self.attention)
        check_float(self.timeout, "timeout", minimum=0, exclusive=True)
        check_int(self.pad_heads, "pad_heads", optional=True)
        check_int(self.threads, "threads", optional=True)
        for name in ("no_comm", "overlap", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        check_device_name(self.device)
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ConfigError(f"quantize: must be one of {QUANTIZE} or null, got {self.quantize!r}")
        if self.layout is not None and self.layout != "auto":
            if not isinstance(self.layout, str):
                raise ConfigError(f"layout: expected a layout string or auto, got {self.layout!r}")
            Layout.parse(self.layout)
        if parse_overlap(self.tp_overlap).mode == "full":
            raise ConfigError("tp_overlap: must be none, chunked:K or collective-matmul ('full' is no runtime's "
                              "schedule)")
        if self.lm_head not in LM_HEAD_MODES:
            raise ConfigError(f"lm_head: must be one of {LM_HEAD_MODES}, got {self.lm_head!r}")
        if self.pad_heads and (self.quantize or self.layout):
            raise ConfigError("pad_heads: not supported together with a layout or int8 weights (both slice heads "
                              "of the unpadded model)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineOptions:
        return cls(**dataclass_fields(cls, data, "engine options"))


# Lockstep methods: run by every rank; a driving rank 0 first sends the call to its followers. ----------
_LOCKSTEP: dict[str, Callable[..., Any]] = {}
_WIRE_TYPES = {cls.__name__: cls for cls in (SamplingConfig, Stop)}


def lockstep(method: Callable[..., Any]) -> Callable[..., Any]:
    _LOCKSTEP[method.__name__] = method

    @functools.wraps(method)
    def run(self: Engine, *args: Any, **kwargs: Any) -> Any:
        if self._driving:
            self._send({"op": method.__name__, "args": _encode(list(args)), "kwargs": _encode(kwargs)})
        with self._peer_failures(method.__name__.strip("_")):
            return method(self, *args, **kwargs)
    return run


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and type(value).__name__ in _WIRE_TYPES:
        return {"__type__": type(value).__name__, **_encode(dataclasses.asdict(value))}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        fields = {k: _decode(v) for k, v in value.items() if k != "__type__"}
        if "__type__" in value:
            cls = _WIRE_TYPES[value["__type__"]]
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        return fields
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


class Engine:
    """One rank of a model: shard, Comm, device, dtype; prefill / decode / generate / score."""

    def __init__(self, source: ModelSource, options: EngineOptions | None = None, *,
                 rendezvous: tuple[int, int, dist.Store] | None = None, local: bool = False,
                 workload: Workload | None = None) -> None:
        """SPMD construction on this rank. ``rendezvous`` = (rank, world, store) for an in-process rank 0;
        otherwise a process started by torchrun or the launcher joins from its environment. ``local``:
        a single-device engine inside a rank (the benchmark's single-device baselines). ``workload``:
        what ``layout="auto"`` is chosen for."""
        self.source, self.options, self.workload = source, options or EngineOptions(), workload
        self._ledger: Ledger | None = None
        self.device = resolve_device(self.options.device)
        if local and self.options.tp != 1:
            raise ConfigError(f"tp: a local engine runs on one device, got tp={self.options.tp}")
        self.distributed = not local and (self.options.tp > 1 or under_torchrun() or rendezvous is not None)
        self.is_driver, self._driving = True, False
        self._followers: Ranks | None = None
        self._control: Any = None
        self._text: Callable[[list[int]], str] | None = None
        self._decode_step: Callable[..., Tensor] | None = None
        self._serving: _Serving | None = None
        self._joined = False
        if self.distributed:
            rank, world, store = rendezvous or (None, None, None)
            self._joined = init_distributed(self.options.timeout, self.device, rank=rank, world=world, store=store)
        try:
            self._build()
        except BaseException:
            if self._joined:  # leave no process group behind a failed start (a library caller may retry)
                dist.destroy_process_group()
            raise

    def _build(self) -> None:
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if self.distributed else (0, 1)
        if self.device.type == "cpu" and (self.options.threads or self.world > 1):
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
            torch.set_num_threads(self.options.threads or max(1, (os.cpu_count() or 1) // per_node))
        opened = self._open_agreed()
        check_engine(opened.config, self.options.tp, self.options.dtype, self.device, quantize=self.options.quantize,
                     local_ranks=int(os.environ.get("LOCAL_WORLD_SIZE", self.world)))  # before the dtype probe
        self.plan = ParallelPlan(opened.config, self.options.tp)
        self.shard = self.plan.shard(self.rank)
        dtype = agreed_dtype(self.options.dtype, opened.config, self.device, self.shard, distributed=self.distributed)
        self.options = dataclasses.replace(self.options, dtype=dtype)
        self.dtype = parse_dtype(self.options.dtype)
        self.layout = resolve(self.options.layout, opened.config, self.options.tp, self.workload, self.device)
        default = self.layout == Layout.default(opened.config)
        rank_plan = None if default else RankPlan(opened.config, self.layout, self.options.tp, self.rank)
        if default and not self.options.quantize:
            self.model = opened.model(self.shard, self.dtype, self.device)
            self.held = held_bytes(self.model, opened.config, self.shard)
        else:
            built = build_rank_model(opened.model(), self.shard, rank_plan, self.options.quantize, self.dtype,
                                     self.device)
            self.model, self.held = built.model, (built.weights_bytes, built.replicated_bytes)
        opened.release()
        refuse_overflow(self.model, self.source.describe())  # weights cast to a narrower dtype may not fit it
        if self.options.pad_heads:
            self.model.pad_heads(self.options.pad_heads)
        self._choose()
        self.comm: Comm = LOCAL
        overlap = parse_overlap(self.options.tp_overlap)  # standard TP overlapped by the runtime (overlap_comm)
        if overlap.system:
            check_system_overlap(self.config.arch, overlap, layout_default=default, compile=self.options.compile)
        self._layouts: LayoutRun | None = None  # a layout's per-phase model views and Comms
        if self.world > 1 and rank_plan is not None:
            self._layouts = LayoutRun(self.model, rank_plan, built.extras, no_comm=self.options.no_comm)
            self.model, self.comm = self._layouts.views["prefill"], self._layouts.comms["prefill"]
        elif self.world > 1 and overlap.system:
            self.model.head_split = self._splits_head()
            comm = OverlapComm(self.plan, overlap, no_comm=self.options.no_comm, device=self.device)
            self.model, self.comm = overlap_view(self.model, comm), comm
        elif self.world > 1:
            self.model.head_split = self._splits_head()
            self.comm = DistComm(self.plan, no_comm=self.options.no_comm, overlap=self.options.overlap,
                                 device=self.device)
            watch_layers(self.model)

    def _splits_head(self) -> bool:
        """Whether this engine's ranks split the LM head's vocabulary (``EngineOptions.lm_head``)."""
        if self.options.lm_head != "auto":
            return self.options.lm_head == "split"
        head = self.model.wte.weight if self.model.lm_head is None else self.model.lm_head.weight
        if not isinstance(head, Tensor):  # int8 heads multiply themselves, whole
            return False
        return head.numel() * head.element_size() * (self.world - 1) // self.world >= SPLIT_HEAD_MIN_BYTES

    def _open_agreed(self) -> OpenedSource:
        """Open the model, every rank agreeing on everything before any work: a mismatch fails here, naming what
        differs. A rank that cannot read its model still joins the agreement, so its peers fail at once, not at
        a timeout."""
        try:
            opened, load_error = self.source.open(), None
        except (ConfigError, CheckpointError, ResourceError) as err:
            opened, load_error = None, err
        if self.distributed:
            options = self.options.to_dict() | {"device": self.device.type, "threads": None}
            facts = {"load_error": None if load_error is None else str(load_error), "world_size": self.world,
                     "config": None if opened is None else opened.config.to_dict(),
                     "source": self.source.fingerprint(), "options": options}
            if load_error is not None:
                with contextlib.suppress(DistributedError):
                    agree(facts)  # tells the peers, which raise naming this rank
            else:
                agree(facts)
        if load_error is not None:
            raise load_error
        if self.options.tp != self.world:
            raise DistributedError(f"tp={self.options.tp} but {self.world} ranks were launched; they must be equal")
        assert opened is not None
        return opened

    def _choose(self) -> None:
        """The measured choices, once, at the shapes this engine is built for (the workload's batch and
        prompt), as plain options the model runs with; the verbs print them with their results."""
        wl = self.workload or DEFAULT_WORKLOAD
        self.choices: Choices = resolve_choices(self.model, self.options.dtype, self.dtype, self.device,
                                                kernel=self.options.attention, sequences=wl.batch, prompt=wl.prompt,
                                                compile=self._compiler if self.options.compile else None)
        self.model.set_forms(self.choices.attention, self.choices.linear, self.choices.gelu, self.choices.row)

    def _compiler(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """How this engine compiles its decode step (per device: COMPILE_SETTINGS)."""
        return torch.compile(fn, fullgraph=True, dynamic=False, **COMPILE_SETTINGS.get(self.device.type, {}))

    # Launching -----------------------------------------------------------------------------------------
    @classmethod
    def launch(cls, source: ModelSource, options: EngineOptions | None = None,
               workload: Workload | None = None) -> Engine:
        """The engine on every rank, driven by rank 0. Local: this process is rank 0 and the others are
        child processes. Under torchrun: ranks >= 1 follow rank 0's calls until it closes, then get
        back a closed engine with ``is_driver`` False. ``workload``: what ``layout="auto"`` is chosen for."""
        options = options or EngineOptions()
        if not under_torchrun():  # refuse what cannot run before starting any rank
            _preflight(source, options)
        if options.tp == 1 and not under_torchrun():
            return cls(source, options, workload=workload)
        if under_torchrun():
            engine = cls(source, options, workload=workload)
            engine._open_control()
            if engine.rank == 0:
                engine._driving = True
            else:
                engine.is_driver = False
                engine._follow()
            return engine
        work = None if workload is None else dataclasses.asdict(workload)
        followers = Ranks("krakenlm.engine:follow", {"source": source.to_dict(), "options": options.to_dict(),
                                                     "workload": work}, options.tp, range(1, options.tp))
        try:
            followers.await_started(options.timeout)
            engine = cls(source, options, rendezvous=(0, options.tp, followers.store), workload=workload)
            engine._open_control()
        except BaseException as err:
            code = followers.failed()
            if not isinstance(err, Exception):  # Ctrl-C: the followers wait in a collective rank 0 left
                followers.kill()
                raise
            followers.stop(grace=min(5.0, options.timeout))
            if code is not None and isinstance(err, DistributedError):
                raise DistributedError(f"{err} (a follower rank exited with code {code} before joining)") from err
            raise
        engine._followers, engine._driving = followers, True
        return engine

    def _open_control(self) -> None:
        """A gloo group with a long timeout for rank 0's commands: followers may idle for long between
        requests (a server), while a dead rank 0 still closes the connection and ends them."""
        self._control = dist.new_group(backend="gloo", timeout=timedelta(days=7))

    def _send(self, message: dict[str, Any]) -> None:
        """Broadcast a command; a follower that does not take it within the timeout (stopped, stalled) fails
        it as one that died (the control group's own timeout is days: idle followers wait that long)."""
        data = json.dumps(message).encode()
        size = torch.tensor([len(data)], dtype=torch.long)
        wait = timedelta(seconds=self.options.timeout)
        try:
            for tensor in (size, torch.frombuffer(bytearray(data), dtype=torch.uint8)):
                dist.broadcast(tensor, 0, group=self._control, async_op=True).wait(wait)
        except (RuntimeError, dist.DistBackendError) as err:
            raise DistributedError(f"rank 0: a follower rank died or stalled "
                                   f"({str(err).splitlines()[0][:200]})") from err

    def _receive(self) -> dict[str, Any]:
        size = torch.zeros(1, dtype=torch.long)
        dist.broadcast(size, 0, group=self._control)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, 0, group=self._control)
        return json.loads(bytes(data.tolist()).decode())

    def _follow(self) -> None:
        """Run rank 0's lockstep calls until it closes the engine, or ends without closing it (its process
        exited, so the connection closed): then this rank leaves as quietly (rank 0 reports any failure)."""
        while True:
            try:
                message = self._receive()
            except (RuntimeError, dist.DistBackendError):
                break
            if message["op"] == "close":
                break
            _LOCKSTEP[message["op"]](self, *_decode(message["args"]), **_decode(message["kwargs"]))
        with contextlib.suppress(RuntimeError, dist.DistBackendError):
            self._teardown()

    @contextlib.contextmanager
    def _peer_failures(self, what: str) -> Iterator[None]:
        """A collective that fails mid-work (a compiled step's, too) means a peer died or stalled."""
        try:
            yield
        except (RuntimeError, dist.DistBackendError) as err:
            if self.world == 1 or isinstance(err, DistributedError):
                raise
            raise DistributedError(f"rank {self.rank}: {what} failed: a peer rank died or stalled "
                                   f"({str(err).splitlines()[0][:200]})") from err

    def close(self) -> None:
        """Release the followers, the control group and the process group (idempotent). A follower that does
        not take the goodbye within CLOSE_WAIT_S (stopped, stalled) is killed: closing never hangs."""
        if self._driving:
            self._driving = False
            sender = threading.Thread(target=self._goodbye, name="krakenlm-close", daemon=True)
            sender.start()
            sender.join(min(self.options.timeout, CLOSE_WAIT_S))
            if sender.is_alive() and self._followers is not None:
                self._followers.kill()  # its connection closes, which ends the send
            sender.join()  # bounded: the send gives up after the timeout, at once when the followers are gone
        self._teardown()

    def _goodbye(self) -> None:
        with contextlib.suppress(DistributedError):  # a follower already gone: tear down anyway
            self._send({"op": "close"})

    def _teardown(self) -> None:
        if self._joined and dist.is_initialized():
            dist.destroy_process_group()
        self._joined = False
        if self._followers is not None:
            self._followers.stop(grace=min(self.options.timeout, CLOSE_WAIT_S))
            self._followers = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # interrupted mid-work: followers may sit in a collective rank 0 will never finish
            self.abort()

    def abort(self) -> None:
        """Stop the followers without a goodbye and drop the process group (Ctrl-C, a failed call)."""
        self._driving = False
        if self._followers is not None:
            self._followers.kill()
            self._followers = None
        self._teardown()

    def abandon(self) -> None:
        """Stop the followers and leave the process group as it is, for a process about to exit after a
        collective timed out: tearing gloo down then can abort the process ("terminate called ...")."""
        self._driving = False
        if self._followers is not None:
            self._followers.kill()
            self._followers = None

    # Facts and helpers ---------------------------------------------------------------------------------
    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def synchronize(self) -> None:
        """Wait for the device (every timing goes through this, so it is the device's time)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.world > 1:
            try:
                dist.barrier()
            except (RuntimeError, dist.DistBackendError) as err:
                raise DistributedError(f"rank {self.rank}: barrier failed: a peer rank died or stalled "
                                       f"({err})") from err

    @contextlib.contextmanager
    def record(self) -> Iterator[Ledger]:
        """A Ledger of this rank's collectives (eager forwards), weights and the KV caches made meanwhile:
        ``with engine.record() as ledger: engine.forward(...)``."""
        ledger = Ledger(weights_bytes=self.held[0], replicated_bytes=self.held[1])
        self._ledger = ledger
        self._record(ledger)
        try:
            yield ledger
        finally:
            self._ledger = None
            self._record(None)

    def _record(self, ledger: Ledger | None) -> None:
        if isinstance(self.comm, DistComm):
            self.comm.ledger = ledger
        if self._layouts is not None:
            self._layouts.record(ledger)

    def _agree(self, tokens: Tensor) -> Tensor:
        """Rank 0's tokens (or stop decision) for every rank."""
        return tokens if self.world == 1 else self.comm.agree(tokens)  # type: ignore[attr-defined]

    def variant(self, *, compile: bool | None = None, **comm_changes: Any) -> Engine:
        """The same weights with other switches (no_comm, overlap, compile): the benchmark's variants.
        A variant shares this engine's model and groups and owns nothing (closing it is a no-op)."""
        other = copy.copy(self)
        if compile is not None:
            other.options = dataclasses.replace(self.options, compile=compile)
            if compile and not self.options.compile:
                other._choose()  # the one-row form a compiled step runs (the shared model's other forms stay)
        if comm_changes and isinstance(self.comm, DistComm):
            other.comm = self.comm.variant(**comm_changes)
        other._decode_step, other._joined, other._followers, other._driving = None, False, None, False
        return other

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """A static KV cache for ``batch`` rows of ``max_len`` slots, refused up front if it cannot fit (an
        attn-batch layout keeps ceil(batch / ranks) rows per rank)."""
        max_len = max_len or self.config.block_size
        layout = self._layouts
        rows = batch if layout is None else layout.cache_rows(batch)
        shape, layers = self.model.attention_shape, self.config.n_layer
        nbytes = 2 * layers * self.shard.sub_count * rows * shape.n_kv_head * max_len * shape.stored_size
        require_memory(nbytes * self.model.wte.weight.dtype.itemsize, f"KV cache for batch {batch} x {max_len} "
                       "tokens", self.device)
        cache = self.model.new_cache(batch, max_len) if layout is None else layout.new_cache(batch, max_len)
        if self._ledger is not None:
            self._ledger.kv_bytes = max(self._ledger.kv_bytes, cache.nbytes())
        if self.options.compile and self.device.type == "cuda":  # CUDA graphs replay writes in place
            for tensor in cache.keys + cache.values + [cache.valid]:
                torch._dynamo.mark_static_address(tensor)
        return cache

    @property
    def decode_model(self) -> tuple[Transformer, Comm]:
        """The model and Comm a decode step runs: a layout's decode view, else the engine's own."""
        if self._layouts is not None:
            return self._layouts.views["decode"], self._layouts.comms["decode"]
        return self.model, self.comm

    @property
    def decode_step(self) -> Callable[..., Tensor]:
        """The one-token step (tokens, slots, positions, cache, keys=None) -> logits [B, V]; attention reads
        cache slots [0, keys) (default: all). Compiled when asked: one graph per shape and ``keys``."""
        if self._decode_step is None and not self.options.compile:
            self._decode_step = self._eager_step
        elif self._decode_step is None:
            model, comm = self.decode_model
            if isinstance(comm, DistComm):
                comm = comm.variant(functional=True)

            def step(tokens: Tensor, slots: Tensor, positions: Tensor, cache: KVCache,
                     keys: int | None = None) -> Tensor:
                return model.decode(tokens, slots, positions, cache, keys=keys, comm=comm)

            self._decode_step = self._compiler(step)
        return self._decode_step

    def _eager_step(self, tokens: Tensor, slots: Tensor, positions: Tensor, cache: KVCache, keys: int | None = None
                    ) -> Tensor:
        """The decode step uncompiled (a compiled engine's batched CPU steps)."""
        model, comm = self.decode_model
        return model.decode(tokens, slots, positions, cache, keys=keys, comm=comm)

    # Work ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, idx: Tensor, **kwargs: Any) -> Tensor:
        """One forward of this rank's shard (SPMD: every rank calls it); logits like Transformer.forward."""
        with self._peer_failures("forward"):
            return self.model(idx.to(self.device), comm=self.comm, **kwargs)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: SamplingConfig | None = None,
                 stop: Stop | None = None, *, vocab_limit: int | None = None,
                 text: Callable[[list[int]], str] | None = None, timed_steps: bool = False,
                 trace: str | None = None) -> GenerationResult:
        """Up to max_new_tokens per prompt (left-padded batch). ``vocab_limit``: never sample ids at or
        above it (a tokenizer smaller than the model's vocabulary); ``text`` decodes ids for stop strings;
        ``trace``: a directory for each rank's timeline (chrome trace)."""
        if trace is not None and self.options.compile:
            raise ConfigError("trace: the timeline watches eager collectives; run without compile to trace")
        validate_prompts(prompts, self.config.vocab_size, self.config.block_size, max_new_tokens)
        self._text = text
        return self._generate([list(p) for p in prompts], max_new_tokens, sampling or SamplingConfig(), stop or Stop(),
                              vocab_limit, timed_steps, trace)

    @lockstep
    def _generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig, stop: Stop,
                  vocab_limit: int | None, timed_steps: bool, trace: str | None) -> GenerationResult:
        sampler = RowSampler([sampling] * len(prompts), self.device, vocab_limit, shared_seed=True)
        loop = Generation(self.model, self.decode_step, self.new_cache, self.comm, self.synchronize, self._text,
                          timed_steps=timed_steps, agree=self._agree)
        watch = isinstance(self.comm, DistComm) and not self.options.compile and (
            trace is not None or isinstance(self.comm, OverlapComm)
            or self.plan.collectives_per_forward()["overlapped_allreduce"] > 0)
        if not watch:
            return loop.run(prompts, max_new_tokens, sampler, stop)
        timeline = self.comm.timeline
        timeline.clear()
        timeline.enabled = True
        try:
            result = loop.run(prompts, max_new_tokens, sampler, stop)
        finally:
            timeline.enabled = False
        hidden = timeline.hidden_fraction()
        result.exchange_hidden = None if math.isnan(hidden) else hidden
        if trace is not None:
            os.makedirs(trace, exist_ok=True)
            timeline.chrome_trace(os.path.join(trace, f"rank{self.rank}.json"), self.rank)
        return result

    def score(self, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each target and whether greedy decoding would produce it.

        inputs[i] is the model input (context + target without its last token); targets[i] are the
        tokens predicted by its last len(targets[i]) positions."""
        if len(inputs) != len(targets):
            raise InputError(f"score: {len(inputs)} inputs but {len(targets)} targets; give one target per input")
        for row, target in zip(inputs, targets, strict=True):
            if not target or len(target) > len(row):
                raise InputError(f"score: a target of {len(target)} tokens needs an input at least that long")
        validate_prompts(inputs, self.config.vocab_size, self.config.block_size, 0)
        validate_prompts(targets, self.config.vocab_size, self.config.block_size, 0, "target")  # ids index logits
        return self._score([list(r) for r in inputs], [list(t) for t in targets])

    @lockstep
    @torch.inference_mode()
    def _score(self, inputs: list[list[int]], targets: list[list[int]]) -> list[tuple[float, bool]]:
        # Right-padded rows: causal attention never lets a real position see the padding after it.
        width = max(len(row) for row in inputs)
        idx = torch.zeros(len(inputs), width, dtype=torch.long)
        for i, row in enumerate(inputs):
            idx[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        logits = self.model(idx.to(self.device), comm=self.comm)
        results = []
        for i, (row, target) in enumerate(zip(inputs, targets, strict=True)):
            logp = F.log_softmax(logits[i, len(row) - len(target):len(row)].float(), dim=-1)
            want = torch.tensor(target, dtype=torch.long, device=self.device)
            results.append((float(logp.gather(1, want.unsqueeze(1)).sum()), bool((logp.argmax(-1) == want).all())))
        return results


    # Serving: one persistent KV cache of max_batch rows; requests join and leave between steps --------------
    def open_serving(self, max_batch: int, *, vocab_limit: int | None = None) -> None:
        """Allocate the serving cache: ``max_batch`` rows of the model's whole context (replacing any
        earlier one). ``vocab_limit``: never sample ids at or above it."""
        check_int(max_batch, "max_batch")
        check_int(vocab_limit, "vocab_limit", maximum=self.config.vocab_size, optional=True)
        if self.layout.decode.attention == "batch" or self.layout.prefill.gathered:
            raise ConfigError(f"serving: layout {self.layout} shards the batch over the ranks; a server prefills one "
                              "request row at a time, which needs attn-heads and a weight-stationary prefill")
        self._open_serving(max_batch, vocab_limit)

    @lockstep
    def _open_serving(self, max_batch: int, vocab_limit: int | None) -> None:
        self._serving = None  # free the old cache before making the new one
        if len(self.choices.linear) < (max_batch - 1).bit_length() + 1:
            # decode steps will run up to max_batch rows: the few-row forms for each row bucket up to it
            self.workload = dataclasses.replace(self.workload or DEFAULT_WORKLOAD, batch=max_batch)
            self._choose()
        zeros = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._serving = _Serving(self.new_cache(max_batch, self.config.block_size), zeros, zeros.clone(),
                                 [0] * max_batch, [None] * max_batch, vocab_limit)

    def prefill_row(self, row: int, prompt: Sequence[int], sampling: SamplingConfig | None = None) -> int:
        """Prefill one request into cache row ``row`` (the other rows keep their state) and return its
        first token, sampled with ``sampling`` (its seed starts the row's own generator)."""
        token = self.prefill_rows([row], [prompt], [sampling or SamplingConfig()])[0]
        assert token is not None
        return token

    def prefill_rows(self, rows: Sequence[int], chunks: Sequence[Sequence[int]],
                     samplings: Sequence[SamplingConfig], *, starts: Sequence[int] | None = None,
                     last: Sequence[bool] | None = None) -> list[int | None]:
        """Prefill prompt chunks into their rows; the other rows keep their state. Chunk i holds tokens
        [starts[i], starts[i] + len) of row i's prompt (default 0: a new request; otherwise the row's
        cached length, continuing a chunked prefill). Where ``last[i]`` (default), the chunk ends its
        prompt and the row's first token, sampled with ``samplings[i]`` (whose seed starts the row's own
        generator), is returned; else None. New requests run as right-padded batched forwards
        (``padded_groups``)."""
        rows, chunks = list(rows), [list(c) for c in chunks]
        starts = [0] * len(rows) if starts is None else list(starts)
        last = [True] * len(rows) if last is None else [bool(x) for x in last]
        if not rows or len(set(rows)) != len(rows) or not len(chunks) == len(samplings) == len(starts) == len(last) \
                == len(rows):
            raise InputError(f"prefill_rows: expected distinct rows, one chunk, sampling, start and last each, "
                             f"got rows {rows}")
        for row, chunk, start in zip(rows, chunks, starts, strict=True):
            s = self._serving_row(row)
            if start and (start != s.lengths[row] or s.samplers[row] is not None):
                raise InputError(f"prefill_rows: row {row} holds {s.lengths[row]} prompt tokens being prefilled, "
                                 f"a chunk cannot start at {start}")
            validate_prompts([chunk], self.config.vocab_size, self.config.block_size - start, 0)
        return self._prefill_rows(rows, chunks, list(samplings), starts, last)

    @lockstep
    @torch.inference_mode()
    def _prefill_rows(self, rows: list[int], chunks: list[list[int]], samplings: list[SamplingConfig],
                      starts: list[int], last: list[bool]) -> list[int | None]:
        s = self._serving
        logits: dict[int, Tensor] = {}
        for group in padded_groups([len(c) if start == 0 else 0 for c, start in zip(chunks, starts, strict=True)]):
            group.sort(key=rows.__getitem__)  # adjacent rows in order are written in place
            logits.update(zip(group, self._prefill_fresh([rows[i] for i in group], [chunks[i] for i in group]),
                              strict=True))
        for i, (row, chunk, start) in enumerate(zip(rows, chunks, starts, strict=True)):
            if start:  # a later chunk attends to the row's cached prefix (masked attention)
                idx = torch.tensor([chunk], dtype=torch.long, device=self.device)
                logits[i] = self.model(idx, cache=s.cache.rows(row, row + 1), start=start, logits_at="last",
                                       comm=self.comm)[0, -1]
            s.lengths[row] = s.slots[row] = start + len(chunk)
            s.samplers[row] = None
        done = [i for i in range(len(rows)) if last[i]]
        tokens: list[int | None] = [None] * len(rows)
        if done:
            sampler = RowSampler([samplings[i] for i in done], self.device, s.vocab_limit)
            token = self._agree(sampler(torch.stack([logits[i] for i in done])))
            index = torch.tensor([rows[i] for i in done], device=self.device)
            s.tokens.index_copy_(0, index, token)
            for i, value, generator in zip(done, token.tolist(), sampler.generators, strict=True):
                tokens[i], s.samplers[rows[i]] = value, (samplings[i], generator)
        s.batch_rows = ()  # rows' samplers changed: rebuild the step's sampler
        return tokens

    def _prefill_fresh(self, rows: list[int], prompts: list[list[int]]) -> Tensor:
        """New requests' prompts in one forward, right-padded (causal attention never lets a real
        position see the padding after it) into a scratch cache copied into their rows; the padding's
        slots are marked invalid and later overwritten by decoding. Returns each prompt's last logits [n, V]."""
        s, width = self._serving, max(len(p) for p in prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        idx = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            idx[i, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        in_place = rows == list(range(rows[0], rows[0] + len(rows)))  # adjacent rows: written where they are
        scratch = s.cache.rows(rows[0], rows[-1] + 1) if in_place else self.model.new_cache(len(rows), width)
        logits = self.model(idx.to(self.device), cache=scratch, logits_at=lengths - 1, comm=self.comm)[:, 0]
        index = torch.tensor(rows, device=self.device)
        if not in_place:
            for mine, theirs in zip(s.cache.keys + s.cache.values, scratch.keys + scratch.values, strict=True):
                mine[:, :, :, :width].index_copy_(1, index, theirs)
        s.cache.valid[index] = torch.arange(s.cache.max_len, device=self.device) < lengths.unsqueeze(1)
        return logits

    def decode_rows(self, rows: Sequence[int]) -> list[int]:
        """One decode step for ``rows`` (each holding a prefilled request): the next token of each, sampled
        with its request's settings and generator; rows not named keep their state. The step reads no
        host value; its tokens come back in one device->host transfer."""
        rows = list(rows)
        if not rows or len(set(rows)) != len(rows):
            raise InputError(f"decode_rows: expected distinct rows, got {rows}")
        for row in rows:
            s = self._serving_row(row)
            if s.samplers[row] is None:
                raise InputError(f"decode_rows: row {row} holds no request (prefill it first)")
            if s.lengths[row] >= s.cache.max_len:
                raise InputError(f"decode_rows: row {row} has filled the context of {s.cache.max_len} tokens")
        return self._decode_rows(rows)

    @lockstep
    @torch.inference_mode()
    def _decode_rows(self, rows: list[int]) -> list[int]:
        s = self._serving
        batch = s.cache.batch
        # Rows [0, width) run; rows outside `rows` write their current token at their current slot, which
        # their own next step rewrites before reading it (or a prefill resets), and their logits are dropped.
        # Compiled: on CUDA every step (all rows: CUDA graphs replay on the whole cache's own tensors); on a
        # CPU row 0 alone, while a batch runs eagerly, where its linear layers take their measured few-row
        # form (oneDNN's packed weights do not lower into an inductor graph, which runs F.linear: GPT-2
        # fp32, 8 rows, Intel Xeon family 6 model 167: 131 ms a step compiled against 76 eager).
        compiled = self.options.compile and (self.device.type == "cuda" or max(rows) == 0)
        width, keys = decode_shape(rows, [s.lengths[r] for r in rows], batch, s.cache.max_len, compiled)
        if compiled and self.device.type == "cuda":
            width = batch
        cache = s.cache if width == batch else s.cache.rows(0, width)
        step = self.decode_step if compiled else self._eager_step
        logits = step(s.tokens[:width], s.slots[:width], s.slots[:width], cache, keys)
        index, sampler = self._step_sampler(rows)
        token = self._agree(sampler(logits.index_select(0, index)))
        s.tokens.index_copy_(0, index, token)
        s.slots.index_add_(0, index, torch.ones_like(token))
        for row in rows:
            s.lengths[row] += 1
        return token.tolist()

    def _step_sampler(self, rows: list[int]) -> tuple[Tensor, RowSampler]:
        """The rows as a device index and their requests' sampler, rebuilt only when the batch changes."""
        s = self._serving
        if s.batch_rows != tuple(rows):
            chosen = [s.samplers[r] for r in rows]
            sampler = RowSampler([c for c, _ in chosen], self.device, s.vocab_limit, generators=[g for _, g in chosen])
            s.batch_rows, s.batch = tuple(rows), (torch.tensor(rows, device=self.device), sampler)
        return s.batch

    def _serving_row(self, row: int) -> _Serving:
        s = self._serving
        if s is None:
            raise ConfigError("serving: call open_serving(max_batch) first")
        if not isinstance(row, int) or isinstance(row, bool) or not 0 <= row < s.cache.batch:
            raise InputError(f"serving: row must be an integer in 0..{s.cache.batch - 1}, got {row!r}")
        return s

    def peer_failure(self) -> str | None:
        """Why a follower rank started by this engine is gone, or None while they all run (polls, no collective)."""
        code = self._followers.failed() if self._followers is not None else None
        return None if code is None else f"a follower rank exited with code {code}"


PADDING_WASTE = 1.25  # a batched prefill computes at most this many times the prompts' own tokens


def padded_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Indices of the prompts (length > 0) to prefill together, each group right-padded to its longest:
    longest first, a prompt joins the current group while the group's padded tokens stay within
    ``PADDING_WASTE`` times its real ones (so one long prompt never makes many short ones pay its length)."""
    groups: list[list[int]] = []
    total = 0
    for i in sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i]):
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= PADDING_WASTE * (total + lengths[i]):
            groups[-1].append(i)
            total += lengths[i]
        else:
            groups.append([i])
            total = lengths[i]
    return groups


@dataclass
class _Serving:
    """One rank's serving state: the cache; each row's last token and next slot (= position) on the device;
    each row's sampling config and generator; host copies of the row lengths (every rank runs the same
    calls, so they agree); the current step's rows and sampler."""

    cache: KVCache
    tokens: Tensor
    slots: Tensor
    lengths: list[int]
    samplers: list[tuple[SamplingConfig, torch.Generator] | None]
    vocab_limit: int | None
    batch_rows: tuple[int, ...] = ()
    batch: tuple[Tensor, RowSampler] | None = None


def _preflight(source: ModelSource, options: EngineOptions) -> None:
    """What can be refused before a launch starts a rank or reads a weight (krakenlm.preflight)."""
    config = source.peek_config()
    if config is not None:
        check_engine(config, options.tp, options.dtype, resolve_device(options.device), local_ranks=options.tp,
                     quantize=options.quantize)
    if options.tp > 1:
        check_ranks(options.tp)


def follow(args: dict[str, Any]) -> int:
    """A follower rank's program (started by Engine.launch through the launcher)."""
    work = args.get("workload")
    Engine.launch(ModelSource.from_dict(args["source"]), EngineOptions.from_dict(args["options"]),
                  None if work is None else Workload(**work))
    return 0

