"""Which slice of the full model a Shard holds, and how each full (single-device) tensor maps onto it:
the Megatron / Kraken splits of krakenlm.model.params turned into index ranges.

``shard_ranges`` names, per dimension, the index ranges a shard keeps (several ranges are
concatenated, e.g. the q, k and v blocks of a fused QKV weight). It is applied to an in-memory
tensor or to a safetensors slice, so a rank reads only its part of a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from krakenlm.config import ModelConfig
from krakenlm.errors import ConfigError
from krakenlm.model.layers import AttentionShape
from krakenlm.model.params import COLUMN_FFN, COLUMN_QKV, CONJ, ROW_FFN, ROW_HEADS, lookup, qkv_blocks

Ranges = list[tuple[int, int]]


@dataclass(frozen=True)
class Shard:
    """Which slice of the full model an instance holds.

    Sub-layers [sub_start, sub_start + sub_count) of every layer, and within each of them part
    ``part`` of ``parts`` of the heads and FFN columns (Megatron). The full model is Shard.full().
    """

    sub_start: int = 0
    sub_count: int = 1
    part: int = 0
    parts: int = 1

    @staticmethod
    def full(config: ModelConfig) -> Shard:
        return Shard(0, config.n_sub, 0, 1)

    def attention(self, config: ModelConfig) -> AttentionShape:
        kv = config.kv_heads
        return AttentionShape(config.n_head // self.parts, kv // self.parts if kv % self.parts == 0 else 1,
                              config.head_size)

    def validate(self, config: ModelConfig) -> None:
        """Raise ConfigError if the model cannot be split this way."""
        if config.n_sub % self.sub_count or self.sub_start % self.sub_count or self.sub_start >= config.n_sub:
            raise ConfigError(f"tp: cannot place sub-layers [{self.sub_start}, {self.sub_start + self.sub_count}) "
                              f"of a model with n_sub={config.n_sub}")
        for what, n in (("n_head", config.n_head), ("ffn_size", config.ffn_size), ("n_embd", config.n_embd)):
            if n % self.parts:
                raise ConfigError(f"tp: {what}={n} is not divisible by the {self.parts} ranks sharing a sub-layer")
        kv = config.kv_heads
        if kv % self.parts and self.parts % kv:
            raise ConfigError(f"tp: n_kv_head={kv} must divide or be divisible by {self.parts} ranks per sub-layer")

    def vocab_part(self, config: ModelConfig) -> tuple[int, int]:
        """The vocabulary rows [a, b) this shard projects when the ranks split the LM head: the rank's index
        among all shards of the model (a ParallelPlan's rank order) times ceil(V / ranks); the last may be
        shorter."""
        ranks = config.n_sub // self.sub_count * self.parts
        index = self.sub_start // self.sub_count * self.parts + self.part
        per = -(-config.vocab_size // ranks)
        return min(config.vocab_size, index * per), min(config.vocab_size, (index + 1) * per)



def _part(total: int, shard: Shard) -> Ranges:
    size = total // shard.parts
    return [(shard.part * size, (shard.part + 1) * size)]


def _qkv_rows(config: ModelConfig, shard: Shard) -> Ranges:
    hs, h, kv = config.head_size, config.n_head, config.kv_heads
    (q0, _), (k0, _), (v0, _) = qkv_blocks(config)
    if kv % shard.parts == 0:
        k_heads = _part(kv, shard)
    else:  # fewer kv heads than ranks: each rank keeps the one kv head its query heads use
        first_q = shard.part * (h // shard.parts)
        group = first_q // (h // kv)
        k_heads = [(group, group + 1)]
    return [(start + a * hs, start + b * hs) for start, heads in ((q0, _part(h, shard)), (k0, k_heads), (v0, k_heads))
            for a, b in heads]


def split_ranges(split: str, config: ModelConfig, shard: Shard) -> Ranges:
    """The indices of the split dimension (output rows of column-*, input columns of row-*) that part
    ``shard.part`` of ``shard.parts`` keeps of one sub-layer."""
    ffn = config.ffn_size
    if split == COLUMN_QKV:
        return _qkv_rows(config, shard)
    if split == ROW_HEADS:
        return [(a * config.head_size, b * config.head_size) for a, b in _part(config.n_head, shard)]
    if split == COLUMN_FFN and config.mlp == "swiglu":  # gate and up halves are split separately
        return _part(ffn, shard) + [(ffn + a, ffn + b) for a, b in _part(ffn, shard)]
    return _part(ffn, shard)


def gathered_ffn_rows(rows: list[int], config: ModelConfig) -> list[int] | None:
    """The order a column-ffn weight's rows gathered from several ranks must take: SwiGLU's [gates | ups]
    with the ups in the gates' order (None: as gathered)."""
    if config.mlp != "swiglu":
        return None
    gates = [i for i in rows if i < config.ffn_size]
    return gates + [i + config.ffn_size for i in gates]


def shard_ranges(name: str, shape: tuple[int, ...], config: ModelConfig, shard: Shard) -> list[Ranges]:
    """Per-dimension ranges of the full tensor ``name`` (native naming, int8 parts too) kept by ``shard``."""
    param, _, part = lookup(name)
    weight_shape = shape + (1,) if part == "scale" else shape  # a scale splits as its weight, less the input dim
    ranges: list[Ranges] = [[(0, n)] for n in weight_shape]
    if param.split == CONJ:
        d = config.n_embd
        w = d // shard.parts
        ranges[1] = [((shard.sub_start + s) * d + shard.part * w, (shard.sub_start + s) * d + (shard.part + 1) * w)
                     for s in range(shard.sub_count)]
    if param.per_layer:
        ranges[0] = [(shard.sub_start, shard.sub_start + shard.sub_count)]
    if param.split in (COLUMN_QKV, COLUMN_FFN):
        ranges[1] = split_ranges(param.split, config, shard)
    elif param.split in (ROW_HEADS, ROW_FFN):
        ranges[2] = split_ranges(param.split, config, shard)
    return ranges[:len(shape)]


def take(read: Callable[[tuple[slice, ...]], Tensor], ranges: list[Ranges]) -> Tensor:
    """Read the blocks named by ``ranges`` (at most one dimension with several ranges) and join them."""
    multi = [i for i, r in enumerate(ranges) if len(r) > 1]
    if not multi:
        return read(tuple(slice(a, b) for (a, b), in ranges))
    dim = multi[0]
    pieces = []
    for a, b in ranges[dim]:
        index = tuple(slice(a, b) if i == dim else slice(r[0][0], r[0][1]) for i, r in enumerate(ranges))
        pieces.append(read(index))
    return torch.cat(pieces, dim=dim)


def shard_state_dict(state: dict[str, Tensor], config: ModelConfig, shard: Shard) -> dict[str, Tensor]:
    """Slice a full native state dict down to one shard."""
    return {name: take(lambda index, t=t: t[index], shard_ranges(name, tuple(t.shape), config, shard)).contiguous()
            for name, t in state.items()}
