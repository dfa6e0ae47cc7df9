"""One rank's model for a partitioning layout or int8 weights: the full model, quantized, then cut down
to this rank's slices (a plan's ranges applied to every tensor).

Quantizing before cutting keeps every row's scale that of the whole row, so a sharded int8 model
computes what the one-device int8 model computes. Building from the full model costs one full copy per
rank while it loads; the Megatron path without int8 keeps reading only its own slices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from krakenlm.config import ModelConfig
from krakenlm.model.params import lookup, owner_of, shapes
from krakenlm.model.quant import check_shapes, quantize_model
from krakenlm.model.sharding import Shard, shard_ranges
from krakenlm.model.transformer import Transformer
from krakenlm.parallel.layouts import Ranges, RankPlan, slice_tensor

RangesFn = Callable[[str, tuple[int, ...]], tuple[list[Ranges], bool]]


def shard_ranges_of(config: ModelConfig, shard: Shard) -> RangesFn:
    """Megatron / Kraken ranges (model.sharding) for float and int8 tensor names (``.q``, ``.scale``)."""
    def ranges(name: str, shape: tuple[int, ...]) -> tuple[list[Ranges], bool]:
        return shard_ranges(name, shape, config, shard), False
    return ranges


@dataclass
class RankModel:
    """A rank's model and what it holds: every stored byte, and the part kept whole on every rank."""

    model: Transformer
    weights_bytes: int
    replicated_bytes: int
    extras: dict[str, Tensor] = field(default_factory=dict)  # whole W_in biases / int8 scales (wg-* only)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _is_whole(ranges: list[Ranges], shape: tuple[int, ...]) -> bool:
    return all(r == [(0, d)] for r, d in zip(ranges, shape, strict=True))


def localize(model: Transformer, ranges: RangesFn, keep: Callable[[str], bool] = lambda _: False
             ) -> dict[str, Tensor]:
    """Cut every parameter and buffer of the full ``model`` to its ranges, in place; returns the whole
    tensors ``keep`` names (copies taken before cutting)."""
    kept = {}
    for name, tensor in list(model.state_dict(keep_vars=True).items()):
        if keep(name):
            kept[name] = tensor.detach().clone()
        rg, zero = ranges(name, tuple(tensor.shape))
        if _is_whole(rg, tuple(tensor.shape)) and not zero:
            continue
        local = slice_tensor(tensor.detach(), rg)
        if zero:
            local = torch.zeros_like(local)
        owner_name, leaf = owner_of(name)
        owner = model.get_submodule(owner_name) if owner_name else model
        if isinstance(tensor, nn.Parameter):
            owner._parameters[leaf] = nn.Parameter(local, requires_grad=False)
        else:
            owner._buffers[leaf] = local
    return kept


def _held(model: Transformer, ranges: RangesFn, full: dict[str, tuple[int, ...]], extras: dict[str, Tensor]
          ) -> tuple[int, int]:
    total = sum(_nbytes(t) for t in model.state_dict().values()) + sum(_nbytes(t) for t in extras.values())
    whole = sum(_nbytes(t) for name, t in model.state_dict().items()
                if _is_whole(ranges(name, full[name])[0], full[name]) and not ranges(name, full[name])[1])
    return total, whole + sum(_nbytes(t) for t in extras.values())


def build_rank_model(full: Transformer, shard: Shard, plan: RankPlan | None, quantize: str | None,
                     dtype: torch.dtype, device: torch.device) -> RankModel:
    """``full`` (the whole model, consumed) as this rank's model: quantized when asked, then cut to the
    layout ``plan``'s storage (None: the Megatron / Kraken ``shard``)."""
    config = full.config
    if quantize:
        quantize_model(full)
    full_shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    ranges = shard_ranges_of(config, shard) if plan is None else plan.storage.ranges
    gathers = plan is not None and plan.tp > 1 and (plan.layout.prefill.gathered or plan.layout.decode.gathered)

    def keep(name: str) -> bool:  # a weight-gathered phase indexes whole W_in biases and int8 scales
        param, _, part = lookup(name)
        return gathers and param.matrix is not None and (param.bias or part == "scale")

    extras = localize(full, ranges, keep)
    if plan is None:
        full.shard = shard
        shape = shard.attention(config)
    else:
        shape = plan.storage.attention_shape()
    for layer in full.layers:
        layer.attn.shape = shape
    if quantize:
        check_shapes(full, device.type, dtype)
    model = full.to(device=device, dtype=dtype).eval()
    extras = {k: v.to(device=device, dtype=dtype) for k, v in extras.items()}
    weights, replicated = _held(model, ranges, full_shapes, extras)
    return RankModel(model, weights, replicated, extras)


def held_bytes(model: Transformer, config: ModelConfig, shard: Shard) -> tuple[int, int]:
    """(weights, replicated) bytes of a Megatron / Kraken shard built the usual way (no int8)."""
    return _held(model, shard_ranges_of(config, shard), shapes(config), {})

