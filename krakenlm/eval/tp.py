"""Tensor-parallel scoring for lm-eval: this process is rank 0, local follower processes are the rest.

lm-eval drives one process, so the process that builds the `krakenlm` model (lm_eval's or krakenlm's
CLI) becomes rank 0 of a gloo group and spawns ranks 1..tp-1. Rank 0 broadcasts each job (one
padded batch) with broadcast_object_list; every rank then runs the same forward on its shard in
lockstep (krakenlm.parallel's runtime and Comm), so scores equal the single-device ones. A `None`
job tells the followers to leave.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import traceback
from typing import Any

import torch
import torch.distributed as dist

from krakenlm.errors import DistributedError, KrakenError
from krakenlm.parallel.launch import free_port

_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def _next_job() -> Any:
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _follower(rank: int, world: int, port: int, checkpoint: str, dtype: torch.dtype | None, timeout: float) -> None:
    """Ranks 1..tp-1: build this rank's shard, then run every job rank 0 broadcasts until told to stop."""
    from krakenlm.parallel.runtime import Runtime

    os.environ.update(_rank_env(rank, world, port))
    code = 0
    try:
        runtime = Runtime({"checkpoint": checkpoint}, world, dtype=dtype, timeout=timeout)
        try:
            while (job := _next_job()) is not None:
                job.run(runtime.model, runtime.comm)
        finally:
            runtime.close()
    except KrakenError as err:
        print(f"krakenlm eval rank {rank}: error: {err}", file=sys.stderr, flush=True)
        code = 2
    except Exception:  # a bug or a dead rank 0: show it and exit, never hang
        traceback.print_exc()
        code = 1
    os._exit(code)


class TensorParallelEngine:
    """Rank 0 of a local tensor-parallel group; `run(job)` runs a job on all ranks and returns rank 0's result."""

    def __init__(self, checkpoint: str, dtype: torch.dtype | None, tp: int, timeout: float = 1800.0) -> None:
        from krakenlm.parallel.runtime import Runtime

        if dist.is_initialized():
            raise DistributedError("tp > 1 needs its own process group, but this process already belongs to one")
        port = free_port()
        ctx = mp.get_context("spawn")
        self.followers = [ctx.Process(target=_follower, args=(r, tp, port, checkpoint, dtype, timeout), daemon=True)
                          for r in range(1, tp)]
        for proc in self.followers:
            proc.start()
        saved = {k: os.environ.get(k) for k in _ENV}
        os.environ.update(_rank_env(0, tp, port))
        try:
            self.runtime: Any = Runtime({"checkpoint": checkpoint}, tp, dtype=dtype, timeout=timeout)
        except BaseException:  # e.g. a plan that does not fit: leave no group or follower behind
            if dist.is_initialized():
                dist.destroy_process_group()
            self._stop_followers()
            raise
        finally:  # the group is formed: lm-eval and the rest of this process should not see rank variables
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self.config = self.runtime.config
        self.device = torch.device("cpu")

    def run(self, job: Any) -> Any:
        if self.runtime is None:
            raise DistributedError("the tensor-parallel group was closed")
        try:
            dist.broadcast_object_list([job], src=0)
        except (RuntimeError, dist.DistBackendError) as err:
            raise DistributedError(f"rank 0: a follower rank died or stalled ({err})") from err
        return job.run(self.runtime.model, self.runtime.comm)

    def close(self) -> None:
        """Release the followers and the process group (idempotent)."""
        if self.runtime is None:
            return
        with contextlib.suppress(RuntimeError, dist.DistBackendError):  # a follower already gone: tear down anyway
            dist.broadcast_object_list([None], src=0)
        self.runtime.close()
        self.runtime = None
        self._stop_followers()

    def _stop_followers(self, grace: float = 30.0) -> None:
        for proc in self.followers:
            proc.join(timeout=grace)
            if proc.is_alive():
                proc.kill()
                proc.join()
