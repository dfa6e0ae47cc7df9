"""ModelConfig: one validated description of a gpt, parallel-block, Kraken or Ladder Residual model.

The same config feeds the model, the tensor-parallel plans, the trainer, the benchmarks and the
cost model, so a prediction and a measurement always talk about the same thing.

Kraken's N sub-layers are a leading dimension of every per-layer weight; a GPT or parallel-block
model is simply the N = 1 case, which is what lets one forward schedule serve all three. A ladder
model (Zhang et al. 2025, "Ladder-residual") has a gpt model's weights and a different wiring: each
module reads the residual stream without the previous module's output.

Llama-family blocks are options of every architecture: RMSNorm (``norm``), RoPE with a configurable
base (``position``, ``rope_theta``), SwiGLU (``mlp``), GQA/MQA (``n_kv_head``) and an untied LM head
(``tie_embeddings``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from krakenlm.errors import ConfigError
from krakenlm.jsonio import read_json
from krakenlm.validation import check_float, check_int

ARCHS = ("gpt", "parallel", "kraken", "ladder")
# Any size field past this is a typo (10**400 in a JSON file): sizes derived from it would overflow float
# arithmetic before the memory check could refuse them by name. Real models are ~1e5 wide.
MAX_SIZE = 1 << 40
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
SIZE_FIELDS = ("n_layer", "n_embd", "n_head", "vocab_size", "block_size")  # no default may stand in for these


def dataclass_fields(cls: type, data: Any, what: str) -> dict[str, Any]:
    """`data` checked to hold only `cls`'s fields and all its required ones, so a typo in a JSON file
    is named instead of surfacing as a TypeError (or being ignored)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a JSON object, got {type(data).__name__}")
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{what}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    missing = sorted(f.name for f in fields if f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING and f.name not in data)
    if missing:
        raise ConfigError(f"{what}: missing field(s) {missing}")
    return data


@dataclass(frozen=True)
class ModelConfig:
    """Shape and wiring of a model. Every invalid field raises ConfigError naming it.

    For Kraken, ``n_embd`` is the width d of one sub-layer and ``n_head`` the heads *per
    sub-layer*; the paper's "total heads" is ``n_head * n_sub``. For ladder, ``ladder_layers`` is how
    many of the last layers use ladder wiring (None: all; fewer is the Ladder paper's adaptation of a
    pretrained model, whose lower layers stay standard).
    """

    arch: str = "gpt"
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    n_sub: int = 1
    n_kv_head: int | None = None
    head_dim: int | None = None
    ffn_hidden: int | None = None
    vocab_size: int = 50304
    block_size: int = 1024
    bias: bool = False
    mlp: str = "gelu"
    position: str = "learned"
    norm_eps: float = 1e-5
    norm: str = "layernorm"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    ladder_layers: int | None = None
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        _check(self.arch in ARCHS, "arch", f"must be one of {ARCHS}, got {self.arch!r}")
        _check(self.mlp in MLPS, "mlp", f"must be one of {MLPS}, got {self.mlp!r}")
        _check(self.position in POSITIONS, "position", f"must be one of {POSITIONS}, got {self.position!r}")
        _check(self.norm in NORMS, "norm", f"must be one of {NORMS}, got {self.norm!r}")
        for name in ("n_layer", "n_embd", "n_head", "n_sub", "vocab_size", "block_size"):
            check_int(getattr(self, name), name, maximum=MAX_SIZE)
        for name in ("bias", "tie_embeddings"):
            _check(isinstance(getattr(self, name), bool), name, f"must be true or false, got {getattr(self, name)!r}")
        check_float(self.norm_eps, "norm_eps", minimum=0, exclusive=True)
        check_float(self.rope_theta, "rope_theta", minimum=0, exclusive=True)
        if self.arch != "kraken":
            _check(self.n_sub == 1, "n_sub", f"must be 1 for arch={self.arch!r} (only kraken has sub-layers)")
        if self.arch == "ladder":
            k = self.ladder_layers
            _check(k is None or (isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= self.n_layer),
                   "ladder_layers", f"must be null or an integer in [0, n_layer={self.n_layer}], got {k!r}")
        else:
            _check(self.ladder_layers is None, "ladder_layers", f"only applies to arch='ladder', not {self.arch!r}")
        for name in ("n_kv_head", "head_dim", "ffn_hidden"):
            check_int(getattr(self, name), name, maximum=MAX_SIZE, optional=True)
        if self.head_dim is None:
            _check(self.n_embd % self.n_head == 0, "n_head",
                   f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; set head_dim explicitly")
        _check(self.n_head % self.kv_heads == 0, "n_kv_head",
               f"n_head={self.n_head} must be a multiple of n_kv_head={self.kv_heads}")
        if self.position == "rope":
            _check(self.head_size % 2 == 0, "head_dim", f"rope needs an even head size, got {self.head_size}")

    # Derived shapes -------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    def padded_head_size(self, multiple: int) -> int:
        """Head size rounded up to `multiple`: the shape `Transformer.pad_heads` serves (zeros, exact)."""
        return -(-self.head_size // multiple) * multiple

    @property
    def ffn_size(self) -> int:
        """FFN hidden width: 4d for GPT-style blocks, 2d for Kraken (paper default)."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 2 * self.n_embd if self.arch == "kraken" else 4 * self.n_embd

    @property
    def total_heads(self) -> int:
        return self.n_head * self.n_sub

    @property
    def has_conjunction(self) -> bool:
        return self.arch == "kraken"

    @property
    def ladder_start(self) -> int:
        """First layer with ladder wiring (n_layer: none, i.e. a standard model)."""
        if self.arch != "ladder":
            return self.n_layer
        return self.n_layer - (self.n_layer if self.ladder_layers is None else self.ladder_layers)

    @property
    def norm_params(self) -> int:
        """Parameters of one norm over d (RMSNorm has a gain only; LayerNorm a gain and, with bias, a shift)."""
        return self.n_embd * (2 if self.bias and self.norm == "layernorm" else 1)

    # Parameter accounting ------------------------------------------------------------------
    def layer_params(self) -> int:
        """Parameters of one layer (all N sub-layers), norms and biases included."""
        d, hd = self.n_embd, self.head_size
        q, kv = self.n_head * hd, self.kv_heads * hd
        attn = d * (q + 2 * kv) + q * d + (q + 2 * kv + d if self.bias else 0)
        ffn_in = (2 if self.mlp == "swiglu" else 1) * self.ffn_size
        ffn = d * ffn_in + self.ffn_size * d + (ffn_in + d if self.bias else 0)
        n_norms = 1 if self.arch == "parallel" else 2
        return self.n_sub * (attn + ffn + n_norms * self.norm_params)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Total parameters, counted as the Kraken paper does (position embeddings included; an untied
        LM head counts with the embeddings)."""
        d = self.n_embd
        total = self.n_layer * self.layer_params()
        total += self.norm_params  # final norm
        if self.has_conjunction:
            total += self.n_sub * d * d + (d if self.bias else 0)
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
            if self.position == "learned":
                total += self.block_size * d
        return total

    # Serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], required: tuple[str, ...] = ()) -> ModelConfig:
        """A config from JSON-like data; `required` fields must be stated (no silent defaults for them)."""
        missing = [name for name in required if isinstance(data, dict) and name not in data]
        if missing:
            raise ConfigError(f"config: missing field(s) {missing} (a default would silently change the model)")
        return cls(**dataclass_fields(cls, data, "config"))

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """A user's config file: it must state the size fields (n_layer, n_embd, n_head, vocab_size, block_size)."""
        return cls.from_dict(read_json(path, "config"), SIZE_FIELDS)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def as_ladder(self, layers: int | None = None) -> ModelConfig:
        """The same weights with the last ``layers`` layers (None: all) in ladder wiring: the Ladder
        paper's adaptation of a pretrained standard model (which it then briefly retrains)."""
        if self.arch not in ("gpt", "ladder"):
            raise ConfigError(f"arch: only gpt models convert to ladder wiring (same weights), not {self.arch!r}")
        return self.replace(arch="ladder", ladder_layers=layers)


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


# The sizing rule ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class KrakenSize:
    n_embd: int
    n_head: int  # per sub-layer
    params: int


def _exact_width(budget: int, n_layer: int, n_sub: int, w: int, per_layer: bool, embedding_rows: int) -> float:
    """The real width d whose parameter count is ``budget``: a quadratic in d (``w`` d^2 per sub-layer's matmuls)."""
    if per_layer:
        return math.sqrt(budget / (n_sub * w))
    a = n_layer * n_sub * w + n_sub  # P = L*N*(w d^2 + 2d) + N d^2 + d + (V + block) d
    b = n_layer * n_sub * 2 + 1 + embedding_rows
    return (-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a)


def size_kraken(
    budget: int,
    n_layer: int,
    total_heads: int,
    n_sub: int,
    *,
    per_layer: bool = False,
    vocab_size: int = 50304,
    block_size: int = 1024,
    ffn_mult: int = 2,
    hardware_friendly: bool = False,
    head_dim: int = 64,
) -> KrakenSize:
    """Width d of a Kraken model matching a parameter budget.

    Rule (the paper's): solve the parameter count, a quadratic in d, for the budget and round d to
    the *nearest* multiple of the heads per sub-layer (total_heads / n_sub). With per_layer=True the
    budget is parameters per layer (matmul weights only, as in the latency study), i.e.
    n_sub * (4 + 2*ffn_mult) * d^2 = budget.

    hardware_friendly=True rounds d to the nearest multiple of 64 and picks the head count so the
    head size is ``head_dim`` (a multiple of 64): odd widths like d=678 / head size 113 make slow
    matmul and attention kernels on real hardware.
    """
    for name, value in (("budget", budget), ("n_layer", n_layer), ("total_heads", total_heads), ("n_sub", n_sub),
                        ("vocab_size", vocab_size), ("block_size", block_size), ("ffn_mult", ffn_mult),
                        ("head_dim", head_dim)):
        _check(isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1 << 50, name,
               f"must be a positive integer (at most 2**50), got {value!r}")
    if total_heads % n_sub:
        raise ConfigError(f"n_sub: total_heads={total_heads} is not divisible by n_sub={n_sub}")
    heads = total_heads // n_sub
    w = 4 + 2 * ffn_mult
    exact = _exact_width(budget, n_layer, n_sub, w, per_layer, vocab_size + block_size)
    step = head_dim if hardware_friendly else heads
    if round(exact / step) < 1:  # the nearest width would be 0: the budget cannot buy one head per sub-layer
        smallest = ModelConfig(arch="kraken", n_layer=n_layer, n_embd=step, n_head=step // head_dim if
                               hardware_friendly else heads, n_sub=n_sub, ffn_hidden=ffn_mult * step,
                               vocab_size=vocab_size, block_size=block_size)
        size = n_sub * w * step ** 2 if per_layer else smallest.num_params()
        raise ConfigError(f"budget: {budget} parameters{' per layer' if per_layer else ''} is too small for a "
                          f"{n_sub}-way Kraken model with {n_layer} layers and {total_heads} heads: its smallest "
                          f"width (d = {step}) already has {size} parameters{' per layer' if per_layer else ''}")
    if hardware_friendly:
        if heads > exact:  # the heads asked for are ignored here, but a count no width could hold is a mistake
            raise ConfigError(f"total_heads: {total_heads} heads ({heads} per sub-layer) do not fit the width this "
                              f"budget buys (d ~ {exact:.0f}); hardware-friendly sizing picks {head_dim}-wide heads")
        if head_dim % 64:
            raise ConfigError(f"head_dim: hardware-friendly sizing needs a multiple of 64, got {head_dim}")
        d = max(64, round(exact / 64) * 64)
        d = max(head_dim, round(d / head_dim) * head_dim)
        heads = d // head_dim
    else:
        d = max(heads, round(exact / heads) * heads)
    cfg = ModelConfig(arch="kraken", n_layer=n_layer, n_embd=d, n_head=heads, n_sub=n_sub,
                      ffn_hidden=ffn_mult * d, vocab_size=vocab_size, block_size=block_size)
    return KrakenSize(n_embd=d, n_head=heads, params=cfg.num_params())
