import json
import os
import pickle
import stat

import pytest
import torch
from safetensors.torch import save_file

from krakenlm.checkpoint import (
    detect_format,
    export_hf_gpt2,
    load_model,
    load_state,
    save_checkpoint,
    write_manifest,
)
from krakenlm.errors import CheckpointError, ConfigError
from krakenlm.model import Shard, Transformer
from krakenlm.model.sharding import shard_state_dict
from krakenlm.source import build_model
from tests.conftest import tiny

transformers = pytest.importorskip("transformers")


def hf_gpt2(tmp_path, **kw):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=300,
                                  bos_token_id=0, eos_token_id=0, **kw)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def test_hf_gpt2_same_logits_as_transformers(tmp_path):
    hf, path = hf_gpt2(tmp_path)
    assert detect_format(path) == "hf-gpt2"
    ours = load_model(path)
    idx = torch.randint(0, 300, (3, 50))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max() <= 1e-4


def test_export_to_hf_gpt2_loads_in_transformers(tmp_path):
    _, path = hf_gpt2(tmp_path)
    ours = load_model(path)
    export_hf_gpt2(tmp_path / "out", ours)
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 300, (2, 33))
    with torch.no_grad():
        assert (back(idx).logits - ours(idx)).abs().max() <= 1e-4


def test_export_refuses_non_gpt2_shapes(tmp_path):
    with pytest.raises(ConfigError, match="export"):
        export_hf_gpt2(tmp_path / "x", Transformer(tiny("kraken")))


@pytest.mark.parametrize("cfg", [tiny("gpt"), tiny("parallel"), tiny("kraken"), tiny("ladder", ladder_layers=2),
                                 tiny("ladder", norm="rmsnorm", tie_embeddings=False, n_kv_head=2)],
                         ids=["gpt", "parallel", "kraken", "ladder", "ladder-rmsnorm-untied"])
def test_native_round_trip_is_exact(tmp_path, cfg):
    model = build_model(config=cfg, seed=3)
    save_checkpoint(tmp_path / "ck", model, model.config, {"note": "x"})
    assert detect_format(tmp_path / "ck") == "native"
    back = load_model(tmp_path / "ck")
    assert back.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_sharded_read_equals_slicing_the_full_state(tmp_path):
    cfg = tiny("kraken", n_sub=2, n_head=2, n_kv_head=1)
    model = build_model(config=cfg, seed=1)
    save_checkpoint(tmp_path / "ck", model, cfg)
    shard = Shard(1, 1, 1, 2)
    _, part = load_state(tmp_path / "ck", shard)
    want = shard_state_dict(model.state_dict(), cfg, shard)
    assert part.keys() == want.keys() and all(torch.equal(part[k], want[k]) for k in want)


def test_nanogpt_checkpoint_imports(tmp_path):
    _, path = hf_gpt2(tmp_path)
    ours = load_model(path)
    nano = {}
    for k, v in transformers.GPT2LMHeadModel.from_pretrained(path).state_dict().items():
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t()  # nanoGPT uses nn.Linear, HF uses Conv1D
        nano[k] = v
    args = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64, "bias": True, "vocab_size": 300, "dropout": 0.0}
    torch.save({"model": {"_orig_mod." + k: v for k, v in nano.items()}, "model_args": args, "iter_num": 5,
                "config": {"lr": 1e-3}}, tmp_path / "ckpt.pt")
    assert detect_format(tmp_path / "ckpt.pt") == "nanogpt"
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert (load_model(tmp_path / "ckpt.pt")(idx) - ours(idx)).abs().max() < 1e-5


def test_kraken_authors_checkpoint_imports(tmp_path):
    from tests.reference_kraken import ReferenceKraken

    ref = ReferenceKraken(n_layer=2, n_sub=2, d=32, heads_per_sub=2, vocab=100, block=64).eval()
    state = dict(ref.state_dict())
    state["lm_head.weight"] = state["transformer.wte.weight"]
    args = {"n_layer": 2, "n_head": 4, "n_heads_in_split": 2, "n_embd": 32, "ffn_expansion": 2, "bias": False,
            "block_size": 64, "vocab_size": 100}
    torch.save({"model": state, "model_args": args, "optimizer": {}, "iter_num": 1, "best_val_loss": 3.0,
                "config": {}}, tmp_path / "k.pt")
    assert detect_format(tmp_path / "k.pt") == "kraken-authors"
    model = load_model(tmp_path / "k.pt")
    assert model.config.arch == "kraken" and model.config.n_sub == 2
    idx = torch.randint(0, 100, (2, 25))
    with torch.no_grad():
        assert (model(idx) - ref(idx)).abs().max() < 1e-5


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_objects_are_refused(tmp_path, capsys):
    torch.save({"model": {}, "model_args": {}, "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_model(tmp_path / "evil.pt")
    assert "pwned" not in capsys.readouterr().out
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "raw.pt")


def test_truncated_and_mismatched_native_checkpoints_are_refused(tmp_path):
    """Edited files fail the manifest; with the manifest rewritten (a hand edit) the reader's own checks hold."""
    model = build_model(config=tiny("gpt"), seed=0)
    save_checkpoint(tmp_path / "ck", model, model.config)
    weights = tmp_path / "ck" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors does not match its checksum"):
        load_model(tmp_path / "ck")
    write_manifest(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="unreadable or truncated safetensors"):
        load_model(tmp_path / "ck")
    save_checkpoint(tmp_path / "ck2", model, model.config)
    doc = json.loads((tmp_path / "ck2" / "config.json").read_text())
    doc["config"]["n_embd"] = 64
    doc["config"]["n_head"] = 4

    def edit(text):
        (tmp_path / "ck2" / "config.json").write_text(text)
        write_manifest(tmp_path / "ck2")

    edit(json.dumps(doc))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path / "ck2")
    doc["config"]["n_head"] = 7
    edit(json.dumps(doc))
    with pytest.raises(CheckpointError, match="n_head"):
        load_model(tmp_path / "ck2")
    edit("{")
    with pytest.raises(CheckpointError, match="JSON"):
        load_model(tmp_path / "ck2")


def test_missing_tensor_and_untied_head_refused(tmp_path):
    model = build_model(config=tiny("gpt"), seed=0)
    save_checkpoint(tmp_path / "ck", model, model.config)
    state = model.state_dict()
    state.pop("ln_f.weight")
    save_file(state, str(tmp_path / "ck" / "model.safetensors"))
    write_manifest(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path / "ck")
    _, path = hf_gpt2(tmp_path)
    with pytest.raises(CheckpointError, match="pytorch_model.bin|no model.safetensors"):
        (path / "model.safetensors").unlink()
        load_model(path)


def test_save_refuses_state_not_matching_config(tmp_path):
    model = build_model(config=tiny("gpt"), seed=0)
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path / "ck", model, tiny("gpt", n_embd=64))
    assert not (tmp_path / "ck").exists()


def test_nonexistent_path():
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model("/nonexistent/ckpt")


def test_saved_checkpoint_directory_follows_the_umask(tmp_path):
    """Checkpoints are shared artefacts: the atomic temp directory must not leave them private (0700)."""
    old = os.umask(0o022)
    try:
        model = build_model(config=tiny("gpt"), seed=0)
        path = save_checkpoint(tmp_path / "ck", model, model.config)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left behind


def hf_llama(tmp_path, name="llama", shard=None, **kw):
    """A random tiny LlamaForCausalLM saved as transformers writes it (random norm gains too)."""
    torch.manual_seed(0)
    fields = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, rope_theta=500000.0,
                  tie_word_embeddings=False, rms_norm_eps=1e-5) | kw
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / name, **({"max_shard_size": shard} if shard else {}))
    return model, tmp_path / name


@pytest.mark.parametrize("kind", ["untied", "tied", "sharded-files"])
def test_hf_llama_same_logits_as_transformers(tmp_path, kind):
    kw = {"tie_word_embeddings": True} if kind == "tied" else {}
    hf, path = hf_llama(tmp_path, shard="40KB" if kind == "sharded-files" else None, **kw)
    assert (path / "model.safetensors.index.json").exists() == (kind == "sharded-files")
    assert detect_format(path) == "hf-llama"
    ours = load_model(path)
    assert ours.config.norm == "rmsnorm" and ours.config.rope_theta == 500000.0
    assert ours.config.tie_embeddings == (kind == "tied") and ours.config.num_params() == hf.num_parameters()
    idx = torch.randint(0, 300, (3, 50))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max() <= 1e-4


def test_hf_llama_at_tp2_same_logits_as_transformers(tmp_path):
    from krakenlm.parallel.launch import run_ranks

    hf, path = hf_llama(tmp_path, shard="40KB")
    idx = torch.randint(0, 300, (2, 40))
    payload = {"source": {"checkpoint": str(path)}, "idx": idx.tolist(), "out": str(tmp_path / "logits.pt")}
    assert run_ranks("tests.tp_workers:logits", 2, payload, grace=30) == 0
    with torch.no_grad():
        assert (hf(idx).logits - torch.load(tmp_path / "logits.pt", weights_only=True)).abs().max() <= 1e-4


@pytest.mark.parametrize("change,field", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_parameters"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": None}, "hidden_size"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({"intermediate_size": 128}, "mlp.gate_proj.weight"),  # the tensors no longer fit the config
])
def test_bad_or_mismatched_llama_configs_are_refused_with_the_field_named(tmp_path, change, field):
    _, path = hf_llama(tmp_path)
    doc = json.loads((path / "config.json").read_text())
    doc.pop("rope_parameters") if "rope_scaling" in change else None
    doc.update(change)
    (path / "config.json").write_text(json.dumps({k: v for k, v in doc.items() if v is not None}))
    with pytest.raises(CheckpointError, match=field):
        load_model(path)


def test_imported_llama_converts_to_ladder_wiring(tmp_path):
    """The Ladder paper's adaptation: the same weights, the last K layers rewired (K = 0 changes nothing)."""
    _, path = hf_llama(tmp_path)
    original = load_model(path)
    idx = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        want = original(idx)
        for k in (0, 1):
            config = original.config.as_ladder(k)
            save_checkpoint(tmp_path / f"ladder{k}", original.state_dict(), config)
            ladder = load_model(tmp_path / f"ladder{k}")
            assert ladder.config.arch == "ladder" and ladder.config.ladder_start == 2 - k
            assert ((ladder(idx) - want).abs().max() < 1e-6) == (k == 0)
    with pytest.raises(ConfigError, match="ladder"):
        tiny("kraken").as_ladder()
