"""`krakenlm export --format hf`: transformers loads the directory and computes what krakenlm computes.

Every architecture and the Llama-family options, on tiny random models whose weights are large enough
that every module changes the logits (checked: another wiring of the same weights is far off): logits
within 1e-4 of krakenlm's forward (fp32), with and without padding; greedy `generate` identical to
krakenlm's generation; lm-eval's own `hf` model scores like the krakenlm adapter. Nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from krakenlm.config import ModelConfig  # noqa: E402
from krakenlm.generate import SamplingConfig, generate  # noqa: E402
from krakenlm.interop.hf_export import MARKER_FILE, choose_layout, export_model  # noqa: E402
from krakenlm.model import Transformer  # noqa: E402

EOT = 256  # the byte tokenizer's end of text
LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu")
CONFIGS = {
    "gpt": dict(arch="gpt"),
    "parallel": dict(arch="parallel"),
    "kraken": dict(arch="kraken", n_sub=2, n_head=2),
    "kraken-3way-llama-gqa-untied": dict(arch="kraken", n_sub=3, n_head=4, n_kv_head=2, head_dim=6, bias=True,
                                         tie_embeddings=False, rope_theta=500.0, **LLAMA),
    "ladder": dict(arch="ladder"),
    "ladder-last-2-llama-mqa": dict(arch="ladder", ladder_layers=2, n_kv_head=1, bias=False, **LLAMA),
    "parallel-rope-swiglu-head_dim": dict(arch="parallel", position="rope", mlp="swiglu", head_dim=12, bias=False),
    "gpt-llama-gqa-untied": dict(arch="gpt", n_kv_head=2, bias=False, tie_embeddings=False, **LLAMA),
    "kraken-rmsnorm-bias-learned": dict(arch="kraken", n_sub=2, n_head=2, norm="rmsnorm", bias=True,
                                        ffn_hidden=40),
}


def make_config(name: str) -> ModelConfig:
    base = dict(n_layer=3, n_embd=32, n_head=4, vocab_size=257, block_size=64, bias=True)
    return ModelConfig(**base | CONFIGS[name])


def loud_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """Random weights with logits of O(1) spread, so each module's contribution is far above 1e-4."""
    model = Transformer(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            norm = name.startswith("ln") or ".ln" in name
            p.copy_((1.0 if norm and name.endswith("weight") else 0.0) + (0.2 if norm else 0.15) * noise)
    return model


def load_hf(path: Path) -> torch.nn.Module:
    model, info = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(config name, krakenlm model, transformers model), exported with krakenlm's own model class."""
    model = loud_model(make_config(request.param))
    path = tmp_path_factory.mktemp("export") / request.param
    assert export_model(model, path, format="hf-krakenlm").layout == "krakenlm"
    return request.param, model, load_hf(path)


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_logits_equal_krakenlm(exported: tuple) -> None:
    name, ours, theirs = exported
    ids = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ours(ids), theirs(ids).logits
    delta = (want - got).abs().max().item()
    print(f"{name}: max |logit delta| {delta:.2e} (logit std {want.std():.2f})")
    assert delta < 1e-4 and want.std() > 0.3


def test_left_padded_logits_equal_krakenlm(exported: tuple) -> None:
    """A padded batch: krakenlm's forward with its valid mask and positions, transformers' with attention_mask."""
    _, ours, theirs = exported
    prompts = [list(range(40, 70)), [7, 8, 9, 250, 3]]
    ids, mask = _left_padded(prompts)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ours(ids, positions=positions, valid=mask.bool())
        got = theirs(ids, attention_mask=mask).logits
    assert (want - got)[mask.bool()].abs().max().item() < 1e-4


def test_greedy_generate_equals_krakenlm(exported: tuple) -> None:
    """A batch of two prompts of different lengths (left padding), decoded with transformers' cache."""
    _, ours, theirs = exported
    prompts = [[5, 9, 100, 3, 7, 200, 31, 64], [44, 45]]
    want = generate(ours, prompts, 16, SamplingConfig(), stop_token=EOT).tokens
    ids, mask = _left_padded(prompts)
    out = theirs.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=EOT,
                          pad_token_id=EOT)[:, ids.shape[1]:].tolist()
    got = [row[:row.index(EOT)] if EOT in row else row for row in out]
    assert got == want


def test_wiring_matters(exported: tuple) -> None:
    """The same weights wired another way give other logits: the equality above tests the wiring."""
    _, ours, theirs = exported
    other = {"gpt": "ladder", "ladder": "gpt", "parallel": None, "kraken": None}[ours.config.arch]
    if other is None:
        pytest.skip("no other architecture has these weights' shapes")
    config = ours.config.replace(arch=other, ladder_layers=None)
    twin = Transformer(config, init=False).eval()
    twin.load_state_dict(ours.state_dict())
    ids = torch.arange(30).unsqueeze(0)
    with torch.no_grad():
        assert (twin(ids) - theirs(ids).logits).abs().max().item() > 1e-2


def test_cache_steps_equal_full_forward(exported: tuple) -> None:
    """Prefill 10 tokens, then 5 one at a time through the returned cache: the full forward's logits."""
    *_, theirs = exported
    ids = torch.randint(0, 257, (2, 15), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = theirs(ids).logits
        out = theirs(ids[:, :10], use_cache=True)
        steps, cache = [out.logits], out.cache
        for i in range(10, 15):
            out = theirs(ids[:, i:i + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-4


# The directory's contract (shared with krakenlm's vLLM plugin) -----------------------------------------
def test_directory_contract(tmp_path: Path) -> None:
    config = make_config("kraken-3way-llama-gqa-untied")
    model = loud_model(config)
    export_model(model, tmp_path / "out", format="hf")
    out = tmp_path / "out"
    doc = json.loads((out / "config.json").read_text())
    assert doc["model_type"] == "krakenlm" and doc["architectures"] == ["KrakenLMForCausalLM"]
    assert doc["auto_map"] == {"AutoConfig": "configuration_krakenlm.KrakenLMConfig",
                               "AutoModelForCausalLM": "modeling_krakenlm.KrakenLMForCausalLM"}
    assert doc["krakenlm"] == config.to_dict() and ModelConfig.from_dict(doc["krakenlm"]) == config
    assert {k: doc[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "head_dim", "max_position_embeddings",
                                "tie_word_embeddings", "rope_theta", "torch_dtype", "bos_token_id",
                                "eos_token_id")} == {
        "vocab_size": 257, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 6, "max_position_embeddings": 64, "tie_word_embeddings": False,
        "rope_theta": 500.0, "torch_dtype": "float32", "bos_token_id": EOT, "eos_token_id": EOT}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        stored = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    native = model.state_dict()
    assert stored.keys() == native.keys() and "layers.0.attn.qkv_weight" in stored
    assert all(torch.equal(stored[k], native[k]) for k in native)
    assert stored["layers.0.attn.qkv_weight"].shape == (3, (4 + 2 * 2) * 6, 32)
    assert {p.name for p in out.iterdir()} == {
        "config.json", "model.safetensors", "configuration_krakenlm.py", "modeling_krakenlm.py",
        "tokenizer.json", "tokenizer_config.json", "generation_config.json", MARKER_FILE}
    hf = load_hf(out)
    arch_fields = {k: getattr(hf.config, k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                      "head_dim", "intermediate_size")}
    assert arch_fields == {k: doc[k] for k in arch_fields}  # the config class derives what the exporter wrote


def test_krakenlm_reads_its_export_back(tmp_path: Path) -> None:
    """krakenlm loads an export like a native checkpoint; a tensor-parallel rank reads only its sub-layer."""
    from krakenlm.checkpoint import Checkpoint
    from krakenlm.model import Shard

    config = make_config("kraken-3way-llama-gqa-untied")
    model = loud_model(config)
    export_model(model, tmp_path / "out")
    checkpoint = Checkpoint(tmp_path / "out")
    assert checkpoint.format == "hf-krakenlm" and checkpoint.config == config
    native = model.state_dict()
    assert all(torch.equal(checkpoint.state()[k], v) for k, v in native.items())
    rank1 = checkpoint.state(Shard(1, 1, 0, 1))
    assert torch.equal(rank1["layers.2.attn.qkv_weight"], native["layers.2.attn.qkv_weight"][1:2])


def test_tied_head_is_not_stored_and_save_pretrained_keeps_native_names(tmp_path: Path) -> None:
    model = loud_model(make_config("kraken"))
    export_model(model, tmp_path / "out", format="hf")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "conj_weight" in names
    hf = load_hf(tmp_path / "out")
    assert hf.lm_head.weight is hf.wte.weight
    hf.save_pretrained(tmp_path / "again")
    with safe_open(str(tmp_path / "again" / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict())


def test_shipped_files_import_only_torch_transformers_and_stdlib() -> None:
    from krakenlm.interop.hf_export import SHIPPED_DIR, SHIPPED_FILES

    allowed = {"torch", "transformers", "dataclasses", "typing", "__future__", "math"}
    for name in SHIPPED_FILES:
        text = (SHIPPED_DIR / name).read_text()
        modules = re.findall(r"^\s*(?:from|import) (\.?[\w]+)", text, flags=re.M)
        assert modules and {m for m in modules if not m.startswith(".")} <= allowed, (name, modules)


# GPT-shaped models stay plain GPT-2 / Llama ---------------------------------------------------------------
@pytest.mark.parametrize("name,layout,model_type", [("gpt", "gpt2", "gpt2"), ("gpt-llama-gqa-untied", "llama", "llama"),
                                                    ("parallel", "krakenlm", "krakenlm")])
def test_auto_layout_and_round_trip(name: str, layout: str, model_type: str, tmp_path: Path) -> None:
    from krakenlm.checkpoint import load_state

    config = make_config(name)
    if layout == "llama":
        config = config.replace(rope_theta=500000.0, head_dim=12, norm_eps=1e-6)
    model = loud_model(config)
    assert choose_layout(config) == layout and choose_layout(config, "hf-krakenlm") == "krakenlm"
    assert export_model(model, tmp_path / "out").layout == layout
    hf = load_hf(tmp_path / "out")
    assert hf.config.model_type == model_type
    ids = torch.randint(0, 257, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4
    if layout != "krakenlm":  # krakenlm reads the plain layouts back: the same tensors
        _, state = load_state(tmp_path / "out")
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# Tokenizers ------------------------------------------------------------------------------------------------
TEXTS = ["Hello, world! It's 3.14159 o'clock.", "héllo wörld ✓ 日本語", "  spaces\n\ttabs  and\r\nlines ",
         "don't stop'll 've"]


def _hf_tokenizer(path: Path) -> AutoTokenizer:
    return AutoTokenizer.from_pretrained(path, trust_remote_code=True)


def test_byte_tokenizer_files(tmp_path: Path) -> None:
    from krakenlm.tokenizer import ByteTokenizer

    export_model(loud_model(make_config("ladder")), tmp_path / "out")
    tok, ours = _hf_tokenizer(tmp_path / "out"), ByteTokenizer()
    for text in TEXTS:
        assert tok(text)["input_ids"] == ours.encode(text)
        assert tok.decode(ours.encode(text)) == text
    assert tok.eos_token_id == tok.bos_token_id == EOT


def test_gpt2_tokenizer_files(tmp_path: Path) -> None:
    from krakenlm.tokenizer import GPT2Tokenizer

    config = ModelConfig(arch="kraken", n_layer=1, n_embd=8, n_head=1, n_sub=2, vocab_size=50304, block_size=16)
    export_model(loud_model(config), tmp_path / "out")
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    tok, ours = _hf_tokenizer(tmp_path / "out"), GPT2Tokenizer()
    for text in [*TEXTS, "end<|endoftext|>start"]:
        assert tok(text)["input_ids"] == ours.encode(text)
    assert tok.eos_token_id == tok.bos_token_id == 50256


def test_corpus_bpe_tokenizer_files(tmp_path: Path) -> None:
    from krakenlm.data import prepare
    from krakenlm.tokenizer import load_bpe

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat and the dog sat on the log. " * 30)
    prepare(tmp_path / "data", [corpus], tokenizer="bpe:300", val_fraction=0.5)
    config = ModelConfig(arch="parallel", n_layer=1, n_embd=16, n_head=2, vocab_size=320, block_size=32)
    export_model(loud_model(config), tmp_path / "out", tokenizer=str(tmp_path / "data"))
    tok, ours = _hf_tokenizer(tmp_path / "out"), load_bpe(tmp_path / "data")
    for text in ["the cat sat on the log", *TEXTS]:
        assert tok(text)["input_ids"] == ours.encode(text)
    assert tok.eos_token_id == ours.eot_token


def test_no_tokenizer(tmp_path: Path) -> None:
    export_model(loud_model(make_config("parallel")), tmp_path / "out", tokenizer="none")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "tokenizer.json" not in names and "generation_config.json" in names
    assert "eos_token_id" not in json.loads((tmp_path / "out" / "config.json").read_text())
    load_hf(tmp_path / "out")


# lm-eval: its own `hf` model on the export scores like krakenlm's adapter on the checkpoint --------------------
@pytest.fixture(scope="module", params=["kraken", "kraken-3way-llama-gqa-untied", "ladder-last-2-llama-mqa"])
def lm_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate")
    from lm_eval.models.huggingface import HFLM

    from krakenlm.checkpoint import save_checkpoint
    from krakenlm.eval.harness import KrakenLM

    config = make_config(request.param)
    model = loud_model(config)
    root = tmp_path_factory.mktemp("lm-eval")
    save_checkpoint(root / "native", model, config)
    export_model(model, root / "hf", format="hf")
    hf = HFLM(pretrained=str(root / "hf"), trust_remote_code=True, device="cpu", batch_size=4, dtype="float32")
    return hf, KrakenLM(checkpoint=str(root / "native"), batch_size=3, device="cpu", tokenizer="bytes")


def test_lm_eval_hf_loglikelihoods_equal_krakenlm_adapter(lm_pair: tuple) -> None:
    from lm_eval.api.instance import Instance

    hf, ours = lm_pair
    assert hf.max_length == ours.max_length and hf.prefix_token_id == ours.prefix_token_id == EOT
    pairs = [("The cat sat on the", " mat"), ("Question: is it true?\nAnswer:", " yes"), ("", "empty context"),
             ("word " * 30, " is truncated from the left"), ("héllo", " wörld")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    want, got = ours.loglikelihood(requests, disable_tqdm=True), hf.loglikelihood(requests, disable_tqdm=True)
    delta = max(abs(a[0] - b[0]) for a, b in zip(want, got, strict=True))
    print(f"max |delta loglikelihood| lm-eval hf vs krakenlm: {delta:.2e}")
    assert delta < 1e-4 and [a[1] for a in want] == [b[1] for b in got]
    rolling = [Instance("loglikelihood_rolling", {}, (" ".join(f"item {i} costs {i * 7 % 13}" for i in range(20)),), 0)]
    assert ours.loglikelihood_rolling(rolling, disable_tqdm=True) == pytest.approx(
        hf.loglikelihood_rolling(rolling, disable_tqdm=True), abs=1e-4)


def test_lm_eval_local_task_per_example_equal(lm_pair: tuple, tmp_path: Path) -> None:
    """The local BoolQ and COPA tasks through lm-eval's evaluator: every example's log-likelihoods."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from krakenlm.eval import tasks as sg
    from tests.test_eval_tasks import write_data

    names = sg.render_tasks(write_data(tmp_path / "data"), tmp_path / "tasks", ["boolq", "copa"])
    scores = []
    for lm in lm_pair:
        out = simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                                              include_defaults=False),
                              log_samples=True, bootstrap_iters=0)
        scores.append({(task, s["doc_id"]): [r[0][0] for r in s["resps"]] for task in names
                       for s in out["samples"][task]})
    hf, ours = scores
    assert hf.keys() == ours.keys() and len(hf) == 5
    delta = max(abs(a - b) for k in hf for a, b in zip(hf[k], ours[k], strict=True))
    print(f"local tasks: max |delta loglikelihood| lm-eval hf vs krakenlm over {len(hf)} examples: {delta:.2e}")
    assert delta < 1e-4


# The CLI ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def native_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from krakenlm.checkpoint import save_checkpoint

    config = make_config("ladder")
    path = tmp_path_factory.mktemp("cli") / "ckpt"
    save_checkpoint(path, loud_model(config), config)
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from krakenlm.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_export_and_export_again(native_checkpoint: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from krakenlm.checkpoint import load_model

    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine
    code, stdout, _ = _run(["export", "--format", "hf", str(native_checkpoint), str(out)], capsys)
    assert code == 0 and "krakenlm layout" in stdout and "trust_remote_code=True" in stdout
    first = (out / "model.safetensors").read_bytes()
    assert _run(["export", str(native_checkpoint), str(out)], capsys)[0] == 0  # an earlier export is replaced
    assert (out / "model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging directory left behind
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        assert (load_model(native_checkpoint)(ids) - load_hf(out)(ids).logits).abs().max().item() < 1e-4


def test_greedy_text_identical(native_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Text in, text out: transformers' tokenizer + generate on the export, krakenlm's engine on the checkpoint."""
    from krakenlm.engine import Engine, EngineOptions
    from krakenlm.source import ModelSource
    from krakenlm.tokenizer import ByteTokenizer

    assert _run(["export", str(native_checkpoint), str(tmp_path / "out")], capsys)[0] == 0
    prompts, tok = ["To be, or not to be", "héllo"], ByteTokenizer()
    with Engine.launch(ModelSource(checkpoint=str(native_checkpoint)), EngineOptions(device="cpu", dtype="fp32")) as e:
        result = e.generate([tok.encode(p) for p in prompts], 20, SamplingConfig())
    want = [tok.decode(tokens) for tokens in result.tokens]
    hf_tok, hf = _hf_tokenizer(tmp_path / "out"), load_hf(tmp_path / "out")
    hf_tok.padding_side = "left"
    batch = hf_tok(prompts, return_tensors="pt", padding=True)
    out = hf.generate(**batch, max_new_tokens=20, do_sample=False)
    assert hf_tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True) == want


@pytest.mark.parametrize("case,message", [
    ("foreign", "is a non-empty directory that is not a krakenlm export"),
    ("file", "not a directory; refusing to replace it"),
    ("device", "not a directory; refusing to replace it"),
    ("symlink", "is a symbolic link"),
    ("missing", "no such checkpoint"),
    ("tokenizer", "tokenizer: 'gpt2' has 50257 tokens but the model only 257"),
])
def test_cli_export_errors_are_one_line_and_touch_nothing(case: str, message: str, native_checkpoint: Path,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, checkpoint, extra = tmp_path / "out", native_checkpoint, []
    if case == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "file":
        out.write_text("mine")
    elif case == "device":
        out = Path("/dev/null")
    elif case == "symlink":
        (tmp_path / "real").mkdir()
        out.symlink_to(tmp_path / "real")
    elif case == "missing":
        checkpoint = tmp_path / "nope"
    else:
        extra = ["--tokenizer", "gpt2"]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = _run(["export", *extra, str(checkpoint), str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("krakenlm export: error:") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "foreign":
        assert (out / "notes.txt").read_text() == "mine"
    if case == "file":
        assert out.read_text() == "mine"


def test_cli_export_bad_format_is_refused(native_checkpoint: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _run(["export", "--format", "onnx", str(native_checkpoint), str(tmp_path / "out")], capsys)
    assert exit_info.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_shipped_files_are_package_data() -> None:
    """The wheel must carry hf_files/ (not a Python package, so only package-data puts it there)."""
    import fnmatch

    from krakenlm.interop.hf_export import SHIPPED_FILES

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["krakenlm.interop"]
    assert all(any(fnmatch.fnmatch(f"hf_files/{name}", p) for p in patterns) for name in SHIPPED_FILES)


def test_static_cache_is_refused_by_name(tmp_path: Path) -> None:
    export_model(loud_model(make_config("kraken")), tmp_path / "out")
    hf = load_hf(tmp_path / "out")
    with pytest.raises(ValueError, match="DynamicCache"):
        hf.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, cache_implementation="static")


def test_learned_positions_export_no_rope_field(tmp_path: Path) -> None:
    """vLLM reads any RoPE field as RoPE and refuses an odd head size for it (Kraken 125M's 113): a model with
    learned positions carries none, in config.json nor in the config class the vLLM plugin registers."""
    from krakenlm.interop.hf_config import KrakenLMConfig

    config = ModelConfig(arch="kraken", n_sub=2, n_layer=1, n_embd=18, n_head=2, vocab_size=257, block_size=16)
    doc = json.loads((export_model(Transformer(config), tmp_path / "out", tokenizer="bytes").path
                       / "config.json").read_text())
    assert config.head_size == 9 and not {k for k in doc if k.startswith("rope")}
    hf = KrakenLMConfig(**{k: v for k, v in doc.items() if k not in ("model_type", "architectures", "auto_map")})
    assert getattr(hf, "rope_theta", None) is None and not getattr(hf, "rope_parameters", None)
