"""A seeded input fuzzer for issue 15's promise: every input is a valid result or a typed krakenlm error
that names the field or file; never another exception, a hang past CASE_TIMEOUT_S, or a non-finite result.

Three families, each a function (rng, workspace) -> Case:
- model configs: ModelConfig.from_dict over good, bad-typed, non-finite and absurd field values;
- checkpoint files: a valid native checkpoint or Kraken-authors .pt, damaged one way (truncation, bit
  flips, another dtype, a non-tensor value, NaN, a config field, a FIFO / directory / device in a file's
  place, a missing file), sometimes with the manifest re-sealed as a hand edit would;
- CLI arguments of `train`, `prepare`, `eval ppl` and `presets`, run in-process through krakenlm.cli.main.

tests/fuzz_verbs.py adds issue 26's families (every verb's arguments, the files verbs read, HTTP bodies), and
the judge below also fails a case that creates or changes a file outside its named outputs, or prints a
non-finite number. tests/test_fuzz_inputs.py runs a sample in CI; benchmarks/fuzz_inputs.py runs many and
prints the counts.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import re
import shutil
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CASE_TIMEOUT_S = 60.0
OUTCOMES = ("valid", "clear error", "other")

_INTS = [1, 2, 3, 4, 0, -1, -64, 10**12, 2**63, 1.5, 2.0, float("nan"), float("inf"), "4", True, None, [2], {}]
_FLOATS = [1e-5, 0.5, 1.0, 0.0, -1.0, 1e30, 1e-300, float("nan"), float("inf"), -float("inf"), "1e-5", True, None]
_CLI_NUMBERS = ["1", "2", "0", "-1", "-64", "1e12", str(10**12), "nan", "inf", "-inf", "0.5", "abc", ""]


@dataclass
class Case:
    """One input: `run()` returns a result to check (or raises); `hints` are the names a clear error may cite."""

    family: str
    description: str
    run: Callable[[], Any]
    hints: list[str] = field(default_factory=list)
    workdir: Path | None = None  # the case runs here (its cwd); only `outputs` may appear or change in it
    outputs: list[Path] = field(default_factory=list)


@dataclass
class Workspace:
    """Pristine inputs every case copies from, made once (tiny: the fuzz is about inputs, not models)."""

    root: Path
    native: Path
    authors: Path
    data: Path
    text: Path
    config_json: Path
    counter: int = 0

    def fresh(self, name: str) -> Path:
        self.counter += 1
        path = self.root / "cases" / f"{self.counter:05d}-{name}"
        path.mkdir(parents=True)
        return path


TINY = dict(arch="kraken", n_layer=2, n_embd=32, n_head=2, n_sub=2, vocab_size=257, block_size=32, bias=False)


def make_workspace(root: Path) -> Workspace:
    from krakenlm.checkpoint import save_checkpoint
    from krakenlm.config import ModelConfig
    from krakenlm.data import prepare
    from krakenlm.source import build_model
    from tests.reference_kraken import ReferenceKraken

    root.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig(**TINY)
    native = save_checkpoint(root / "native", build_model(config=cfg, seed=0), cfg)
    ref = ReferenceKraken(n_layer=2, n_sub=2, d=32, heads_per_sub=2, vocab=257, block=32)
    state = dict(ref.state_dict())
    args = {"n_layer": 2, "n_head": 4, "n_heads_in_split": 2, "n_embd": 32, "ffn_expansion": 2, "bias": False,
            "block_size": 32, "vocab_size": 257}
    torch.save({"model": state, "model_args": args, "iter_num": np.int64(3), "best_val_loss": np.float32(2.5)},
               root / "ckpt.pt")
    text = root / "corpus.txt"
    rng = random.Random(0)
    text.write_text(" ".join(rng.choice(["the", "king", "night", "sword", "thou"]) for _ in range(3000)) + "\n")
    prepare(root / "data", [text], tokenizer="bytes", val_fraction=0.2)
    (root / "model.json").write_text(json.dumps(TINY))
    return Workspace(root, native, root / "ckpt.pt", root / "data", text, root / "model.json")


# Model configs -----------------------------------------------------------------------------------------------
def config_case(rng: random.Random, ws: Workspace) -> Case:
    from krakenlm.config import ModelConfig
    from krakenlm.resources import model_bytes, require_memory
    from krakenlm.source import build_model

    data: dict[str, Any] = dict(TINY)
    changed = rng.sample(sorted(ModelConfig.__dataclass_fields__), rng.randint(1, 3))
    for name in changed:
        pick = rng.random()
        if name in ("arch", "mlp", "position", "name"):
            data[name] = rng.choice(["gpt", "parallel", "kraken", "swiglu", "rope", "learned", "bert", 3, None])
        elif name == "norm_eps":
            data[name] = rng.choice(_FLOATS)
        elif name == "bias":
            data[name] = rng.choice([True, False, "yes", 1, None])
        elif pick < 0.1:
            data.pop(name, None)
        else:
            data[name] = rng.choice(_INTS)
    if rng.random() < 0.05:
        data["n_layers"] = 3  # a typo

    def run() -> Any:
        cfg = ModelConfig.from_dict(data, ("n_layer", "n_embd", "n_head", "vocab_size", "block_size"))
        if cfg.num_params() > 2_000_000 or cfg.n_layer > 8:  # the decision is what matters; do not build big models
            require_memory(model_bytes(cfg), "fuzz model")
            return "checked"
        model = build_model(config=cfg, seed=0)
        with torch.no_grad():
            return model(torch.randint(0, cfg.vocab_size, (1, min(5, cfg.block_size))))

    return Case("config", f"config {json.dumps(data, default=str)}", run, [*changed, "config", "GiB", "n_layers"])


# Checkpoint files --------------------------------------------------------------------------------------------
def _non_regular(path: Path, rng: random.Random) -> str:
    kind = rng.choice(["fifo", "directory", "device"])
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    return kind


def _damage_bytes(path: Path, rng: random.Random) -> str:
    blob = bytearray(path.read_bytes())
    if rng.random() < 0.4:
        cut = rng.randrange(len(blob) + 1)
        path.write_bytes(bytes(blob[:cut]))
        return f"truncated to {cut} bytes"
    flips = rng.choice([1, 1, 2, 8])
    for _ in range(flips):
        pos = rng.randrange(len(blob))
        blob[pos] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(blob))
    return f"{flips} bit flip(s)"


_DTYPES = [torch.int64, torch.int32, torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float64]


def _mutate_tensors(state: dict[str, Any], rng: random.Random) -> str:
    name = rng.choice(sorted(state))
    how = rng.choice(["dtype", "nan", "inf", "shape", "drop", "type"])
    if how == "dtype":
        dtype = rng.choice(_DTYPES)
        state[name] = state[name].to(dtype)
        return f"{name} as {dtype}"
    if how in ("nan", "inf"):
        state[name] = state[name].clone()
        state[name].view(-1)[rng.randrange(state[name].numel())] = float(how)
        return f"{how} in {name}"
    if how == "shape":
        state[name] = state[name].reshape(-1)[:-1].clone() if state[name].numel() > 1 else torch.zeros(3)
        return f"{name} reshaped"
    if how == "drop":
        del state[name]
        return f"{name} removed"
    state[name] = rng.choice(["a string", 3, [1.0, 2.0], np.float32(1.0)])
    return f"{name} replaced by a {type(state[name]).__name__}"


def _native_mutation(ck: Path, rng: random.Random) -> str:
    from krakenlm.checkpoint import write_manifest

    target = rng.choice(["config.json", "model.safetensors", "manifest.json"])
    what = rng.choice(["bytes", "non-regular", "delete", "tensors", "config"])
    if what == "bytes":
        note = _damage_bytes(ck / target, rng)
    elif what == "non-regular":
        return f"{target} is a {_non_regular(ck / target, rng)}"
    elif what == "delete":
        (ck / target).unlink()
        note = "deleted"
    elif what == "tensors":
        state: dict[str, Any] = load_file(str(ck / "model.safetensors"))
        note = _mutate_tensors(state, rng)
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        save_file(state, str(ck / "model.safetensors"))
        target = "model.safetensors"
    else:
        doc = json.loads((ck / "config.json").read_text())
        key = rng.choice(sorted(doc["config"]))
        if rng.random() < 0.3:
            del doc["config"][key]
        else:
            doc["config"][key] = rng.choice(_INTS + _FLOATS)
        (ck / "config.json").write_text(json.dumps(doc, default=str))
        note, target = f"config {key} changed", "config.json"
    if rng.random() < 0.5 and what in ("tensors", "config") and (ck / "manifest.json").is_file():
        with contextlib.suppress(Exception):  # a hand edit re-seals (random byte damage is the manifest's to catch)
            write_manifest(ck)
            note += ", manifest re-sealed"
    return f"{target}: {note}"


def _authors_mutation(pt: Path, rng: random.Random) -> str:
    what = rng.choice(["bytes", "non-regular", "tensors", "args", "pickle"])
    if what == "bytes":
        return _damage_bytes(pt, rng)
    if what == "non-regular":
        return f"a {_non_regular(pt, rng)}"
    ckpt = torch.load(pt, weights_only=False)
    if what == "tensors":
        note = _mutate_tensors(ckpt["model"], rng)
    elif what == "args":
        key = rng.choice(sorted(ckpt["model_args"]))
        ckpt["model_args"][key] = rng.choice(_INTS)
        note = f"model_args {key}={ckpt['model_args'][key]!r}"
    else:
        ckpt["extra"] = rng.choice([np.zeros(2), np.float64(1.0), np.int32(3), os.getcwd, {"set": {1, 2}}])
        note = f"extra {type(ckpt['extra']).__name__}"
    torch.save(ckpt, pt)
    return note


def checkpoint_case(rng: random.Random, ws: Workspace) -> Case:
    from krakenlm.checkpoint import load_model

    base = ws.fresh("ckpt")
    if rng.random() < 0.5:
        path = base / "native"
        shutil.copytree(ws.native, path)
        note = _native_mutation(path, rng)
    else:
        path = base / "ckpt.pt"
        shutil.copy(ws.authors, path)
        note = _authors_mutation(path, rng)
        path = path if rng.random() < 0.7 else base  # the run directory holding ckpt.pt

    def run() -> Any:
        model = load_model(path)
        with torch.no_grad():
            return model(torch.randint(0, model.config.vocab_size, (1, 5)))

    return Case("checkpoint", f"{path.name}: {note}", run, [str(base)])


# CLI arguments -------------------------------------------------------------------------------------------------
def _path_choice(rng: random.Random, ws: Workspace, good: Path, base: Path) -> Path:
    pick = rng.random()
    if pick < 0.6:
        return good
    kind = rng.choice(["missing", "file", "fifo", "dir"])
    ws.counter += 1
    path = base / f"odd-{kind}-{ws.counter}"
    if kind == "file":
        path.write_bytes(rng.choice([b"x", b"\xff\xfe\x00garbage", b"{}"]))
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    return path


def _flags(rng: random.Random, options: dict[str, list[str]]) -> list[str]:
    argv: list[str] = []
    for flag in rng.sample(sorted(options), rng.randint(0, min(4, len(options)))):
        argv += [flag, rng.choice(options[flag])]
    return argv


def cli_case(rng: random.Random, ws: Workspace) -> Case:

    base = ws.fresh("cli")
    verb = rng.choice(["train", "prepare", "eval ppl", "presets"])
    out = base / "out" if rng.random() < 0.8 else _path_choice(rng, ws, base / "out", base)
    if verb == "train":
        config = _path_choice(rng, ws, ws.config_json, base)
        data = _path_choice(rng, ws, ws.data, base)
        argv = ["train", "--config", str(config), "--data", str(data), "--out", str(out), "--no-progress",
                "--steps", rng.choice(["1", "2", "0", "-1", "nan"]), "--eval-windows", "2", "--batch-size", "2"]
        argv += _flags(rng, {f: _CLI_NUMBERS for f in ("--lr", "--weight-decay", "--grad-clip", "--peak-tflops",
                                                        "--warmup-steps", "--batch-size", "--eval-windows",
                                                        "--block-size", "--min-lr-ratio", "--beta2", "--grad-accum")}
                         | {"--dtype": ["fp32", "bf16", "fp8", ""], "--device": ["cpu", "gpu", "auto"]})
        hints = [str(config), str(data), str(out)]
    elif verb == "prepare":
        source = _path_choice(rng, ws, ws.text, base)
        argv = ["prepare", str(source), "--out", str(out), "--no-progress"]
        argv += _flags(rng, {"--tokenizer": ["bytes", "gpt2", "bpe:300", "bpe:0", "bpe:x", "bpe:99999999", "nope"],
                             "--val-fraction": _CLI_NUMBERS, "--split-by": ["tail", "documents", "lines"]})
        hints = [str(source), str(out), "val_fraction"]
    elif verb == "eval ppl":
        ckpt = _path_choice(rng, ws, ws.native, base)
        data = _path_choice(rng, ws, ws.data, base)
        argv = ["eval", "ppl", "--checkpoint", str(ckpt), "--data", str(data), "--windows", "4"]
        argv += _flags(rng, {"--windows": _CLI_NUMBERS, "--batch-size": _CLI_NUMBERS, "--ppl-seed": _CLI_NUMBERS,
                             "--split": ["val", "train", "test", ""], "--dtype": ["fp32", "bf16", "int8"],
                             "--device": ["cpu", "cuda:7", "tpu", "", "cpu:0"]})
        hints = [str(ckpt), str(data)]
    else:
        argv = ["presets"] + (["--json"] if rng.random() < 0.5 else []) + _flags(rng, {"--bogus": ["1"]})
        hints = []
    case = _cli_run(argv, ws, base)
    case.outputs = [out]
    case.hints += hints + ["windows", "GiB", "tokenizer"]
    return case


def _cli_run(argv: list[str], ws: Workspace, workdir: Path | None = None) -> Case:
    """A case running ``krakenlm <argv>`` in-process, in `workdir` (a fresh folder by default); a clear error
    may name any flag given."""
    from krakenlm.cli import main

    flags = [a for a in argv if a.startswith("--")]
    hints = flags + [a.lstrip("-").replace("-", "_") for a in flags]

    def run() -> Any:
        err, std = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
                rc = main(argv)
        except SystemExit as exit_:  # argparse's own usage errors: a usage line and one error line, exit 2
            if exit_.code == 2 and "error:" in err.getvalue() and "Traceback" not in err.getvalue():
                return CliError(err.getvalue().strip().splitlines()[-1])
            raise
        if rc == 0:
            return std.getvalue()
        lines = err.getvalue().strip().splitlines()
        if rc == 2 and lines and lines[-1].startswith(f"krakenlm {argv[0]}: error:"):
            return CliError(lines[-1])
        raise AssertionError(f"exit code {rc}, stderr {err.getvalue()[-500:]!r}")

    return Case("cli", " ".join(argv).replace(str(ws.root), "WS"), run, hints, workdir or ws.fresh(argv[0]))


class CliError(str):
    """The CLI's one-line error, returned (not raised) by a CLI case."""


def sampling_case(rng: random.Random, ws: Workspace) -> Case:
    """SamplingConfig fields of any type, then a draw over random logits: ids in range or a named error."""
    fields = {name: rng.choice(values) for name, values in (
        ("temperature", _FLOATS + [0, 2]), ("top_k", _INTS), ("top_p", _FLOATS + [0.9]), ("seed", _INTS))
        if rng.random() < 0.7}
    limit = rng.choice([None, 10, 50, 64])

    def run() -> Any:
        from krakenlm.generate import RowSampler, SamplingConfig

        config = SamplingConfig(**fields)
        tokens = RowSampler([config] * 3, torch.device("cpu"), limit)(torch.randn(3, 64) * 4)
        assert bool(((tokens >= 0) & (tokens < (limit or 64))).all()), tokens
        return tokens.float()

    return Case("sampling", f"SamplingConfig({fields}) limit={limit}", run, list(fields))


def generate_case(rng: random.Random, ws: Workspace) -> Case:
    """`krakenlm generate` on one device with fuzzed prompts and options (tp > 1 spawns ranks: left out)."""
    argv = ["generate", "--config", str(ws.config_json), "--tokenizer", "bytes", "--device", "cpu",
            "--max-new-tokens", "4", "--prompt", rng.choice(["hi", "", "x" * 200, "\udcff", "é", "To be"])]
    argv += _flags(rng, {f: _CLI_NUMBERS for f in ("--max-new-tokens", "--temperature", "--top-k", "--top-p",
                                                    "--timeout", "--pad-heads", "--seed")}
                   | {"--tp": ["1", "0", "-2", "abc", ""], "--dtype": ["fp32", "bf16", "int8"],
                      "--device": ["cpu", "gpu", "cuda:9", ""]})
    case = _cli_run(argv, ws)
    case.hints += ["prompt", "context", "tokenizer", "Unicode"]
    return case


_ENGINES: dict[Path, Any] = {}
_ODD_IDS: list[Any] = [0, 256, 257, -1, 10**6, 1.5, True, None, "3", float("nan")]


def _engine(ws: Workspace) -> Any:
    """One single-device Engine on the tiny native checkpoint per workspace (the fuzz is about the ids)."""
    from krakenlm.engine import Engine, EngineOptions
    from krakenlm.source import ModelSource

    if ws.root not in _ENGINES:
        _ENGINES[ws.root] = Engine(ModelSource(checkpoint=str(ws.native)), EngineOptions(device="cpu"))
    return _ENGINES[ws.root]


def engine_case(rng: random.Random, ws: Workspace) -> Case:
    """Engine.generate / Engine.score with fuzzed token ids, row counts and lengths (the library entry
    points the eval harness and the server call): ids in range, finite scores, or a named error."""
    def ids(most: int) -> list[Any]:
        return [rng.choice(_ODD_IDS) if rng.random() < 0.1 else rng.randrange(256) for _ in range(rng.randint(0, most))]

    rows = rng.choice([1, 1, 2, 3, 0])
    inputs = [ids(8) for _ in range(rows)]
    op = rng.choice(["generate", "score"])
    targets = [ids(3) for _ in range(rows + rng.choice([0, 0, 0, 1]))]
    new = rng.choice([0, 1, 3, 3, -1, 2.5, 40])

    def run() -> Any:
        engine = _engine(ws)
        if op == "score":
            return torch.tensor([lp for lp, _ in engine.score(inputs, targets)])
        tokens = engine.generate(inputs, new).tokens
        assert all(0 <= t < 257 for row in tokens for t in row) and len(tokens) == rows, tokens
        return tokens

    detail = f"targets={targets}" if op == "score" else f"max_new_tokens={new!r}"
    return Case("engine", f"{op}(inputs={inputs}, {detail})", run,
                ["prompt", "target", "max_new_tokens", "score", "context"])


Family = Callable[[random.Random, Workspace], Case]
FAMILIES: dict[str, Family] = {
    "config": config_case, "checkpoint": checkpoint_case, "cli": cli_case, "sampling": sampling_case,
    "generate": generate_case, "engine": engine_case}


# Running and judging -------------------------------------------------------------------------------------------
_NON_FINITE_WORD = re.compile(r"(?<![\w.'\"])-?(?:nan|inf)(?![\w'\"])")  # Python's float text, unquoted


def _finite(value: Any, printed: bool = True) -> bool:
    """False when a result holds NaN or Inf: a tensor, a float, JSON printed by a verb (any depth) or, in a
    verb's `printed` plain-text output, a bare nan / inf number (a string inside JSON is data, not a number)."""
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v, False) for v in value)
    if isinstance(value, dict):
        return all(_finite(v, False) for v in value.values())
    if isinstance(value, str) and printed and value.lstrip().startswith(("{", "[")):  # JSON printed by a verb
        for text in (value, value.strip().splitlines()[-1]):
            with contextlib.suppress(ValueError):
                return _finite(json.loads(text), False)
    if isinstance(value, str) and printed and not value.lstrip().startswith(("{", "[")):
        return _NON_FINITE_WORD.search(value.split("\n---\n")[-1]) is None  # generated text is not a number
    return True


def _snapshot(roots: list[Path]) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file and folder under `roots`, without following links (a FIFO stays unread)."""
    seen: dict[str, tuple[int, int]] = {}
    for root in roots:
        if root.is_file():
            seen[str(root)] = (root.stat().st_size, root.stat().st_mtime_ns)
        for folder, dirs, names in os.walk(root):
            for name in dirs + names:
                st = os.lstat(os.path.join(folder, name))
                seen[os.path.join(folder, name)] = (0 if stat.S_ISDIR(st.st_mode) else st.st_size, st.st_mtime_ns)
    return seen


def _touched(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], outputs: list[Path]) -> list[str]:
    """Paths created or changed that are not a case's outputs (nor inside one, nor a folder holding one)."""
    allowed = [str(p) for p in outputs]
    changed = [p for p, v in after.items() if before.get(p) != v]
    return [p for p in changed if not any(p == a or p.startswith(a + os.sep) or a.startswith(p + os.sep)
                                          for a in allowed)]


def _run_bounded(case: Case, timeout_s: float) -> dict[str, Any] | None:
    """Run the case in a thread, in its workdir; its value or error, None if it did not answer in time."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = case.run()
        except BaseException as err:  # noqa: BLE001  (judged by the caller)
            box["error"] = err

    cwd = os.getcwd()
    if case.workdir is not None:
        os.chdir(case.workdir)
    try:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(timeout_s)
    finally:
        os.chdir(cwd)
    return None if thread.is_alive() else box


def judge(case: Case, timeout_s: float = CASE_TIMEOUT_S, shared: list[Path] | None = None) -> tuple[str, str]:
    """(outcome, detail): "valid", "clear error" (typed, one line, names a hint) or "other" (a traceback, no
    answer within `timeout_s`, a non-finite result, an unclear message, or a file created or changed in the
    case's workdir or the `shared` inputs that is not one of its outputs)."""
    from krakenlm.errors import KrakenError

    watched = [*(shared or []), *([case.workdir] if case.workdir else [])]
    before = _snapshot(watched)
    box = _run_bounded(case, timeout_s)
    if box is None:
        return "other", f"no answer within {timeout_s} s"
    touched = _touched(before, _snapshot(watched), case.outputs)
    if touched:
        return "other", f"touched files outside its output path: {touched[:3]}"
    error = box.get("error")
    if isinstance(box.get("value"), CliError):
        error = box["value"]
    if error is None:
        return ("valid", "") if _finite(box.get("value")) else ("other", "non-finite result")
    message = str(error)
    if not isinstance(error, (KrakenError, CliError)):
        return "other", f"{type(error).__name__}: {message[:300]}"
    if "\n" in message.strip() or "\x1b" in message:
        return "other", f"multi-line or escaped message: {message[:300]!r}"
    if case.hints and not any(h and h in message for h in case.hints) and not _NAMED.match(message):
        return "other", f"message names no field or file: {message[:300]}"
    return "clear error", message[:200]


# "krakenlm VERB: error: NAME: ..." / "HTTP 400: NAME: ...": the message starts by naming what is wrong
_NAMED = re.compile(r"^(?:krakenlm [\w ]+: error: |HTTP \d+: )?[\w][\w .\-/'\[\]]{0,60}: ")


def run_fuzz(root: Path, seed: int, counts: dict[str, int], timeout_s: float = CASE_TIMEOUT_S,
             on_case: Callable[[Case, str, str], None] | None = None,
             families: dict[str, Family] | None = None) -> dict[str, dict[str, int]]:
    """Run counts[family] cases of each family (of `families`, default FAMILIES); returns outcome counts per
    family."""
    families = families or FAMILIES
    ws = make_workspace(root)
    shared = [ws.native, ws.data, ws.authors, ws.config_json, ws.root / "verb-inputs"]
    rng = random.Random(seed)
    tally = {family: dict.fromkeys(OUTCOMES, 0) for family in counts}
    for family, n in counts.items():
        for _ in range(n):
            case = families[family](rng, ws)
            outcome, detail = judge(case, timeout_s, shared)
            tally[family][outcome] += 1
            if on_case is not None:
                on_case(case, outcome, detail)
    return tally
