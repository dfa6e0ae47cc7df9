"""Tensor-parallel plans: which shard of the model each rank holds and which ranks talk to which.

With Kraken degree N and TP degree T (GPT and parallel blocks are N = 1):
- T <= N (N % T == 0): rank r holds sub-layers [r*N/T, (r+1)*N/T), batched; no Megatron sums;
  Kraken's exchange spans all ranks. T = N is the paper's layout, T < N its generalisation.
- T = k*N: sub-layer r // k is itself Megatron-sharded over its k ranks (part r % k). The shard
  group (same sub-layer) sums partial matmuls; the exchange group (same part) sums sub-layers.
The conjunction's partial products are summed over all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from krakenlm.config import ModelConfig
from krakenlm.errors import ConfigError
from krakenlm.model import Shard


@dataclass(frozen=True)
class ParallelPlan:
    config: ModelConfig
    tp: int

    def __post_init__(self) -> None:
        n, t = self.config.n_sub, self.tp
        if t < 1:
            raise ConfigError(f"tp: must be >= 1, got {t}")
        if not (n % t == 0 or t % n == 0):
            raise ConfigError(f"tp: degree {t} does not fit {n} sub-layers; use a divisor or a multiple of {n}")
        for rank in range(t):
            self.shard(rank).validate(self.config)

    @property
    def parts(self) -> int:
        """Ranks sharing one sub-layer (Megatron degree inside a sub-layer)."""
        return max(1, self.tp // self.config.n_sub)

    def shard(self, rank: int) -> Shard:
        n, k = self.config.n_sub, self.parts
        if self.tp <= n:
            per_rank = n // self.tp
            return Shard(rank * per_rank, per_rank, 0, 1)
        return Shard(rank // k, 1, rank % k, k)

    def shard_group(self, rank: int) -> list[int]:
        base = rank - rank % self.parts
        return list(range(base, base + self.parts))

    def exchange_group(self, rank: int) -> list[int]:
        return list(range(rank % self.parts, self.tp, self.parts))

    def groups(self) -> tuple[list[list[int]], list[list[int]]]:
        """All distinct shard groups and exchange groups (every rank must create them in this order)."""
        shard = sorted({tuple(self.shard_group(r)) for r in range(self.tp)})
        exchange = sorted({tuple(self.exchange_group(r)) for r in range(self.tp)})
        return [list(g) for g in shard], [list(g) for g in exchange]

    def collectives_per_forward(self) -> dict[str, int]:
        """Blocking / overlapped collectives per forward pass (for reports and the cost model)."""
        cfg = self.config
        megatron = 0 if self.parts == 1 else (1 if cfg.arch == "parallel" else 2) * cfg.n_layer
        overlapped = cfg.n_layer - 1 if cfg.arch == "kraken" and self.tp // self.parts > 1 else 0
        if self.parts > 1 and cfg.arch == "ladder":
            # Every module followed by a ladder module, and the last one, issues its sum async.
            ladder_modules = 2 * (cfg.n_layer - cfg.ladder_start)
            overlapped = ladder_modules + 1 - (1 if cfg.ladder_start == 0 else 0) if ladder_modules else 0
            megatron -= overlapped
        return {"blocking_allreduce": megatron, "overlapped_allreduce": overlapped,
                "conjunction_allreduce": int(cfg.arch == "kraken" and self.tp > 1)}
