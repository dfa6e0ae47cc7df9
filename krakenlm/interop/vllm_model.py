"""krakenlm's four architectures (gpt, parallel, kraken, ladder) as a vLLM model, run with Kraken's
own tensor-parallel plan (``krakenlm.parallel.plan``).

With Kraken degree N and vLLM's TP degree T, rank r holds ``ParallelPlan(config, T).shard(r)``:
- T <= N: whole sub-layers (their attention heads, their FFN, their own vLLM ``Attention`` and so
  their own KV cache), no sum inside a sub-layer, and one exchange per layer over all ranks.
- T = k*N: each sub-layer is Megatron-split over its k ranks (qkv / up column-parallel, proj / down
  row-parallel) with a blocking sum in that *shard group*; the exchange spans the ranks holding the
  same part of different sub-layers. gpt, parallel and ladder are the N = 1 case (shard group = TP).

vLLM 0.32's parallel linear layers cannot express this: RowParallelLinear reduces over the whole TP
group only and QKVParallelLinear splits heads by the TP size. So each rank's slice of every native
tensor comes from ``krakenlm.model.sharding`` (the same plan the native engine loads with), the
matrices run as vLLM ``ReplicatedLinear`` of the local shape (vLLM's GEMM dispatch and quantization
hooks), and the sums go through vLLM ``GroupCoordinator``s built for the plan's groups.

Kraken's exchange (and Ladder's per-module sums) is issued asynchronously through
``torch.distributed`` on the group's device process group (gloo on CPU, NCCL on GPU: both run it
off the compute thread / stream) and awaited right before the next FFN, so it overlaps the next
layer's attention. vLLM's own all-reduce paths (CPU shared memory, custom all-reduce, pynccl) are
blocking calls; ``--hf-overrides '{"krakenlm_overlap": false}'`` uses them instead.

Heads are zero-padded to a multiple of ``krakenlm_head_multiple`` (default 32: every such size up to 256 is
one vLLM's CPU attention kernel takes; the paper's Kraken 125M has head size 113), exactly as
``Transformer.pad_heads`` does: the padded dims of q.k and of the output are zero and the softmax scale
stays 1/sqrt(true head size).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from vllm.config import VllmConfig
from vllm.distributed.parallel_state import (
    GroupCoordinator,
    get_tp_group,
    get_world_group,
    init_model_parallel_group,
)
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

from krakenlm.config import ModelConfig
from krakenlm.errors import ConfigError
from krakenlm.model.activations import gelu_tanh
from krakenlm.model.layers import StackedNorm
from krakenlm.model.sharding import shard_ranges, take
from krakenlm.model.transformer import Shard
from krakenlm.parallel.plan import ParallelPlan
from krakenlm.tokenizer import default_tokenizer_for

GPT2_VOCAB = 50257  # tokens of GPT-2's BPE, the tokenizer an export carries

# Native per-layer leaf name -> attribute of a SubLayer.
_LEAVES = {
    "attn.qkv_weight": "qkv.weight", "attn.qkv_bias": "qkv.bias", "attn.proj_weight": "proj.weight",
    "mlp.up_weight": "up.weight", "mlp.up_bias": "up.bias", "mlp.down_weight": "down.weight",
    "proj_bias": "proj_bias", "down_bias": "down_bias", "ln1.weight": "ln1.weight", "ln1.bias": "ln1.bias",
    "ln2.weight": "ln2.weight", "ln2.bias": "ln2.bias",
}


class _Pending:
    """A sum in flight (``work`` set) or already done."""

    def __init__(self, value: Tensor, work: dist.Work | None = None) -> None:
        self.value, self.work = value, work

    def wait(self) -> Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.value


def _sum(group: GroupCoordinator | None, x: Tensor, overlap: bool) -> _Pending:
    """Sum ``x`` (a fresh tensor: an async sum works in place) over ``group``: issued async on the
    group's device process group when ``overlap``, else through vLLM's blocking all-reduce."""
    if group is None:
        return _Pending(x)
    if overlap:
        x = x.contiguous()
        return _Pending(x, dist.all_reduce(x, group=group.device_group, async_op=True))
    return _Pending(group.all_reduce(x))


class _Groups:
    """This rank's two groups of the plan (None where the group is this rank alone)."""

    def __init__(self, plan: ParallelPlan) -> None:
        tp = get_tp_group()
        self.tp = tp if tp.world_size > 1 else None
        rank = tp.rank_in_group
        shard_groups, exchange_groups = plan.groups()
        self.shard = self._make(tp, shard_groups, plan.shard_group(rank), "tp_kraken_shard")
        self.exchange = self._make(tp, exchange_groups, plan.exchange_group(rank), "tp_kraken_exchange")

    @staticmethod
    def _make(tp: GroupCoordinator, groups: list[list[int]], mine: list[int],
              name: str) -> GroupCoordinator | None:
        if len(mine) == 1:
            return None
        if len(mine) == tp.world_size:
            return tp
        # Every process creates every group (of every TP group, in one order), as torch.distributed requires.
        ranks = [[tp_ranks[i] for i in g] for tp_ranks in tp.group_ranks for g in groups]
        return init_model_parallel_group(ranks, get_world_group().local_rank,
                                         dist.get_backend(tp.device_group), group_name=name)


def _norm(ln: StackedNorm, x: Tensor) -> Tensor:
    return ln(x.unsqueeze(0))[0]


def _add(x: Tensor, bias: Tensor | None) -> Tensor:
    return x if bias is None else x + bias


class SubLayer(nn.Module):
    """One Kraken sub-layer (the whole block of gpt / parallel / ladder) as this rank holds it, its heads
    stored ``hs`` wide (padded)."""

    def __init__(self, cfg: ModelConfig, shard: Shard, rope: nn.Module | None, vllm_config: VllmConfig,
                 prefix: str, hs: int) -> None:
        super().__init__()
        d, shape, quant = cfg.n_embd, shard.attention(cfg), vllm_config.quant_config
        self.split = [shape.n_head * hs, shape.n_kv_head * hs, shape.n_kv_head * hs]
        self.ln1 = StackedNorm(1, d, cfg.norm, cfg.bias, cfg.norm_eps)
        self.ln2 = None if cfg.arch == "parallel" else StackedNorm(1, d, cfg.norm, cfg.bias, cfg.norm_eps)
        self.qkv = ReplicatedLinear(d, sum(self.split), bias=cfg.bias, quant_config=quant, prefix=f"{prefix}.qkv",
                                    return_bias=False)
        self.attn = Attention(shape.n_head, hs, cfg.head_size ** -0.5, num_kv_heads=shape.n_kv_head,
                              cache_config=vllm_config.cache_config, quant_config=quant, prefix=f"{prefix}.attn")
        self.proj = ReplicatedLinear(self.split[0], d, bias=False, quant_config=quant, prefix=f"{prefix}.proj",
                                     return_bias=False)
        hidden = cfg.ffn_size // shard.parts
        self.swiglu = cfg.mlp == "swiglu"
        self.up = ReplicatedLinear(d, hidden * (2 if self.swiglu else 1), bias=cfg.bias, quant_config=quant,
                                   prefix=f"{prefix}.up", return_bias=False)
        self.down = ReplicatedLinear(hidden, d, bias=False, quant_config=quant, prefix=f"{prefix}.down",
                                     return_bias=False)
        # Biases of row-parallel projections join once, after the shard sum.
        self.proj_bias = nn.Parameter(torch.zeros(d), requires_grad=False) if cfg.bias else None
        self.down_bias = nn.Parameter(torch.zeros(d), requires_grad=False) if cfg.bias else None
        self.rope = rope

    def attention(self, x: Tensor, positions: Tensor) -> Tensor:
        """Partial (this rank's heads) attention output projection of x [tokens, d]."""
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        if self.rope is not None:
            q, k = self.rope(positions, q, k)
        return self.proj(self.attn(q, k, v))

    def mlp(self, x: Tensor) -> Tensor:
        """Partial (this rank's FFN columns) down projection of x [tokens, d]."""
        hidden = self.up(x)
        if self.swiglu:
            gate, up = hidden.chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(gelu_tanh(hidden))


class Block(nn.Module):
    """Layer l on this rank: its local sub-layers ``sub0``, ``sub1``, ... (one integer per module path,
    as vLLM's KV-cache binding expects)."""

    def __init__(self, cfg: ModelConfig, shard: Shard, rope: nn.Module | None, vllm_config: VllmConfig,
                 prefix: str, hs: int) -> None:
        super().__init__()
        for s in range(shard.sub_count):
            self.add_module(f"sub{s}", SubLayer(cfg, shard, rope, vllm_config, f"{prefix}.sub{s}", hs))
        self.subs: list[SubLayer] = [getattr(self, f"sub{s}") for s in range(shard.sub_count)]
        self.parallel_block = cfg.arch == "parallel"

    def forward(self, ys: list[Tensor], positions: Tensor, pending: _Pending | None,
                shard: GroupCoordinator | None) -> list[Tensor]:
        """Streams after this layer. Kraken (pending set): every local attention runs before the
        previous layer's exchange is awaited, then each FFN reads attention output + that sum."""
        def reduce(x: Tensor) -> Tensor:
            return x if shard is None else shard.all_reduce(x)

        if self.parallel_block:
            out = []
            for sub, y in zip(self.subs, ys, strict=True):
                h = _norm(sub.ln1, y)
                out.append(_add(_add(y + reduce(sub.attention(h, positions) + sub.mlp(h)), sub.proj_bias),
                                sub.down_bias))
            return out
        hs = [_add(reduce(sub.attention(_norm(sub.ln1, y), positions)), sub.proj_bias)
              for sub, y in zip(self.subs, ys, strict=True)]
        total = None if pending is None else pending.wait()
        out = []
        for sub, y, h in zip(self.subs, ys, hs, strict=True):
            a = y + h
            ffn_in = a if total is None else h + total
            out.append(a + _add(reduce(sub.mlp(_norm(sub.ln2, ffn_in))), sub.down_bias))
        return out


class KrakenLMForCausalLM(nn.Module):
    """A ``krakenlm export --format hf`` directory served by vLLM (native tensor names and shapes)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        hf = vllm_config.model_config.hf_config
        cfg = ModelConfig.from_dict(dict(hf.krakenlm))
        tp = get_tp_group()
        self.config, self.plan = cfg, ParallelPlan(cfg, tp.world_size)
        self.shard = self.plan.shard(tp.rank_in_group)
        self.overlap = bool(getattr(hf, "krakenlm_overlap", True))
        self.head_size = cfg.padded_head_size(int(getattr(hf, "krakenlm_head_multiple", 32)))
        if self.head_size != cfg.head_size and cfg.position == "rope":
            raise ConfigError(f"head_dim: vLLM's kernels need a head size padded from {cfg.head_size} to "
                              f"{self.head_size}, which rope does not allow (rotation pairs would move)")
        self.groups = _Groups(self.plan)
        d, name = cfg.n_embd, (prefix + "." if prefix else "")
        self.wte = VocabParallelEmbedding(cfg.vocab_size, d, prefix=f"{name}wte")
        self.wpe = nn.Embedding(cfg.block_size, d) if cfg.position == "learned" else None
        rope = None if cfg.position != "rope" else get_rope(
            cfg.head_size, cfg.block_size, is_neox_style=True,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
        self.layers = nn.ModuleList(Block(cfg, self.shard, rope, vllm_config, f"{name}layers.{i}", self.head_size)
                                    for i in range(cfg.n_layer))
        if cfg.has_conjunction:
            self.conj = ReplicatedLinear(self.shard.sub_count * d // self.shard.parts, d, bias=False,
                                         prefix=f"{name}conj", return_bias=False)
            self.conj_bias = nn.Parameter(torch.zeros(d), requires_grad=False) if cfg.bias else None
        self.ln_f = StackedNorm(1, d, cfg.norm, cfg.bias, cfg.norm_eps)
        self.lm_head = ParallelLMHead(cfg.vocab_size, d, bias=False, prefix=f"{name}lm_head")
        if cfg.tie_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.wte)
        self.logits_processor = LogitsProcessor(cfg.vocab_size)
        # As `krakenlm generate`: a vocabulary padded past GPT-2's (50304) never samples the padding ids,
        # which the export's tokenizer could not decode.
        self.vocab_limit = GPT2_VOCAB if default_tokenizer_for(cfg.vocab_size) == "gpt2" else cfg.vocab_size

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.wte(input_ids)

    def forward(self, input_ids: Tensor | None, positions: Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: Tensor | None = None) -> Tensor:
        """Hidden states [tokens, width] before the head. For Kraken these are this rank's columns of
        the conjunction's input (its sub-layers' streams), so the conjunction and its sum run in
        ``compute_logits`` only at the positions whose logits are wanted."""
        x = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        if self.wpe is not None:
            x = x + self.wpe(positions)
        if self.config.arch == "ladder":
            return self._ladder(x, positions)
        ys = self._layers(x, positions)
        if not self.config.has_conjunction:
            return ys[0]
        width = self.config.n_embd // self.shard.parts
        part = self.shard.part
        return torch.cat([y[:, part * width:(part + 1) * width] for y in ys], dim=-1)

    def _layers(self, x: Tensor, positions: Tensor) -> list[Tensor]:
        """gpt / parallel / kraken: Kraken's exchange of layer l is issued at its end and awaited
        inside layer l + 1, after its attention."""
        ys = [x] * self.shard.sub_count
        pending = None
        last = len(self.layers) - 1
        for i, block in enumerate(self.layers):
            ys = block(ys, positions, pending, self.groups.shard)
            if self.config.arch == "kraken" and i < last:
                local = ys[0].clone() if len(ys) == 1 else torch.stack(ys).sum(0)
                pending = _sum(self.groups.exchange, local, self.overlap)
        return ys

    def _ladder(self, y: Tensor, positions: Tensor) -> Tensor:
        """Ladder Residual, module by module, as ``Transformer._ladder``: a ladder module reads the
        residual without the previous module's output, whose sum is still in flight."""
        start, last = self.config.ladder_start, 2 * len(self.layers) - 1
        inflight: list[tuple[_Pending, Tensor | None]] = []
        for i, block in enumerate(self.layers):
            sub = block.subs[0]
            for k, (norm, bias) in enumerate(((sub.ln1, sub.proj_bias), (sub.ln2, sub.down_bias))):
                while len(inflight) > (1 if i >= start else 0):
                    pending, done_bias = inflight.pop(0)
                    y = y + _add(pending.wait(), done_bias)
                h = _norm(norm, y)
                out = sub.attention(h, positions) if k == 0 else sub.mlp(h)
                overlap = self.overlap and min(2 * i + k + 1, last) // 2 >= start
                inflight.append((_sum(self.groups.shard, out, overlap), bias))
        for pending, done_bias in inflight:
            y = y + _add(pending.wait(), done_bias)
        return y

    def compute_logits(self, hidden_states: Tensor) -> Tensor | None:
        z = hidden_states
        if self.config.has_conjunction:
            z = self.conj(z)
            z = z if self.groups.tp is None else self.groups.tp.all_reduce(z)
            z = _add(z, self.conj_bias)
        logits = self.logits_processor(self.lm_head, _norm(self.ln_f, z))
        if logits is not None and self.vocab_limit < logits.shape[-1]:
            logits[..., self.vocab_limit:] = float("-inf")
        return logits

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """Native tensors (``model.safetensors`` of the export), each sliced to this rank's shard."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            for target, value in self._targets(name, tensor):
                if target not in params:
                    raise ValueError(f"krakenlm: checkpoint tensor {name!r} has no place in this model "
                                     f"({self.config.arch}, tie_embeddings={self.config.tie_embeddings})")
                param = params[target]
                if not hasattr(param, "weight_loader"):  # vLLM's vocab-parallel layers slice by themselves
                    value = value.reshape(param.shape)
                getattr(param, "weight_loader", default_weight_loader)(param, value)
                loaded.add(target)
        return loaded

    def _targets(self, name: str, tensor: Tensor) -> Iterable[tuple[str, Tensor]]:
        if name in ("wte.weight", "lm_head.weight"):
            yield name, tensor
            return
        local = take(lambda index: tensor[index], shard_ranges(name, tuple(tensor.shape), self.config, self.shard))
        if not name.startswith("layers."):
            yield {"conj_weight": "conj.weight"}.get(name, name), local
            return
        _, layer, leaf = name.split(".", 2)
        if leaf not in _LEAVES:
            raise ValueError(f"krakenlm: unknown checkpoint tensor {name!r}")
        for s in range(self.shard.sub_count):
            yield f"layers.{layer}.sub{s}.{_LEAVES[leaf]}", _pad_heads(leaf, local[s], self.head_size,
                                                                       self.config.head_size).contiguous()


def _pad_heads(leaf: str, value: Tensor, size: int, true: int) -> Tensor:
    """Every head of a q/k/v tensor ([heads*hs, d] or [heads*hs]) or of the out-projection ([d, heads*hs])
    zero-padded from ``true`` to ``size`` dims."""
    if size == true or leaf not in ("attn.qkv_weight", "attn.qkv_bias", "attn.proj_weight"):
        return value
    if leaf == "attn.proj_weight":
        return F.pad(value.view(value.shape[0], -1, true), (0, size - true)).flatten(1)
    heads = value.view(-1, true, *value.shape[1:])
    return F.pad(heads, (0, 0) * (value.dim() - 1) + (0, size - true)).flatten(0, 1)
