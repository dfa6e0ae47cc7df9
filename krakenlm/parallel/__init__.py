"""Tensor parallelism on torch.distributed: plans, the per-rank Comm, the runtime and launchers."""

from krakenlm.parallel.plan import ParallelPlan

__all__ = ["ParallelPlan"]
