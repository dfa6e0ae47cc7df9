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


@pytest.mark.parametrize("arch", ["gpt", "parallel", "kraken"])
def test_native_round_trip_is_exact(tmp_path, arch):
    model = build_model(config=tiny(arch), seed=3)
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
