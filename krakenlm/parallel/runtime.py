"""One rank of a tensor-parallel model: process group, plan, its shard, its Comm, start-up checks.

Works the same under torchrun (single or multi-node: it reads RANK / WORLD_SIZE / MASTER_ADDR) and
under the local launcher in krakenlm.parallel.launch. Every collective has a timeout, so a dead or
stalled peer turns into a DistributedError on the others instead of a hang.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from krakenlm.checkpoint import build_model, load_config
from krakenlm.config import ModelConfig
from krakenlm.errors import CheckpointError, ConfigError, DistributedError
from krakenlm.generate import GenerationResult, SamplingConfig, generate
from krakenlm.parallel.comm import DistComm
from krakenlm.parallel.plan import ParallelPlan
from krakenlm.presets import get_preset


def init_distributed(timeout: float, device: str = "cpu") -> None:
    """Join the process group described by the torchrun-style environment (idempotent)."""
    if dist.is_initialized():
        return
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise DistributedError(f"not launched by torchrun or the krakenlm launcher: {missing} unset")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    except (RuntimeError, dist.DistStoreError) as err:
        raise DistributedError(f"rank {os.environ['RANK']}: rendezvous failed within {timeout:.0f}s: {err}") from err


def source_config(source: dict[str, Any]) -> ModelConfig:
    if source.get("checkpoint"):
        return load_config(source["checkpoint"])
    if source.get("preset"):
        return get_preset(source["preset"])
    if isinstance(source.get("config"), dict):
        return ModelConfig.from_dict(source["config"])
    return ModelConfig.from_json(source["config"])


def _fingerprint_source(source: dict[str, Any]) -> dict[str, Any]:
    """What identifies the weights: path plus size and mtime of its files, or preset/config + seed."""
    out = dict(source)
    path = source.get("checkpoint")
    if path and os.path.exists(path):
        files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs] if os.path.isdir(path) else [path]
        out["files"] = sorted((os.path.basename(f), os.path.getsize(f)) for f in files)
    return out


class Runtime:
    """A model shard plus its Comm on this rank; every rank calls the same methods in lockstep."""

    def __init__(self, source: dict[str, Any], tp: int, *, dtype: torch.dtype = torch.float32,
                 no_comm: bool = False, overlap: bool = True, timeout: float = 60.0,
                 threads: int | None = None, pad_heads: int | None = None, agree_on: Any = None) -> None:
        joined = not dist.is_initialized()
        init_distributed(timeout)
        try:
            self._start(source, tp, dtype, no_comm, overlap, threads, pad_heads, agree_on)
        except BaseException:
            if joined:  # leave no process group behind a failed start (a library caller may retry)
                dist.destroy_process_group()
            raise

    def _start(self, source: dict[str, Any], tp: int, dtype: torch.dtype, no_comm: bool, overlap: bool,
               threads: int | None, pad_heads: int | None, agree_on: Any) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // self.world))
        # Agree on everything before any work: a mismatch must fail here, naming what differs. A rank
        # that cannot read its model still joins the agreement, so its peers fail at once, not at a timeout.
        try:
            config, load_error = source_config(source), None
        except (ConfigError, CheckpointError) as err:
            config, load_error = None, err
        facts = {"load_error": None if load_error is None else str(load_error), "world_size": self.world, "tp": tp,
                 "config": None if config is None else config.to_dict(), "source": _fingerprint_source(source),
                 "dtype": str(dtype), "no_comm": no_comm, "overlap": overlap, "pad_heads": pad_heads,
                 "request": agree_on}
        if load_error is not None:
            with contextlib.suppress(DistributedError):
                self._agree(facts)  # tells the peers, which raise naming this rank
            raise load_error
        self._agree(facts)
        if tp != self.world:
            raise DistributedError(f"tp={tp} but {self.world} ranks were launched; they must be equal")
        self.plan = ParallelPlan(config, tp)
        self.shard = self.plan.shard(self.rank)
        if source.get("checkpoint"):
            self.model = build_model(checkpoint=source["checkpoint"], shard=self.shard, dtype=dtype)
        else:
            self.model = build_model(config=config, seed=source.get("seed", 0), shard=self.shard, dtype=dtype)
        if pad_heads:
            self.model.pad_heads(pad_heads)
        self.comm = DistComm(self.plan, no_comm=no_comm, overlap=overlap)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def _agree(self, facts: dict[str, Any]) -> None:
        gathered: list[Any] = [None] * dist.get_world_size()
        try:
            dist.all_gather_object(gathered, facts)
        except (RuntimeError, dist.DistBackendError) as err:
            raise DistributedError(f"rank {dist.get_rank()}: start-up check failed: a peer died ({err})") from err
        for rank, other in enumerate(gathered):
            if other.get("load_error"):
                raise DistributedError(f"rank {rank} could not load the model: {other['load_error']}")
            for key in facts:
                if other.get(key) != gathered[0].get(key):
                    detail = _digest(other.get(key)) + " vs " + _digest(gathered[0].get(key))
                    raise DistributedError(f"ranks disagree on {key!r} (rank {rank} vs rank 0: {detail}); "
                                           "every rank must be started with the same model, checkpoint and options")

    @torch.inference_mode()
    def forward(self, idx: Tensor, **kwargs: Any) -> Tensor:
        return self.model(idx, comm=self.comm, **kwargs)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig | None = None,
                 stop_token: int | None = None) -> GenerationResult:
        return generate(self.model, prompts, max_new_tokens, sampling, stop_token=stop_token, comm=self.comm)

    def barrier(self) -> None:
        try:
            dist.barrier()
        except (RuntimeError, dist.DistBackendError) as err:
            raise DistributedError(f"rank {self.rank}: barrier failed: a peer rank died or stalled ({err})") from err

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) < 80 else hashlib.sha256(text.encode()).hexdigest()[:12]
