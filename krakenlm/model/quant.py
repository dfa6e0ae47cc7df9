"""int8 weight-only quantization: per-output-channel symmetric int8 weights, activations unchanged.

A matmul weight W [..., out, in] becomes q = round(W / s) in [-127, 127] with one scale per output
row, s = max|W[row]| / 127, kept in the activation dtype. x @ W^T is computed as (x @ q^T) * s, so the
scale never touches the int8 values: the matmul reads 1 byte per weight (Pope et al.'s int8 gain
comes from memory-bound decode reading half the bytes of bf16).

Quantization is done on the full (single-device) weights before any sharding, so every rank's rows
carry the scale of the whole row and a tensor-parallel model computes what the one-device int8 model
computes. Kernels, chosen per device (``KERNELS``):

- ``int8pack``: torch._weight_int8pack_mm (CPU): int8 weights read directly by a packed kernel.
- ``dequant``: the weight converted to the activation dtype, then the ordinary matmul (CUDA: cuBLAS;
  PyTorch's CUDA int8pack kernel is a one-thread-per-output loop, not a tuned GEMM).
Under torch.compile a one-row product is a reduction (layers.row_linear) the compiler fuses with the
int8 -> float conversion, so the compiled decode step reads int8 on every device.
A device whose preferred kernel does not run falls back to ``dequant`` (checked once, by a probe).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from krakenlm.errors import ConfigError

QUANTIZE = ("int8",)
# device type -> preferred kernel; shape rules of a kernel: (name, test on (out, in)) pairs.
KERNELS = {"cpu": "int8pack", "mps": "int8pack", "cuda": "dequant"}
SHAPE_RULES: dict[tuple[str, str], tuple[tuple[str, object], ...]] = {
    ("mps", "int8pack"): (("out % 32 == 0", lambda o, i: o % 32 == 0), ("in % 32 == 0", lambda o, i: i % 32 == 0)),
}


def quantize(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 values, per-row scales in float32) of ``weight`` [..., out, in]; an all-zero row gets scale 1."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


@functools.cache
def kernel_for(device_type: str, dtype: torch.dtype) -> str:
    """The kernel this device uses for activations of ``dtype``: its preferred one if a probe runs."""
    name = KERNELS.get(device_type, "int8pack")
    if name == "int8pack":
        try:
            x = torch.ones(2, 4, dtype=dtype, device=device_type)
            q = torch.ones(3, 4, dtype=torch.int8, device=device_type)
            torch._weight_int8pack_mm(x, q, torch.ones(3, dtype=dtype, device=device_type))
        except (RuntimeError, NotImplementedError):
            return "dequant"
    return name


def check_shapes(shapes: dict[str, tuple[int, int]], device_type: str, dtype: torch.dtype) -> None:
    """Refuse, at start-up, an int8 matrix shape (out, in) that this device's kernel does not take."""
    kernel = kernel_for(device_type, dtype)
    for name, (out, inp) in shapes.items():
        for rule, ok in SHAPE_RULES.get((device_type, kernel), ()):
            if not ok(out, inp):  # type: ignore[operator]
                raise ConfigError(f"quantize: the int8 kernel {kernel!r} on {device_type} needs {rule}; {name} is "
                                  f"{out} x {inp} on this rank (choose another layout or no quantization)")


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

    def matmul(self, x: Tensor) -> Tensor:
        """x [M, in] @ W^T for a 2-D weight, or x [S, M, in] @ W[s]^T for a stacked one [S, out, in]."""
        if self.q.dim() == 3:
            return torch.stack([int8_mm(x[s], self.q[s], self.scale[s]) for s in range(self.q.shape[0])])
        return int8_mm(x, self.q, self.scale)


def int8_mm(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x [M, in] @ (q * scale)^T with the device's kernel."""
    if kernel_for(x.device.type, x.dtype) == "int8pack":
        return torch._weight_int8pack_mm(x.contiguous(), q, scale)
    return F.linear(x, q.to(x.dtype)) * scale


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with per-row scales (the tied LM head's output channels)."""

    def __init__(self, weight: Int8Weight) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, idx: Tensor) -> Tensor:
        return self.weight.q[idx].to(self.weight.scale.dtype) * self.weight.scale[idx].unsqueeze(-1)


# Names of the matmul weights quantized (every matmul of the model, the tied embedding included).
QUANTIZED = ("attn.qkv_weight", "attn.proj_weight", "mlp.up_weight", "mlp.down_weight", "conj_weight", "wte.weight",
             "wpe.weight")


def quantize_model(model: nn.Module) -> nn.Module:
    """Replace every weight named in QUANTIZED by its int8 form, in place (weights stay on their device)."""
    for name, param in list(model.named_parameters()):
        if not name.endswith(QUANTIZED):
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        q, scale = quantize(param)
        weight = Int8Weight(q, scale.to(param.dtype))
        if isinstance(owner, nn.Embedding):
            parent_name, _, attr = owner_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, Int8Embedding(weight))
        else:
            delattr(owner, leaf)
            setattr(owner, leaf, weight)
    return model
