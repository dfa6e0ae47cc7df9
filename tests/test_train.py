"""Training pipeline: prepare, schedule, weight-decay groups, checkpoints (refusal, load + generate),
perplexity. Kill-and-resume and DDP equivalence are in test_train_resume.py."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from krakenlm.checkpoint import MANIFEST_FILE, load_model
from krakenlm.cli import main as cli_main
from krakenlm.config import ModelConfig
from krakenlm.data import gather_windows, load_tokens, window_starts
from krakenlm.errors import CheckpointError, ConfigError, InputError
from krakenlm.generate import generate
from krakenlm.model import Transformer
from krakenlm.train import TrainConfig, lr_at, make_optimizer, param_groups, perplexity, prepare, train
from krakenlm.train.trainer import LATEST, METRICS_FILE, read_metrics

WORDS = ["the", "king", "queen", "sword", "crown", "night", "day", "love", "death", "fool", "speak", "thou", "doth"]
TINY = dict(arch="kraken", n_layer=2, n_embd=32, n_head=2, n_sub=2, vocab_size=257, block_size=32)


def write_corpus(root, docs: int = 3, words: int = 600, seed: int = 0):
    """A few pseudo-English documents (bytes tokenizer => ~3.5k tokens each)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(words)) + "\n")
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    prepare(base / "bin", [write_corpus(base / "text")], tokenizer="bytes", val_fraction=0.2)
    return base / "bin"


def tiny_train_config(data_dir, out, **changes) -> TrainConfig:
    fields = dict(data=str(data_dir), out=str(out), steps=6, lr=3e-3, warmup_steps=2, batch_size=4,
                  eval_interval=3, eval_windows=4, checkpoint_interval=2)
    return TrainConfig(**(fields | changes))


# prepare -------------------------------------------------------------------------------------------
def test_prepare_splits_every_document_and_writes_meta(tmp_path):
    text = write_corpus(tmp_path / "text", docs=2, words=50)
    (text / "image.png").write_bytes(b"\x89PNG not text")  # ignored: not a text suffix
    meta = prepare(tmp_path / "out", [text], tokenizer="bytes", val_fraction=0.25)
    docs = [(text / f"doc{i}.txt").read_bytes() for i in range(2)]
    train_want, val_want = [], []
    for doc in docs:
        ids = list(doc) + [256]
        cut = round(len(ids) * 0.75)
        train_want += ids[:cut]
        val_want += ids[cut:]
    assert load_tokens(tmp_path / "out", "train").tolist() == train_want
    assert load_tokens(tmp_path / "out", "val").tolist() == val_want
    assert meta["documents"] == 2 and meta["tokenizer"] == "bytes" and meta["vocab_size"] == 257
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk["train_tokens"] == len(train_want) and on_disk["val_tokens"] == len(val_want)


def test_prepare_split_by_documents_keeps_documents_whole(tmp_path):
    text = write_corpus(tmp_path / "text", docs=3, words=20)
    prepare(tmp_path / "out", [text], tokenizer="bytes", val_fraction=0.34, split_by="documents")
    docs = [list((text / f"doc{i}.txt").read_bytes()) + [256] for i in range(3)]
    assert load_tokens(tmp_path / "out", "val").tolist() == docs[0] + docs[2]  # golden-ratio order: 0, .62, .24
    assert load_tokens(tmp_path / "out", "train").tolist() == docs[1]


def test_prepare_gpt2_tokens_and_bad_input(tmp_path):
    (tmp_path / "a.txt").write_text("Hello world")
    prepare(tmp_path / "out", [tmp_path / "a.txt"], tokenizer="gpt2", val_fraction=0.3)
    assert load_tokens(tmp_path / "out", "train").tolist() + load_tokens(tmp_path / "out", "val").tolist() \
        == [15496, 995, 50256]
    with pytest.raises(InputError, match="no such file"):
        prepare(tmp_path / "x", [tmp_path / "missing.txt"], tokenizer="bytes")
    with pytest.raises(ConfigError, match="val_fraction"):
        prepare(tmp_path / "x", [tmp_path / "a.txt"], val_fraction=1.5)


def test_prepare_cli_prints_one_line_for_bad_input(tmp_path, capsys):
    assert cli_main(["prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file or directory" in err[0]


# schedule and optimizer groups ---------------------------------------------------------------------
def test_schedule_warmup_then_cosine_to_a_tenth():
    cfg = TrainConfig(steps=1000, lr=1e-3, warmup_steps=100, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(1100)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[49] == pytest.approx(5e-4) and lrs[99] == pytest.approx(1e-3)
    assert np.all(np.diff(lrs[:100]) > 0)  # linear warmup rises
    assert np.all(np.diff(lrs[99:1000]) <= 0)  # cosine falls
    assert lrs[550] == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway down the cosine
    assert lrs[999] == pytest.approx(1e-4, rel=1e-4) and lrs[1099] == pytest.approx(1e-4)


@pytest.mark.parametrize("arch,bias", [("kraken", True), ("gpt", True), ("kraken", False), ("ladder", False)])
def test_weight_decay_only_on_matrices(arch, bias):
    untied = {"norm": "rmsnorm", "tie_embeddings": False} if arch == "ladder" else {}
    cfg = ModelConfig(**(TINY | dict(arch=arch, bias=bias, n_sub=2 if arch == "kraken" else 1) | untied))
    model = Transformer(cfg)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in ids}
    # stacked [N, d] norm gains and biases are vectors per sub-layer: never decayed
    assert not any("ln" in n or "bias" in n for n in names)
    want = {"wte.weight", "wpe.weight", "layers.0.attn.qkv_weight", "layers.1.mlp.down_weight"}
    assert want <= names and (("conj_weight" in names) == (arch == "kraken"))
    assert ("lm_head.weight" in names) == bool(untied)  # an untied head is a matrix like the embedding
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_fused_optimizer_steps_like_the_unfused_one():
    """make_optimizer's fused AdamW (one pass per step) must update weights as the foreach AdamW does."""
    cfg = ModelConfig(**(TINY | dict(arch="kraken", n_sub=2)))
    # Seeded: the init used to come from whatever the global RNG held after earlier tests, and Adam's step on a
    # near-zero gradient amplifies summation-order differences (seeds 0-11: worst element 0.12-2.9x the tolerance)
    torch.manual_seed(0)
    models = [Transformer(cfg), Transformer(cfg)]
    models[1].load_state_dict(models[0].state_dict())
    fused = make_optimizer(models[0], 1e-2, (0.9, 0.95), 0.1)
    plain = torch.optim.AdamW(param_groups(models[1], 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    assert fused.defaults["fused"] and [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]
    idx = torch.randint(cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for model, opt in zip(models, (fused, plain), strict=True):
            F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# checkpoints ---------------------------------------------------------------------------------------
LADDER_LLAMA = TINY | dict(arch="ladder", n_sub=1, norm="rmsnorm", mlp="swiglu", position="rope", tie_embeddings=False)


@pytest.mark.parametrize("fields", [TINY, LADDER_LLAMA], ids=["kraken", "ladder-llama"])
def test_trained_checkpoint_loads_and_generates(data_dir, tmp_path, fields):
    result = train(tiny_train_config(data_dir, tmp_path / "run"), ModelConfig(**fields), progress=False)
    assert result.step == 6 and result.checkpoint.name == "step-000006"
    records = read_metrics(tmp_path / "run" / METRICS_FILE)
    assert [r["step"] for r in records] == list(range(1, 7)) and "val_loss" in records[2]
    assert records[-1]["loss"] < records[0]["loss"]
    model = load_model(tmp_path / "run" / LATEST)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    out = generate(model, [[104, 105]], max_new_tokens=5)
    assert len(out.tokens[0]) == 5
    # the saved weights are the trained ones: the val loss logged at the end is reproduced
    val = math.log(perplexity(model, data_dir, block_size=32, num_windows=4, batch_size=4, seed=1))
    assert val == pytest.approx(records[-1]["val_loss"], rel=1e-6)


def test_corrupt_or_incomplete_checkpoint_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tiny_train_config(data_dir, out, steps=2)
    train(cfg, ModelConfig(**TINY), progress=False)
    ckpt = (out / LATEST).resolve()
    weights = ckpt / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF
    weights.write_bytes(bytes(blob))
    more = cfg.replace(steps=4)
    with pytest.raises(CheckpointError, match="checksum"):
        train(more, None, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="checksum"):  # nor served: generate / eval load it the same way
        load_model(ckpt)
    argv = ["train", "--out", str(out), "--resume", "--steps", "4", "--no-progress"]
    assert cli_main(argv) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    (ckpt / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        train(more, None, resume=True, progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(more, ModelConfig(**TINY), progress=False)


# perplexity ----------------------------------------------------------------------------------------
def test_perplexity_is_exp_of_manual_cross_entropy(data_dir):
    model = Transformer(ModelConfig(**TINY))
    model.reset_parameters(7)
    tokens = load_tokens(data_dir, "val")
    starts = window_starts(len(tokens), 16, 5, torch.Generator().manual_seed(3))
    losses = []
    with torch.no_grad():
        for s in starts.tolist():
            window = torch.from_numpy(np.asarray(tokens[s:s + 17], dtype=np.int64))
            logp = F.log_softmax(model(window[None, :-1])[0].double(), dim=-1)
            losses += (-logp.gather(1, window[1:, None])).flatten().tolist()
    want = math.exp(sum(losses) / len(losses))
    got = perplexity(model, data_dir, block_size=16, num_windows=5, batch_size=2, seed=3)
    assert got == pytest.approx(want, rel=1e-5)
    assert perplexity(model, np.asarray(tokens), block_size=16, num_windows=5, batch_size=5, seed=3) \
        == pytest.approx(got, rel=1e-6)
    assert perplexity(model, tokens, block_size=16, num_windows=5, seed=4) != pytest.approx(got, rel=1e-6)
    x, y = gather_windows(tokens, starts[:1], 16)
    assert torch.equal(x[0, 1:], y[0, :-1])
