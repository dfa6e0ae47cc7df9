"""The one parameter spec (krakenlm.model.params) against what it describes: the Transformer's own
tensors, the shard slices every rank holds, the init, int8, and other code bases' checkpoints."""

import itertools

import pytest
import torch
import transformers

from krakenlm.checkpoint import _gather, expected_shapes
from krakenlm.config import ModelConfig
from krakenlm.errors import ConfigError
from krakenlm.model import Shard, Transformer
from krakenlm.model.params import (
    FORMATS,
    ONES,
    PARAMS,
    RESIDUAL,
    ZEROS,
    foreign,
    foreign_state,
    lookup,
    parameters,
    tied_names,
)
from krakenlm.model.quant import quantize_model
from krakenlm.model.sharding import shard_ranges, shard_state_dict
from krakenlm.source import build_model

OPTIONS = list(itertools.product(["gpt", "parallel", "kraken", "ladder"], [False, True], ["layernorm", "rmsnorm"],
                                 ["learned", "rope"], ["gelu", "swiglu"], [True, False], [None, 1]))


def config(arch="gpt", bias=True, norm="layernorm", position="learned", mlp="gelu", tie=True, kv=None, **kw):
    fields = dict(arch=arch, n_layer=2, n_embd=16, n_head=4, n_sub=2 if arch == "kraken" else 1, vocab_size=11,
                  block_size=8, bias=bias, norm=norm, position=position, mlp=mlp, tie_embeddings=tie, n_kv_head=kv)
    return ModelConfig(**(fields | kw))


def meta_state(cfg, shard=None):
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(cfg, shard, init=False).state_dict().items()}


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o)))
def test_every_tensor_of_every_model_is_described_once(options):
    """Names, order and shapes are the Transformer's exactly; each name parses back to its kind and layer."""
    cfg = config(*options)
    named = parameters(cfg)
    assert [(n.name, n.shape) for n in named] == list(meta_state(cfg).items())
    for n in named:
        assert lookup(n.name) == (n.param, n.layer, "")
        assert n.param.name(n.layer) == n.name


def test_int8_tensor_names_parse_and_unknown_names_are_refused():
    model = quantize_model(build_model(config=config("kraken", tie=False), seed=0))
    parts = {lookup(name)[2] for name in model.state_dict()}
    assert parts == {"", "q", "scale"}
    quantized = {lookup(name)[0].leaf for name in model.state_dict() if lookup(name)[2]}
    assert quantized == {"attn.qkv_weight", "attn.proj_weight", "mlp.up_weight", "mlp.down_weight", "conj_weight",
                         "wte.weight", "wpe.weight", "lm_head.weight"}
    for bad in ("layers.0.attn.qkv", "layers.x.ln1.weight", "wte.weight.q.q", "layers.0.wte.weight", "ln1.weight",
                "layers.0.ln1.weight.scale"):
        with pytest.raises(ConfigError, match="not a parameter"):
            lookup(bad)


def old_init_rule(name: str) -> str:
    """The init the Transformer used before the spec, by name (what the seeded weights must keep)."""
    if name.endswith(("proj_weight", "down_weight")):
        return RESIDUAL
    if name.startswith("ln") or ".ln" in name:
        return ONES if name.endswith("weight") else ZEROS
    return ZEROS if name.endswith("bias") else "normal"


@pytest.mark.parametrize("options", OPTIONS[::7], ids=lambda o: "-".join(map(str, o)))
def test_init_kinds_keep_the_seeded_weights(options):
    cfg = config(*options)
    model = build_model(config=cfg, seed=0)
    for n in parameters(cfg):
        assert n.param.init == old_init_rule(n.name), n.name
        p = model.get_parameter(n.name)
        if n.param.init in (ONES, ZEROS):
            assert torch.equal(p, torch.full_like(p, 1.0 if n.param.init == ONES else 0.0)), n.name


SHARDINGS = [  # (config, every shard of one TP plan)
    (config("gpt", mlp="swiglu", kv=2), [Shard(0, 1, r, 2) for r in range(2)]),
    (config("gpt", kv=1), [Shard(0, 1, r, 4) for r in range(4)]),
    (config("parallel", bias=True), [Shard(0, 1, r, 4) for r in range(4)]),
    (config("kraken", n_sub=4), [Shard(s, 1, 0, 1) for s in range(4)]),
    (config("kraken", n_sub=4), [Shard(2 * s, 2, 0, 1) for s in range(2)]),
    (config("kraken", mlp="swiglu"), [Shard(s, 1, r, 2) for s in range(2) for r in range(2)]),
]


@pytest.mark.parametrize("cfg,shards", SHARDINGS)
def test_shards_reassemble_to_the_full_tensor(cfg, shards):
    """Each shard's values, put back at the indices its ranges name, rebuild every full tensor; split tensors
    are held once over the ranks (k/v heads once per rank sharing them), replicated ones by every rank."""
    full = {n.name: torch.randn(n.shape) for n in parameters(cfg)}
    rebuilt = {k: torch.full_like(v, float("nan")) for k, v in full.items()}
    count = {k: torch.zeros_like(v) for k, v in full.items()}
    for shard in shards:
        local = shard_state_dict(full, cfg, shard)
        assert {k: tuple(v.shape) for k, v in local.items()} == meta_state(cfg, shard) == expected_shapes(cfg, shard)
        for name, t in local.items():
            index = [torch.tensor([i for a, b in r for i in range(a, b)])
                     for r in shard_ranges(name, tuple(full[name].shape), cfg, shard)]
            grid = torch.meshgrid(*index, indexing="ij")
            rebuilt[name][grid] = t
            count[name][grid] += 1
    kv_shared = cfg.kv_heads < shards[0].parts
    for n in parameters(cfg):
        assert torch.equal(rebuilt[n.name], full[n.name]), n.name
        held = {c.item() for c in count[n.name].unique()}
        if n.param.split == "replicated":
            assert held == {len(shards)}, n.name
        elif n.param.split == "sub-layer":
            assert held == {shards[0].parts}, n.name
        elif not (kv_shared and n.param.split == "column-qkv"):
            assert held == {1}, n.name


def native_round_trip(cfg, fmt):
    state = build_model(config=cfg, seed=1).state_dict()
    return state, _gather(foreign_state(state, cfg, fmt), cfg, fmt, "test")


@pytest.mark.parametrize("fmt,cfg", [("hf-gpt2", config("gpt")), ("nanogpt", config("gpt", bias=False)),
                                     ("kraken-authors", config("kraken", n_sub=3, bias=True))])
def test_gpt2_family_names_round_trip(fmt, cfg):
    state, back = native_round_trip(cfg, fmt)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_foreign_names_are_the_reference_implementations_names():
    """The names the spec gives are the tensors transformers' GPT-2 and Llama models hold (and nothing else)."""
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=4, n_positions=8,
                                                                vocab_size=11))
    cfg = config("gpt")
    ours = {FORMATS["hf-gpt2"].prefix + name for e in foreign(cfg, "hf-gpt2") for part in e.parts for name in part}
    hf = {k for k in gpt2.state_dict() if not k.endswith(FORMATS["hf-gpt2"].ignored)}
    assert hf == ours | set(tied_names(cfg, "hf-gpt2"))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=11, max_position_embeddings=8))
    cfg = config("gpt", bias=False, norm="rmsnorm", position="rope", mlp="swiglu", tie=False, kv=2, ffn_hidden=24)
    names = {name for e in foreign(cfg, "hf-llama") for part in e.parts for name in part}
    assert set(llama.state_dict()) == names
    assert {e.native.name for e in foreign(cfg, "hf-llama")} == {n.name for n in parameters(cfg)}
    state = build_model(config=cfg, seed=0).state_dict()
    llama.load_state_dict(foreign_state(state, cfg, "hf-llama"))  # q|k|v and gate|up split back apart
    for e in foreign(cfg, "hf-llama"):
        joined = torch.cat([llama.state_dict()[name] for name in e.parts[0]])
        assert torch.equal(joined, state[e.native.name][0] if e.native.param.stacked else state[e.native.name])


def test_every_param_kind_has_one_leaf_and_consistent_roles():
    leaves = [p.leaf for p in PARAMS]
    assert len(set(leaves)) == len(leaves)
    cfg = config("kraken", n_sub=3, tie=False)
    for p in PARAMS:
        if p.stacked:
            assert p.shape(cfg)[0] == (3 if p.per_layer else 1), p.leaf
        assert (p.side is None) == (p.matrix is None)
        assert not (p.quantizable and p.bias)
        assert p.split in ("replicated", "conj") or p.per_layer
