"""KrakenLM for Hugging Face transformers: krakenlm's gpt, parallel-block, Kraken and Ladder Residual decoders
as one PreTrainedModel, with the Llama-family options (RMSNorm, RoPE, SwiGLU, GQA/MQA, head_dim, biases,
an untied head).

Written next to the weights by `krakenlm export --format hf`; it imports only torch and transformers. The
weights keep krakenlm's names and shapes, so the module tree below mirrors krakenlm's Transformer.

Sub-layers. Every per-layer weight has a leading sub-layer dimension S (``qkv_weight`` is [S, 3d, d] for
multi-head attention): a Kraken layer is S independent pre-norm blocks of width d, the paper's N; gpt,
parallel and ladder models have S = 1. Hidden states are streams y [S, B, T, d], one per sub-layer; the
embedding is a single stream that every sub-layer of the first layer reads.

Wiring of one layer (h: the attention output, a: the stream after attention):
    gpt       h = Attn(LN1(y));  a = y + h;  y = a + FFN(LN2(a))
    kraken    as gpt, but from layer 1 on the FFN reads h + Σ_j y_j, the sum over the sub-layers of the
              layer's input, while the residual continues from a. This sum is Kraken's only exchange
              between sub-layers: on N devices it is one AllReduce, issued at the end of the previous
              layer and needed only by this FFN, so it runs during the attention. After the last layer
              the sub-layers are joined by a linear map: z = Conj(concat(y_1, ..., y_S)).
    parallel  y = y + Attn(LN1(y)) + FFN(LN1(y))  (GPT-J / PaLM)
    ladder    the modules (attention, MLP, attention, MLP, ...) produce u_1, u_2, ...; module k of a ladder
              layer reads x + u_1 + ... + u_{k-2}: the previous module's output joins the stream one module
              late (on N devices its AllReduce runs during module k). Layers below ``ladder_start`` are
              gpt layers (a pretrained gpt model adapted to ladder wiring in its last layers).
Output: logits = LMHead(LN_f(z)) with z = y when S = 1.

The key/value cache is transformers' DynamicCache, one entry per layer holding the S sub-layers' heads side
by side ([B, S * kv_heads, T, head_size]); static caches, sized from num_key_value_heads of one sub-layer,
are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_krakenlm import KrakenLMConfig, NativeConfig

try:  # transformers 5: initializers that leave weights loaded from the checkpoint alone
    from transformers import initialization as init
except ImportError:  # transformers 4 initializes only missing weights
    from torch.nn import init

# The output field holding the cache: `cache` from transformers 5.2x, `past_key_values` before.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def stacked_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """One linear map per sub-layer: x [S or 1, B, T, in] @ weight[S, out, in]^T (+ bias [S, out])."""
    out = torch.matmul(x, weight.transpose(-1, -2).unsqueeze(1))
    return out if bias is None else out + bias[:, None, None, :]


def add_bias(x: Tensor, bias: Tensor | None) -> Tensor:
    """x [S, B, T, d] + a per-sub-layer vector bias [S, d]."""
    return x if bias is None else x + bias[:, None, None, :]


class StackedNorm(nn.Module):
    """One LayerNorm or RMSNorm per sub-layer. RMSNorm normalizes in fp32 and applies the gain in the
    input dtype, as Llama does."""

    def __init__(self, streams: int, dim: int, kind: str, bias: bool, eps: float) -> None:
        super().__init__()
        self.rms, self.eps = kind == "rmsnorm", eps
        self.weight = nn.Parameter(torch.ones(streams, dim))
        self.bias = nn.Parameter(torch.zeros(streams, dim)) if bias and not self.rms else None

    def forward(self, x: Tensor) -> Tensor:
        """x [S or 1, B, T, d] -> [S, B, T, d] (one stream is broadcast to every sub-layer)."""
        if self.rms:
            return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype) * self.weight[:, None, None, :]
        return add_bias(F.layer_norm(x, x.shape[-1:], eps=self.eps) * self.weight[:, None, None, :], self.bias)


@dataclass
class AttentionInputs:
    """What every layer's attention needs from one forward call (built once per call)."""

    rope: tuple[Tensor, Tensor] | None  # cos, sin [B, 1, T, head_size / 2]
    mask: Tensor | None  # bool [B, 1, T, keys], True = may attend; None = plain causal attention
    cache: Cache | None


class StackedAttention(nn.Module):
    """Causal self-attention of S sub-layers with fused QKV (MHA, GQA and MQA). Returns the output projection
    without its bias (krakenlm keeps that bias in the layer: ``proj_bias``)."""

    def __init__(self, native: NativeConfig) -> None:
        super().__init__()
        s, d = native.n_sub, native.n_embd
        self.n_head, self.n_kv_head, self.head_size = native.n_head, native.kv_heads, native.head_size
        qkv = (self.n_head + 2 * self.n_kv_head) * self.head_size
        self.qkv_weight = nn.Parameter(torch.empty(s, qkv, d))
        self.qkv_bias = nn.Parameter(torch.zeros(s, qkv)) if native.bias else None
        self.proj_weight = nn.Parameter(torch.empty(s, d, self.n_head * self.head_size))

    def forward(self, x: Tensor, inputs: AttentionInputs, layer_idx: int) -> Tensor:
        """x [S, B, T, d] -> [S, B, T, d]. The S sub-layers' heads are laid side by side ([B, S * heads, T,
        head_size]), so one attention call and one cache entry per layer serve all of them."""
        s, b, t, _ = x.shape
        h, kv, hs = self.n_head, self.n_kv_head, self.head_size
        qkv = stacked_linear(x, self.qkv_weight, self.qkv_bias).view(s, b, t, h + 2 * kv, hs)
        q, k, v = (z.permute(1, 0, 3, 2, 4).reshape(b, -1, t, hs) for z in qkv.split([h, kv, kv], dim=3))
        if inputs.rope is not None:
            q, k = rotate(q, *inputs.rope), rotate(k, *inputs.rope)
        if inputs.cache is not None:
            k, v = inputs.cache.update(k, v, layer_idx)
        if kv != h:  # grouped-query: query head j of the S * h reads key head j // (h / kv), also across sub-layers
            k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.mask, scale=hs ** -0.5,
                                             is_causal=inputs.mask is None and t > 1)
        out = out.view(b, s, h, t, hs).permute(1, 0, 3, 2, 4).reshape(s, b, t, h * hs)
        return stacked_linear(out, self.proj_weight)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding of x [B, heads, T, head_size]: dimension i is paired with i + head_size / 2."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rope_tables(positions: Tensor, head_size: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin [B, 1, T, head_size / 2] at position ids [B, T]."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, device=positions.device, dtype=torch.float32) / head_size)
    angles = positions.float().unsqueeze(-1) * inv_freq
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


class StackedMLP(nn.Module):
    """GELU (tanh) or SwiGLU feed-forward of S sub-layers; returns the down projection without its bias."""

    def __init__(self, native: NativeConfig) -> None:
        super().__init__()
        self.swiglu = native.mlp == "swiglu"
        up = (2 if self.swiglu else 1) * native.ffn_size  # SwiGLU: gate rows first, then up rows
        self.up_weight = nn.Parameter(torch.empty(native.n_sub, up, native.n_embd))
        self.up_bias = nn.Parameter(torch.zeros(native.n_sub, up)) if native.bias else None
        self.down_weight = nn.Parameter(torch.empty(native.n_sub, native.n_embd, native.ffn_size))

    def forward(self, x: Tensor) -> Tensor:
        hidden = stacked_linear(x, self.up_weight, self.up_bias)
        if self.swiglu:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden, approximate="tanh")
        return stacked_linear(hidden, self.down_weight)


class KrakenLMLayer(nn.Module):
    """One layer of S sub-layers: its modules and the wirings that use them."""

    def __init__(self, native: NativeConfig, index: int) -> None:
        super().__init__()
        s, d = native.n_sub, native.n_embd
        self.index = index
        self.parallel_block = native.arch == "parallel"
        self.ladder = index >= native.ladder_start
        self.ln1 = StackedNorm(s, d, native.norm, native.bias, native.norm_eps)
        self.attn = StackedAttention(native)
        self.ln2 = None if self.parallel_block else StackedNorm(s, d, native.norm, native.bias, native.norm_eps)
        self.mlp = StackedMLP(native)
        self.proj_bias = nn.Parameter(torch.zeros(s, d)) if native.bias else None
        self.down_bias = nn.Parameter(torch.zeros(s, d)) if native.bias else None

    def attention_module(self, y: Tensor, inputs: AttentionInputs) -> Tensor:
        return add_bias(self.attn(self.ln1(y), inputs, self.index), self.proj_bias)

    def mlp_module(self, y: Tensor) -> Tensor:
        return add_bias(self.mlp(self.ln2(y)), self.down_bias)

    def forward(self, y: Tensor, inputs: AttentionInputs, exchanged: Tensor | None) -> Tensor:
        """gpt, kraken and parallel layers. ``exchanged`` (Kraken, layers >= 1): Σ_j y_j [1, B, T, d]."""
        if self.parallel_block:
            h = self.ln1(y)
            out = self.attn(h, inputs, self.index) + self.mlp(h)
            return add_bias(add_bias(y + out, self.proj_bias), self.down_bias)
        h = self.attention_module(y, inputs)
        a = y + h
        return a + self.mlp_module(a if exchanged is None else h + exchanged)


class KrakenLMPreTrainedModel(PreTrainedModel):
    config_class = KrakenLMConfig
    base_model_prefix = ""
    _no_split_modules = ["KrakenLMLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """krakenlm's init (the Kraken paper's): N(0, 0.02), residual output projections N(0, 0.02 / sqrt(2 L S)),
        norm gains 1, biases 0."""
        native = self.config.native
        residual_std = 0.02 / (2 * native.n_layer * native.n_sub) ** 0.5
        if isinstance(module, StackedNorm):
            init.ones_(module.weight)
        for name, param in module.named_parameters(recurse=False):
            if name.endswith("bias"):
                init.zeros_(param)
            elif not isinstance(module, StackedNorm):
                init.normal_(param, mean=0.0, std=residual_std if name in ("proj_weight", "down_weight") else 0.02)


class KrakenLMForCausalLM(KrakenLMPreTrainedModel, GenerationMixin):
    """The whole decoder and its LM head (tied to ``wte`` unless ``tie_embeddings`` is false)."""

    _tied_weights_keys = {"lm_head.weight": "wte.weight"}

    def __init__(self, config: KrakenLMConfig) -> None:
        super().__init__(config)
        native = self.native = config.native
        d = native.n_embd
        self.wte = nn.Embedding(native.vocab_size, d)
        self.wpe = nn.Embedding(native.block_size, d) if native.position == "learned" else None
        self.layers = nn.ModuleList(KrakenLMLayer(native, i) for i in range(native.n_layer))
        if native.arch == "kraken":
            self.conj_weight = nn.Parameter(torch.empty(d, native.n_sub * d))
            self.conj_bias = nn.Parameter(torch.zeros(d)) if native.bias else None
        self.ln_f = StackedNorm(1, d, native.norm, native.bias, native.norm_eps)
        self.lm_head = nn.Linear(d, native.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: Cache | None = None, inputs_embeds: Tensor | None = None,
                labels: Tensor | None = None, use_cache: bool | None = None, logits_to_keep: int | Tensor = 0,
                past_key_values: Cache | None = None, **kwargs: object) -> CausalLMOutputWithPast:
        """Logits [B, T, vocab] of input_ids [B, T] (or inputs_embeds [B, T, d]).

        attention_mask [B, past + T]: 1 for tokens, 0 for padding (left or right); position_ids [B, T]
        default to counting the tokens the mask keeps (left padding), as krakenlm's generation does; cache:
        the key/value cache of the earlier tokens (``past_key_values`` is its older name), extended in place.
        """
        cache = cache if cache is not None else past_key_values
        if use_cache if use_cache is not None else self.config.use_cache:
            cache = cache if cache is not None else DynamicCache(config=self.config)
        if cache is not None and not isinstance(cache, DynamicCache):  # a Kraken layer caches S sub-layers' heads
            raise ValueError(f"KrakenLM runs with transformers' DynamicCache (generate's default), not "
                             f"{type(cache).__name__}")
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        batch, t = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if past + t > self.native.block_size:
            raise ValueError(f"sequence of {past + t} tokens exceeds the model's context of {self.native.block_size}")
        if position_ids is None:
            position_ids = default_positions(attention_mask, past, t, x.device)
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        rope = rope_tables(position_ids, self.native.head_size, self.native.rope_theta) \
            if self.native.position == "rope" else None
        inputs = AttentionInputs(rope, attention_bool_mask(attention_mask, batch, past, t, x.device), cache)
        y = x.unsqueeze(0)  # one stream: every sub-layer of the first layer reads the embedding
        y = self._ladder(y, inputs) if self.native.arch == "ladder" else self._layers(y, inputs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(self.ln_f(self._join(y[:, :, keep])).squeeze(0))
        loss = None if labels is None else F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                           labels[:, 1:].flatten().to(logits.device))
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    def _layers(self, y: Tensor, inputs: AttentionInputs) -> Tensor:
        """gpt, parallel and Kraken layers; a Kraken layer l >= 1 gets the sum of its input's sub-layers."""
        for layer in self.layers:
            exchanged = y.sum(0, keepdim=True) if self.native.arch == "kraken" and layer.index > 0 else None
            y = layer(y, inputs, exchanged)
        return y

    def _ladder(self, y: Tensor, inputs: AttentionInputs) -> Tensor:
        """Module by module; ``late`` is the output of the previous module, not yet in the stream y. A gpt
        module adds it before reading y; a ladder module reads y without it, and it joins afterwards."""
        late = None
        for layer in self.layers:
            for kind in ("attention", "mlp"):
                if late is not None and not layer.ladder:
                    y, late = y + late, None
                out = layer.attention_module(y, inputs) if kind == "attention" else layer.mlp_module(y)
                y, late = (y if late is None else y + late), out
        return y if late is None else y + late

    def _join(self, y: Tensor) -> Tensor:
        """Streams [S, B, T, d] -> one stream [1, B, T, d]: Kraken's conjunction (a linear map of the
        concatenated sub-layer outputs, sub-layer 0 first); the only stream otherwise."""
        if self.native.arch != "kraken":
            return y
        s, b, t, d = y.shape
        z = F.linear(y.permute(1, 2, 0, 3).reshape(b, t, s * d), self.conj_weight, self.conj_bias)
        return z.unsqueeze(0)


def default_positions(attention_mask: Tensor | None, past: int, t: int, device: torch.device) -> Tensor:
    """Position ids [B, T] (or [1, T]): the count of earlier tokens the mask keeps, so left padding does not
    shift positions (padding gets 0); without a mask past, past + 1, ..."""
    if attention_mask is None:
        return torch.arange(past, past + t, device=device).unsqueeze(0)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]


def attention_bool_mask(attention_mask: Tensor | None, batch: int, past: int, t: int,
                        device: torch.device) -> Tensor | None:
    """Bool mask [B, 1, T, past + T] for queries at cache slots past .. past + T - 1: causal, padding hidden,
    and every query sees at least itself (a padding query would otherwise attend to nothing: NaN). None when
    plain causal attention over the new tokens is exact (no earlier tokens, no padding)."""
    keys = past + t
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, {keys}] (1 = token, 0 = padding), got "
                         f"{tuple(attention_mask.shape)}")
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, keys):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, {keys}): "
                         "one entry per cached and new token")
    if past == 0 and (attention_mask is None or bool(attention_mask.all())):
        return None
    query = torch.arange(past, keys, device=device).unsqueeze(1)
    key = torch.arange(keys, device=device).unsqueeze(0)
    valid = torch.ones(batch, keys, dtype=torch.bool, device=device) if attention_mask is None \
        else attention_mask.to(device=device, dtype=torch.bool)
    allowed = ((key <= query).unsqueeze(0) & valid[:, None, :]) | (key == query).unsqueeze(0)
    return allowed.unsqueeze(1)
