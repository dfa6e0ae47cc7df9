"""int8 weight-only quantization: per-output-channel symmetric int8 weights, activations unchanged.

A matmul weight W [..., out, in] becomes q = round(W / s) in [-127, 127] with one scale per output
row, s = max|W[row]| / 127, kept in the activation dtype. x @ W^T is computed as (x @ q^T) * s, so the
scale never touches the int8 values: the matmul reads 1 byte per weight (Pope et al.'s int8 gain
comes from memory-bound decode reading half the bytes of bf16).

Quantization is done on the full (single-device) weights before any sharding, so every rank's rows
carry the scale of the whole row and a tensor-parallel model computes what the one-device int8 model
computes. Kernels (``int8_mm``), chosen per device, activation dtype and number of rows M:

- ``int8pack``: torch._weight_int8pack_mm, which reads the int8 weights directly. On the CPU it wins
  for 16-bit activations and few rows (measured, AMD EPYC, one thread, 768 -> 3072: M=1 0.10 ms vs
  bf16 0.28 ms; M=8 0.41 vs 0.32; M=16 1.09 vs 0.42) and is a slow reference loop for fp32.
- ``dequant``: the weight converted to the activation dtype, then the ordinary GEMM (prefill-sized
  M, fp32 activations, and CUDA, whose int8pack kernel is a one-thread-per-output loop).
Under torch.compile a one-row product is a reduction (gemm.row_linear) the compiler fuses with the
int8 -> float conversion, so the compiled decode step reads int8 on every device. A device where
int8pack does not run (a probe, once) falls back to dequant.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from krakenlm.errors import ConfigError
from krakenlm.model.gemm import row_linear
from krakenlm.model.layers import single_row
from krakenlm.model.params import lookup, owner_of

QUANTIZE = ("int8",)
INT8PACK_MAX_ROWS = 4  # above this the CPU's int8pack kernel loses to convert + GEMM (docstring)
INT8PACK_DEVICES = ("cpu", "mps")
# Shapes the int8pack kernel takes, per (device, activation dtype): (rule, test on (out, in)). MPS checks
# its own; the CPU bf16 kernel does not check and crashes the process (measured, torch 2.13) unless in % 16 == 0.
SHAPE_RULES: dict[tuple[str, torch.dtype], tuple[tuple[str, Callable[[int, int], bool]], ...]] = {
    ("mps", torch.bfloat16): (("out % 32 == 0", lambda o, i: o % 32 == 0), ("in % 32 == 0", lambda o, i: i % 32 == 0)),
    ("mps", torch.float16): (("out % 32 == 0", lambda o, i: o % 32 == 0), ("in % 32 == 0", lambda o, i: i % 32 == 0)),
    ("cpu", torch.bfloat16): (("in % 16 == 0", lambda o, i: i % 16 == 0),),
}


def quantize(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 values, per-row scales in float32) of ``weight`` [..., out, in]; an all-zero row gets scale 1."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


@functools.cache
def int8pack_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch's int8pack kernel exists for this device and activation dtype (a probe, once)."""
    if device_type not in INT8PACK_DEVICES or dtype == torch.float32:
        return False
    try:  # a shape every kernel takes (SHAPE_RULES)
        x = torch.ones(2, 64, dtype=dtype, device=device_type)
        q = torch.ones(32, 64, dtype=torch.int8, device=device_type)
        torch._weight_int8pack_mm(x, q, torch.ones(32, dtype=dtype, device=device_type))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def kernel_for(device_type: str, dtype: torch.dtype, rows: int) -> str:
    """``int8pack`` or ``dequant`` for ``rows`` activation rows (module docstring)."""
    return "int8pack" if rows <= INT8PACK_MAX_ROWS and int8pack_runs(device_type, dtype) else "dequant"


def check_shapes(model: nn.Module, device_type: str, dtype: torch.dtype) -> None:
    """Refuse, at start-up, an int8 matrix (out x in on this rank) that the int8pack kernel of this device
    and activation dtype does not take: a decode step would hit it."""
    for name, module in model.named_modules():
        if isinstance(module, Int8Weight):
            out, inp = module.q.shape[-2:]
            for rule, ok in SHAPE_RULES.get((device_type, dtype), ()):
                if not ok(out, inp):
                    raise ConfigError(f"quantize: the int8 kernel on {device_type} for {str(dtype)[6:]} needs {rule}; "
                                      f"{name} is {out} x {inp} on this rank (choose another layout, tensor-parallel "
                                      "degree or dtype, or no quantization)")


def int8_mm(x: Tensor, q: Tensor, scale: Tensor, kernel: str | None = None) -> Tensor:
    """x [M, in] @ (q * scale)^T with the kernel for this device, dtype and M (or the one named)."""
    kernel = kernel or kernel_for(x.device.type, x.dtype, x.shape[0])
    if kernel == "int8pack":
        return torch._weight_int8pack_mm(x.contiguous(), q, scale)
    return F.linear(x, q.to(x.dtype)) * scale


class Int8Weight(nn.Module):
    """A quantized matmul weight: int8 ``q`` [..., out, in] and ``scale`` [..., out] (buffers, so
    ``.to(dtype)`` converts the scales and leaves the int8 values alone)."""

    def __init__(self, q: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    def dequantized(self) -> Tensor:
        """The float weight this int8 weight stands for (the reference its matmuls must equal)."""
        return self.q.to(self.scale.dtype) * self.scale.unsqueeze(-1)

    def linear(self, x: Tensor) -> Tensor:
        """x [M, in] @ W^T for a 2-D weight, or x [S, M, in] @ W[s]^T for a stacked one [S, out, in]: what the
        model's linear helpers call on a weight that is a module. One row under torch.compile is a
        reduction the int8 -> float conversion fuses into."""
        if single_row(x):
            return row_linear(x, self.q) * self.scale.unsqueeze(-2)
        if self.q.dim() == 3:
            return torch.stack([int8_mm(x[s], self.q[s], self.scale[s]) for s in range(self.q.shape[0])])
        return int8_mm(x, self.q, self.scale)


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with per-row scales (the tied LM head's output channels)."""

    def __init__(self, weight: Int8Weight) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, idx: Tensor) -> Tensor:
        return self.weight.q[idx].to(self.weight.scale.dtype) * self.weight.scale[idx].unsqueeze(-1)


def quantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantizable weight (krakenlm.model.params: every matmul, the embedding and an untied
    LM head included) by its int8 form, in place (weights stay on their device)."""
    for name, param in list(model.named_parameters()):
        if not lookup(name)[0].quantizable:
            continue
        owner_name, leaf = owner_of(name)
        owner = model.get_submodule(owner_name) if owner_name else model
        q, scale = quantize(param)
        weight = Int8Weight(q, scale.to(param.dtype))
        if isinstance(owner, nn.Embedding):
            parent_name, attr = owner_of(owner_name)
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, Int8Embedding(weight))
        else:
            delattr(owner, leaf)
            setattr(owner, leaf, weight)
    return model
