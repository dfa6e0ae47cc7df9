"""Every parameter of every architecture, as data: the one place that says what a weight is called, its
shape, how it starts, whether int8 quantizes it, how tensor parallelism splits it and what other code
bases call it. Sharding (model.sharding), the partitioning layouts, the rank models, quantization, init
and every importer / exporter read this table; nothing else parses parameter names.

Native names: per-layer tensors are ``layers.{i}.<leaf>`` and carry a leading sub-layer (stream)
dimension [N, ...]; so does the final norm ([1, d]). A quantized matmul weight ``w`` becomes the
buffers ``w.q`` and ``w.scale`` (krakenlm.model.quant), which split as ``w`` does (a scale has no input
dimension).

Megatron / Kraken splits (model.sharding computes the ranges; a per-layer tensor first keeps only its
rank's sub-layers):
    column-qkv   output rows of the fused q|k|v: the rank's q heads and the k/v heads they use
    column-ffn   output rows: an even 1/T of the FFN width (SwiGLU: of the gate half and of the up half)
    row-heads    input columns: the rank's heads
    row-ffn      input columns: an even 1/T of the FFN width
    conj         input columns: for each held sub-layer, its 1/T part of that sub-layer's d block
    sub-layer    per-layer vectors, whole within each held sub-layer (norms, out-projection biases)
    replicated   whole on every rank (embeddings, final norm, LM head, conjunction bias)
The partitioning layouts (parallel.layouts) split the column-* tensors as a pair's W_in and the row-*
ones as its W_out, and keep the rest whole.

Foreign names: ``gpt2`` is the name in the GPT-2 family (HF GPT-2, nanoGPT and the Kraken authors'
nanoGPT-derived checkpoints; per block, one tensor per sub-layer); ``llama`` the HF Llama tensors
concatenated along dim 0 (q|k|v, gate|up). FORMATS says how each format prefixes blocks and whether
it transposes matmul weights. The Hugging Face export (krakenlm.interop) writes native names verbatim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from krakenlm.config import ModelConfig
from krakenlm.errors import ConfigError

COLUMN_QKV, COLUMN_FFN, ROW_HEADS, ROW_FFN = "column-qkv", "column-ffn", "row-heads", "row-ffn"
CONJ, SUB_LAYER, REPLICATED = "conj", "sub-layer", "replicated"
NORMAL, RESIDUAL, ONES, ZEROS = "normal", "residual", "ones", "zeros"  # N(0, 0.02), N(0, 0.02/sqrt(2LN)), 1, 0
INT8_PARTS = ("q", "scale")  # the buffers a quantized weight is stored as

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Param:
    """One kind of parameter (the module docstring explains the fields' vocabularies)."""

    leaf: str  # native name; per-layer ones under "layers.{i}."
    split: str  # Megatron / Kraken split
    init: str
    present: Callable[[ModelConfig], bool]
    shape: Callable[[ModelConfig], Shape]  # the full (single-device) shape
    per_layer: bool = True
    stacked: bool = True  # dim 0 is the sub-layer (stream) dimension (per-layer tensors and the final norm)
    quantizable: bool = False
    matrix: str | None = None  # the layout pair matrix this weight or bias belongs to
    gpt2: str | None = None
    llama: tuple[str, ...] = ()
    ties_to: str | None = None  # a tied LM head: absent, the embedding ``ties_to`` serves instead

    @property
    def bias(self) -> bool:
        """Biases, and only they, start at zero."""
        return self.init == ZEROS

    @property
    def side(self) -> str | None:
        """The pair side under a partitioning layout: ``in`` (W_in), ``out`` (W_out) or None (kept whole)."""
        return {COLUMN_QKV: "in", COLUMN_FFN: "in", ROW_HEADS: "out", ROW_FFN: "out"}.get(self.split)

    @property
    def owner(self) -> str:
        """The module holding it, relative to its layer (or the model): ``attn`` of ``attn.qkv_weight``."""
        return owner_of(self.leaf)[0]

    @property
    def attr(self) -> str:
        return owner_of(self.leaf)[1]

    def name(self, layer: int | None = None) -> str:
        return f"layers.{layer}.{self.leaf}" if self.per_layer else self.leaf

    def names_in(self, fmt: Format) -> tuple[str, ...]:
        """Its names in a foreign format (per-layer ones relative to the block)."""
        value = getattr(self, fmt.field)
        return (value,) if isinstance(value, str) else value or ()


def _qkv(c: ModelConfig) -> int:
    return (c.n_head + 2 * c.kv_heads) * c.head_size


def _up(c: ModelConfig) -> int:
    return (2 if c.mlp == "swiglu" else 1) * c.ffn_size


def _always(c: ModelConfig) -> bool:
    return True


def _bias(c: ModelConfig) -> bool:
    return c.bias


def _norm_bias(c: ModelConfig) -> bool:
    return c.bias and c.norm == "layernorm"


def _two_norms(c: ModelConfig) -> bool:
    return c.arch != "parallel"


def _vec(c: ModelConfig) -> Shape:
    return (c.n_sub, c.n_embd)


# In state_dict order: a module's own parameters, then its submodules'.
PARAMS: tuple[Param, ...] = (
    Param("conj_weight", CONJ, NORMAL, lambda c: c.has_conjunction, lambda c: (c.n_embd, c.n_sub * c.n_embd),
          per_layer=False, stacked=False, quantizable=True, gpt2="conjunction.weight"),
    Param("conj_bias", REPLICATED, ZEROS, lambda c: c.has_conjunction and c.bias, lambda c: (c.n_embd,),
          per_layer=False, stacked=False, gpt2="conjunction.bias"),
    Param("wte.weight", REPLICATED, NORMAL, _always, lambda c: (c.vocab_size, c.n_embd), per_layer=False, stacked=False,
          quantizable=True, gpt2="wte.weight", llama=("model.embed_tokens.weight",)),
    Param("wpe.weight", REPLICATED, NORMAL, lambda c: c.position == "learned", lambda c: (c.block_size, c.n_embd),
          per_layer=False, stacked=False, quantizable=True, gpt2="wpe.weight"),
    Param("proj_bias", SUB_LAYER, ZEROS, _bias, _vec, gpt2="attn.c_proj.bias"),
    Param("down_bias", SUB_LAYER, ZEROS, _bias, _vec, gpt2="mlp.c_proj.bias"),
    Param("ln1.weight", SUB_LAYER, ONES, _always, _vec, gpt2="ln_1.weight", llama=("input_layernorm.weight",)),
    Param("ln1.bias", SUB_LAYER, ZEROS, _norm_bias, _vec, gpt2="ln_1.bias"),
    Param("attn.qkv_weight", COLUMN_QKV, NORMAL, _always, lambda c: (c.n_sub, _qkv(c), c.n_embd), quantizable=True,
          matrix="attn.qkv", gpt2="attn.c_attn.weight",
          llama=("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    Param("attn.qkv_bias", COLUMN_QKV, ZEROS, _bias, lambda c: (c.n_sub, _qkv(c)), matrix="attn.qkv",
          gpt2="attn.c_attn.bias"),
    Param("attn.proj_weight", ROW_HEADS, RESIDUAL, _always, lambda c: (c.n_sub, c.n_embd, c.n_head * c.head_size),
          quantizable=True, matrix="attn.proj", gpt2="attn.c_proj.weight", llama=("self_attn.o_proj.weight",)),
    Param("ln2.weight", SUB_LAYER, ONES, _two_norms, _vec, gpt2="ln_2.weight",
          llama=("post_attention_layernorm.weight",)),
    Param("ln2.bias", SUB_LAYER, ZEROS, lambda c: _two_norms(c) and _norm_bias(c), _vec, gpt2="ln_2.bias"),
    Param("mlp.up_weight", COLUMN_FFN, NORMAL, _always, lambda c: (c.n_sub, _up(c), c.n_embd), quantizable=True,
          matrix="mlp.up", gpt2="mlp.c_fc.weight", llama=("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    Param("mlp.up_bias", COLUMN_FFN, ZEROS, _bias, lambda c: (c.n_sub, _up(c)), matrix="mlp.up",
          gpt2="mlp.c_fc.bias"),
    Param("mlp.down_weight", ROW_FFN, RESIDUAL, _always, lambda c: (c.n_sub, c.n_embd, c.ffn_size), quantizable=True,
          matrix="mlp.down", gpt2="mlp.c_proj.weight", llama=("mlp.down_proj.weight",)),
    Param("ln_f.weight", REPLICATED, ONES, _always, lambda c: (1, c.n_embd), per_layer=False, gpt2="ln_f.weight",
          llama=("model.norm.weight",)),
    Param("ln_f.bias", REPLICATED, ZEROS, _norm_bias, lambda c: (1, c.n_embd), per_layer=False, gpt2="ln_f.bias"),
    Param("lm_head.weight", REPLICATED, NORMAL, lambda c: not c.tie_embeddings, lambda c: (c.vocab_size, c.n_embd),
          per_layer=False, stacked=False, quantizable=True, gpt2="lm_head.weight", llama=("lm_head.weight",),
          ties_to="wte.weight"),
)
_BY_LEAF = {p.leaf: p for p in PARAMS}


@dataclass(frozen=True)
class Named:
    """One tensor of a model: its native name, its kind, its layer (None: global) and full shape."""

    name: str
    param: Param
    layer: int | None
    shape: Shape


def parameters(config: ModelConfig, *, every: bool = False) -> list[Named]:
    """The tensors of ``config``'s model in state_dict order (``every``: also kinds this config lacks)."""
    kinds = [p for p in PARAMS if every or p.present(config)]
    per_layer = [p for p in kinds if p.per_layer]
    out = []
    for p in kinds:
        if not p.per_layer:
            out.append(Named(p.name(), p, None, p.shape(config)))
        elif p is per_layer[0]:  # the layers sit where their first kind does, layer by layer
            out += [Named(q.name(i), q, i, q.shape(config)) for i in range(config.n_layer) for q in per_layer]
    return out


def shapes(config: ModelConfig) -> dict[str, Shape]:
    """Native name -> full shape of every tensor of ``config``'s model."""
    return {n.name: n.shape for n in parameters(config)}


def lookup(name: str) -> tuple[Param, int | None, str]:
    """(kind, layer, int8 part: "" | "q" | "scale") of a native tensor name; ConfigError if unknown."""
    layer, rest = None, name
    if name.startswith("layers."):
        index, _, rest = name.removeprefix("layers.").partition(".")
        layer = int(index) if index.isdigit() else None
    base, _, part = rest.rpartition(".")
    leaf, part = (base, part) if part in INT8_PARTS and base in _BY_LEAF else (rest, "")
    found = _BY_LEAF.get(leaf)
    if found is None or found.per_layer != (layer is not None) or (part and not found.quantizable):
        raise ConfigError(f"{name!r} is not a parameter of any krakenlm model")
    return found, layer, part


def owner_of(name: str) -> tuple[str, str]:
    """(module path, attribute) where the tensor ``name`` lives on a model ("" for the model itself)."""
    path, _, attr = name.rpartition(".")
    return path, attr


def qkv_blocks(config: ModelConfig) -> list[tuple[int, int]]:
    """The rows of q, of k and of v in the fused q|k|v weight or bias."""
    q, kv = config.n_head * config.head_size, config.kv_heads * config.head_size
    return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]


def fused_rows(param: Param, config: ModelConfig) -> list[int]:
    """Row counts of the foreign tensors a format concatenates along dim 0 into ``param``: q|k|v, or
    SwiGLU's gate|up."""
    if param.split == COLUMN_QKV:
        return [b - a for a, b in qkv_blocks(config)]
    if param.split == COLUMN_FFN and config.mlp == "swiglu":
        return [config.ffn_size] * 2
    raise ConfigError(f"{param.leaf} is not a fused tensor")


def matrix_param(matrix: str) -> Param:
    """The weight of the layout pair matrix ``matrix`` ("attn.qkv", ...)."""
    return next(p for p in PARAMS if p.matrix == matrix and not p.bias)


def pair_matrices(arch: str) -> dict[str, tuple[tuple[str, str], ...]]:
    """Pair name -> its (W_in, W_out) matrices: attention and FFN, or a parallel block's fused pair."""
    attn, ffn = (("attn.qkv", "attn.proj"),), (("mlp.up", "mlp.down"),)
    return {"block": attn + ffn} if arch == "parallel" else {"attn": attn, "ffn": ffn}


# Foreign formats ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Format:
    """How a foreign checkpoint names tensors: ``field`` of Param gives the names, per-layer ones under
    ``block`` (formatted with layer and sub); ``transpose``: matmul weights are stored [in, out]."""

    field: str
    block: str
    transpose: bool = False
    strip: tuple[str, ...] = ()  # prefixes dropped on import (torch.compile's, the GPT-2 model's)
    ignored: tuple[str, ...] = ()  # suffixes of buffers that hold no weights
    prefix: str = ""  # prepended on export


_GPT2_STRIP = ("_orig_mod.", "transformer.")
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")  # GPT-2's causal-mask buffers
FORMATS = {
    "hf-gpt2": Format("gpt2", "h.{layer}", True, _GPT2_STRIP, _GPT2_BUFFERS, prefix="transformer."),
    "nanogpt": Format("gpt2", "h.{layer}", False, _GPT2_STRIP, _GPT2_BUFFERS),
    "kraken-authors": Format("gpt2", "h.{sub}.{layer}", False, _GPT2_STRIP, _GPT2_BUFFERS),
    "hf-llama": Format("llama", "model.layers.{layer}", ignored=("rotary_emb.inv_freq",)),
}


@dataclass(frozen=True)
class Foreign:
    """A native tensor as a foreign format stores it: ``parts[s]`` are the tensors of sub-layer s,
    concatenated along dim 0 (transposed first when ``transpose``); a stacked native tensor stacks the
    sub-layers on a new dim 0."""

    native: Named
    parts: tuple[tuple[str, ...], ...]
    transpose: bool


def foreign(config: ModelConfig, fmt: str, *, every: bool = False) -> list[Foreign]:
    """Every native tensor of ``config`` that format ``fmt`` stores (``every``: as in ``parameters``); a tied
    LM head is left out (see ``tied_names``)."""
    f = FORMATS[fmt]
    out = []
    for n in parameters(config, every=every):
        names = n.param.names_in(f)
        if not names or (n.param.ties_to and config.tie_embeddings):
            continue
        if n.param.per_layer:
            subs = range(config.n_sub)
            parts = tuple(tuple(f"{f.block.format(layer=n.layer, sub=s)}.{x}" for x in names) for s in subs)
        else:
            parts = (names,)
        out.append(Foreign(n, parts, f.transpose and n.param.per_layer and n.param.matrix is not None
                           and not n.param.bias))
    return out


def foreign_state(state: dict[str, Tensor], config: ModelConfig, fmt: str) -> dict[str, Tensor]:
    """A native state dict under ``fmt``'s names, one foreign tensor per sub-layer and fused part (no prefix)."""
    out = {}
    for entry in foreign(config, fmt):
        param = entry.native.param
        t = state[entry.native.name]
        for part, sub in zip(entry.parts, t.unbind(0) if param.stacked else [t], strict=True):
            pieces = sub.split(fused_rows(param, config)) if len(part) > 1 else [sub]
            out |= {name: piece.t() if entry.transpose else piece for name, piece in zip(part, pieces, strict=True)}
    return out


def tied_names(config: ModelConfig, fmt: str) -> dict[str, str]:
    """Foreign name of a tied LM head -> the native embedding it must equal (empty when untied)."""
    if not config.tie_embeddings:
        return {}
    f = FORMATS[fmt]
    out = {}
    for p in PARAMS:
        if p.ties_to:
            out |= dict.fromkeys(p.names_in(f), p.ties_to)
    return out


def strip_foreign(names: list[str], fmt: str) -> dict[str, str]:
    """Stored name -> the name ``foreign`` uses, for every stored tensor that is not an ignored buffer."""
    f = FORMATS[fmt]
    out = {}
    for name in names:
        if name.endswith(f.ignored):
            continue
        short = name
        for prefix in f.strip:
            short = short.removeprefix(prefix)
        out[name] = short
    return out
