"""Issue 26's fuzz families, beside tests/fuzz.py's: every verb's arguments, the files verbs read (FIFOs,
device files, deep nesting, huge or non-finite values, wrong types, truncation) and HTTP request bodies.

Each CLI case runs in a folder of its own (its cwd) and names its output paths: a file created or changed
anywhere else in that folder, or in the shared inputs, is judged "other" (tests/fuzz.py's judge), as are a
traceback, a hang past CASE_TIMEOUT_S, a non-finite number in the output or a message naming nothing.

Verbs whose valid runs take minutes (serve, bench, demo, doctor with timings) get refusal-only cases:
every case carries at least one bad option, and a refusal must come before any long work.

Server bodies go to one live `krakenlm serve` of a tiny model: 200 with a completion, or a 4xx JSON
error, is a pass; a 5xx, a dropped connection or no answer is "other", and so is a 200 for a body holding a
value the server must refuse (a lone surrogate, ``n: 1.0``, a non-string ``user``, a model it does not serve).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.fuzz import FAMILIES, TINY, Case, CliError, Workspace, _cli_run, _flags

BAD_NUMBERS = ["0", "-1", "nan", "inf", "-inf", "1e309", str(10**30), "abc", "", "1.5"]
NUMBERS = ["1", "2", "4", "8", "16", "32", "64", "128", "512", *BAD_NUMBERS]
MODELS = ["mini-gpt", "mini-kraken-2way", "mini-ladder", "tiny-llama", "gpt2-124m", "palm-8b", "palm-62b",
          "kraken-125m-2way", "gpt-175b", "", "nope", " mini-gpt"]
HARDWARE = ["a100-40gb-nvswitch", "tpu-v4", "h100-sxm", "cpu-gloo-nominal", "", "nope"]


# Inputs every case may read (made once per workspace) ----------------------------------------------------
def _shared(ws: Workspace) -> dict[str, Path]:
    """Good files of every kind the verbs read: a hardware spec, bench records, a server profile, an
    arrivals trace and SuperGLUE task files."""
    root = ws.root / "verb-inputs"
    if root.exists():
        return {p.stem: p for p in root.iterdir()} | {"tasks": root / "tasks"}
    root.mkdir()
    from krakenlm.costmodel.hardware import SPEC_DIR

    shutil.copy(SPEC_DIR / "cpu-gloo-nominal.json", root / "spec.json")
    results = Path(__file__).resolve().parents[1] / "docs" / "results"
    shutil.copy(results / "bench-124m-t512.json", root / "records.json")
    (root / "profile.json").write_text(json.dumps({"profiles": {"server": {
        "prompt": 64, "output": 16, "prompts": [16, 64, 128], "ttft_alone_s": [0.01, 0.02, 0.04],
        "widths": [1, 2, 4], "itl_s": [0.005, 0.006, 0.008]}}}))
    (root / "trace.json").write_text(json.dumps([{"arrival": i * 0.1, "prompt_len": 16, "output_len": 4}
                                                 for i in range(10)]))
    tasks = root / "tasks"
    tasks.mkdir()
    for name, doc in TASK_DOCS.items():
        (tasks / f"{name}.jsonl").write_text(json.dumps(doc) + "\n")
    return {p.stem: p for p in root.iterdir()} | {"tasks": tasks}


TASK_DOCS = {
    "boolq": {"passage": "The sky is blue.", "question": "is the sky blue", "label": 1},
    "copa": {"premise": "The man broke his toe.", "choice1": "He dropped a hammer.", "choice2": "He sang.",
             "question": "cause", "label": 0},
    "wsc": {"text": "Mark told Pete many lies about himself.", "span1_text": "Pete", "span2_index": 5,
            "span2_text": "himself", "label": 0},
}


def _pick(rng: random.Random, good: list[str], bad: list[str], p_good: float = 0.7) -> str:
    return rng.choice(good if rng.random() < p_good else bad)


def _out(base: Path, name: str = "out") -> Path:
    return base / name


# Cost-model and sizing verbs ---------------------------------------------------------------------------
def _model_args(rng: random.Random, ws: Workspace, files: dict[str, Path], flag: str = "--model") -> list[str]:
    if rng.random() < 0.15:
        return ["--config", str(rng.choice([ws.config_json, files["spec"], ws.root / "missing.json"]))]
    return [flag, rng.choice(MODELS)]


def _cost_options(rng: random.Random, files: dict[str, Path]) -> dict[str, list[str]]:
    return {"--hardware": [*HARDWARE, str(files["spec"])], "--dtype": ["bf16", "int8", "fp32", "fp8"],
            "--overlap": ["none", "full", "half"], "--chips": NUMBERS, "--prompt": NUMBERS,
            "--generate": ["0", *NUMBERS]}


def predict_case(rng: random.Random, ws: Workspace) -> Case:
    files = _shared(ws)
    argv = ["predict", *_model_args(rng, ws, files)] + (["--json"] if rng.random() < 0.7 else [])
    argv += _flags(rng, _cost_options(rng, files) | {
        "--batch": ["1", "1,32", "8", "0", "-1", "1,0", "abc", "", "1,2,3"],
        "--layout": ["auto", "kraken", "1d-ws", "2d-ws/attn-batch", "wg-xyz", "auto,1d-ws", "nope", ""],
        "--lm-head": ["sharded", "replicated"], "--pp": NUMBERS, "--microbatches": ["auto", "2", "0", "auto,4"]})
    return _cli_run(argv, ws)


def plan_case(rng: random.Random, ws: Workspace) -> Case:
    files = _shared(ws)
    argv = ["plan", *_model_args(rng, ws, files), "--chips", rng.choice(["1", "4", "8", "0", "-2"])]
    argv += (["--json"] if rng.random() < 0.5 else [])
    argv += _flags(rng, _cost_options(rng, files) | {
        "--top": NUMBERS, "--objective": ["cost", "latency", "throughput", "nope"],
        "--batches": ["1,8", "0", "", "a,b"], "--kraken-degrees": ["2,4", "0", "3"], "--pp": ["1,2", "0", ""],
        "--memory-limit": NUMBERS, "--target-latency": NUMBERS})
    return _cli_run(argv, ws)


def simulate_case(rng: random.Random, ws: Workspace) -> Case:
    files = _shared(ws)
    base = ws.fresh("simulate")
    out = _out(base, "report.json")
    argv = ["simulate", *_model_args(rng, ws, files),
            "--rate", _pick(rng, ["1", "10", "inf"], [*BAD_NUMBERS, "1e-300", "1e-9"]),
            "--requests", _pick(rng, ["1", "20", "200"], ["0", "-1", "2000000"])]
    argv += _flags(rng, {"--hardware": [*HARDWARE, str(files["spec"])], "--max-batch": NUMBERS,
                         "--max-tokens": NUMBERS, "--seed": ["0", "1", "-1", "abc"],
                         "--prompt": ["16", "8-32", "32-8", "0", "-4", "x"], "--generate": ["4", "1-8", "0"],
                         "--arrivals": ["poisson", "constant", str(files["trace"]), "nope"],
                         "--goodput-slo": ['{"ttft_s": 0.2}', "{}", "[]", "{", '{"ttft_s": NaN}'],
                         "--host-overhead": ['{"step_s": 0.01}', '{"x": 1}', "1"],
                         "--profile": [str(files["profile"]), str(files["profile"]) + ":server", "missing.json"],
                         "--out": [str(out), str(base)]})
    case = _cli_run(argv, ws, base)
    case.outputs = [out]
    return case


def calibrate_case(rng: random.Random, ws: Workspace) -> Case:
    files = _shared(ws)
    base = ws.fresh("calibrate")
    save = _out(base, "fitted.json")
    argv = ["calibrate", "--records", str(rng.choice([files["records"], files["records"], files["trace"],
                                                      files["spec"], base / "missing.json"]))]
    argv += _flags(rng, {"--hardware": ["cpu-gloo-nominal", "tpu-v4", "nope", str(files["spec"])],
                         "--fields": ["matmul_eff", "matmul_eff,alpha", "nope", ""],
                         "--validate": [str(files["records"]), str(files["trace"])], "--save": [str(save), str(base)]})
    argv += ["--markdown"] if rng.random() < 0.3 else []
    case = _cli_run(argv, ws, base)
    case.outputs = [save]
    return case


def size_case(rng: random.Random, ws: Workspace) -> Case:
    def number(good: list[str]) -> str:
        return _pick(rng, good, ["1000000000", str(2**60), "0", "-3", "1.5", "abc"], 0.85)

    argv = ["size", "--budget", number(["124373760", "350000000", "10000000"]), "--layers", number(["12", "24"]),
            "--heads", number(["12", "16", "24"]), "--n-sub", number(["1", "2", "4"])]
    argv += [f for f in ("--per-layer", "--hardware-friendly") if rng.random() < 0.3]
    return _cli_run(argv, ws)


def roofline_case(rng: random.Random, ws: Workspace) -> Case:
    source = (["--preset", rng.choice(["mini-gpt", "tiny-llama", "mini-kraken-2way", "", "nope"])]
              if rng.random() < 0.8 else ["--config", str(ws.config_json)])
    argv = ["roofline", *source, "--prompt", rng.choice(["8", "16", "0", "-1", "100000000", "abc"])]
    argv += _flags(rng, {"--dtypes": ["fp32", "bf16,fp32", "", ",", "auto", "int8"], "--threads": ["1", "0", "1000"],
                         "--batch": ["1", "2", "0", "100000000"], "--tp": ["1", "2", "0", "3"]})
    argv += ["--json"] if rng.random() < 0.5 else []
    return _cli_run(argv, ws)


# Model verbs: convert, eval tasks, loadtest --------------------------------------------------------------
def convert_case(rng: random.Random, ws: Workspace) -> Case:
    base = ws.fresh("convert")
    out = _out(base)
    ckpt = rng.choice([ws.native, ws.authors, ws.authors.parent, base / "missing", ws.data, ws.config_json])
    existing = _existing_file(base)
    target = rng.choice([out, out, base / "sub" / "dir", existing])
    argv = ["convert", "--checkpoint", str(ckpt), "--out", str(target)]
    argv += _flags(rng, {"--ladder-layers": ["0", "1", "2", "3", "-1", "abc"]})
    case = _cli_run(argv, ws, base)
    case.outputs = [] if target == existing else [target]  # an existing file is refused, never replaced
    return case


def _existing_file(base: Path) -> Path:
    """A file of the case's own that an output path may wrongly name (never a shared input)."""
    path = base / "existing.json"
    path.write_text("{}")
    return path


def _task_data(rng: random.Random, base: Path, files: dict[str, Path]) -> tuple[Path, str]:
    data = base / "tasks"
    shutil.copytree(files["tasks"], data)
    task = rng.choice(sorted(TASK_DOCS))
    if rng.random() < 0.6:
        doc = dict(TASK_DOCS[task])
        key = rng.choice(sorted(doc))
        doc[key] = rng.choice([1.0, 2, -1, True, None, "1", [], {"a": 1}, "x" * 3, 10**20])
        (data / f"{task}.jsonl").write_text(rng.choice([json.dumps(doc), "{", "[" * 5000, "\x00\xff"]) + "\n")
    return data, task


def eval_tasks_case(rng: random.Random, ws: Workspace) -> Case:
    files = _shared(ws)
    base = ws.fresh("tasks")
    data, task = _task_data(rng, base, files)
    out = _out(base, "results.json")
    argv = ["eval", "tasks", "--checkpoint", str(ws.native), "--data-dir", str(data), "--tasks", task,
            "--limit", _pick(rng, ["1"], ["0", "-1"], 0.8), "--device", "cpu", "--dtype", "fp32", "--out", str(out)]
    case = _cli_run(argv, ws, base)
    case.outputs = [out, Path(str(out).removesuffix(".json") + ".md")]
    return case


def loadtest_case(rng: random.Random, ws: Workspace) -> Case:
    files = _shared(ws)
    base = ws.fresh("loadtest")
    bad_urls = ["http://127.0.0.1:9", "http://127.0.0.1:99999", "http://127.0.0.1:0", "ftp://x", "http://",
                "http://[::1", "127.0.0.1:8000", ""]
    url = _server(ws).url if rng.random() < 0.4 else rng.choice(bad_urls)  # the fuzz's own live server
    report = _out(base, "r.json")
    argv = ["loadtest", "--url", url, "--requests", _pick(rng, ["1", "2"], ["0", "-1"]), "--timeout", "5",
            "--prompt-len", "4", "--output-len", "2", "--out", str(report)]
    argv += _flags(rng, {"--rate": ["1", "inf", "0", "-1", "nan", "1e-300", ""], "--seed": ["0", "-1"],
                         "--arrivals": ["poisson", str(files["trace"]), "nope", str(base)],
                         "--slo": ["{}", "[]", "{", '{"ttft_s": 0.5}'], "--out": [str(base)],
                         "--output-len": ["1", "0", "3-1"]})
    case = _cli_run(argv, ws, base)
    case.outputs = [report]
    table = case.run

    def run() -> Any:  # judge the report's numbers: the table prints the offered rate, "inf" by default
        result = table()
        return json.loads(report.read_text()) if not isinstance(result, CliError) and report.is_file() else result

    case.run = run
    return case


def doctor_case(rng: random.Random, ws: Workspace) -> Case:
    """`doctor`: on a machine without CUDA a one-line report; with CUDA only a refused --out (its checks take
    minutes)."""
    import torch

    base = ws.fresh("doctor")
    out = _out(base)
    bad = [_existing_file(base), base / "existing.json" / "below"]
    target = rng.choice(bad if torch.cuda.is_available() else [out, out, *bad])
    case = _cli_run(["doctor", "--out", str(target), "--no-timings"], ws, base)
    case.outputs = [out]
    return case


# Refusal-only verbs (a valid run takes minutes) --------------------------------------------------------
_LONG_VERBS: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "serve": (["serve", "--config", "{config}", "--device", "cpu", "--port", "0"],
              {"--max-batch": ["0", "-1", "abc"], "--max-tokens": ["0", "-5"], "--max-queue": ["0", "-1"],
               "--max-body-bytes": ["0", "-1"], "--drain-timeout": ["nan", "-1"], "--port": ["99999", "-1"],
               "--tp": ["0", "-2"], "--dtype": ["int4"], "--device": ["tpu", "cuda:99"]}),
    "bench": (["bench", "--quick", "--out", "{out}"],
              {"--shapes": ["nope", "tiny:0", ""], "--prompts": ["0", "-1", "a"], "--batches": ["0", "-3"],
               "--dtypes": ["int4", "fp8"], "--tp": ["0", "1", "-2"], "--rounds": ["0", "-1"],
               "--links": ["-1", "nan", "x"], "--decode-steps": ["-1"], "--timeout": ["0", "nan", "-1"]}),
    "demo": (["demo", "--out", "{out}"],
             {"--steps": ["0", "-1", "abc"], "--prompt-len": ["0", "-5"], "--rounds": ["0", "-1"],
              "--device": ["tpu", "cuda:99"], "--dtype": ["int4", "fp8"], "--out": ["{existing}"]}),
    "train": (["train", "--config", "{config}", "--data", "{data}", "--out", "{out}", "--no-progress"],
              {"--steps": ["0", "-1", "nan"], "--lr": ["nan", "-1", "inf"], "--batch-size": ["0", "-2", str(10**9)],
               "--dtype": ["fp8", "int4"], "--eval-windows": ["0", "-1"], "--warmup-steps": ["-1", "abc"]}),
}


def long_verb_case(rng: random.Random, ws: Workspace) -> Case:
    verb = rng.choice(sorted(_LONG_VERBS))
    base = ws.fresh(verb)
    template, bad = _LONG_VERBS[verb]
    subs = {"config": str(ws.config_json), "data": str(ws.data), "out": str(_out(base)),
            "existing": str(_existing_file(base))}
    argv = [a.format(**subs) for a in template]
    flags = rng.sample(sorted(bad), rng.randint(1, 2))
    for flag in flags:
        argv += [flag, rng.choice(bad[flag]).format(**subs)]
    case = _cli_run(argv, ws, base)
    case.outputs = [_out(base)]
    return case


# Files verbs read ----------------------------------------------------------------------------------------
def _bad_json_file(path: Path, rng: random.Random, good: Any) -> str:
    """Write `path` as one bad kind of JSON input (or leave a good copy); returns the kind."""
    kind = rng.choice(["fifo", "dev-zero", "directory", "missing", "deep", "deep-in-string", "huge-number",
                       "nan", "wrong-type", "empty", "binary", "truncated", "big-int", "field-types", "good"])
    text = json.dumps(good)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    elif kind == "deep":
        path.write_text("[" * 200_000 + "]" * 200_000)
    elif kind == "deep-in-string":  # brackets inside a string are not nesting: the file is good
        path.write_text(json.dumps(good | {"note": "[" * 10_000} if isinstance(good, dict) else good))
    elif kind in ("huge-number", "nan", "big-int", "field-types") and isinstance(good, dict) and good:
        key = rng.choice(sorted(good))
        value = {"huge-number": "1e400", "nan": rng.choice(["NaN", "Infinity", "-Infinity"]),
                 "big-int": str(10**400), "field-types": rng.choice(['"4"', "true", "null", "[]", "{}", "-1"])}[kind]
        path.write_text(text.replace(json.dumps(key) + ": " + json.dumps(good[key]), json.dumps(key) + ": " + value, 1))
    elif kind == "wrong-type":
        path.write_text(rng.choice(["[]", "3", '"x"', "null"]))
    elif kind == "empty":
        path.write_text("")
    elif kind == "binary":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(64)))
    elif kind == "truncated":
        path.write_text(text[: rng.randrange(max(1, len(text)))])
    elif kind != "missing":
        path.write_text(text)
    return kind


def file_case(rng: random.Random, ws: Workspace) -> Case:
    """One bad file handed to one verb that reads it."""
    files = _shared(ws)
    base = ws.fresh("file")
    consumers: dict[str, tuple[Any, Callable[[Path], list[str]]]] = {
        "model config (generate)": (TINY, lambda p: ["generate", "--config", str(p), "--prompt", "hi",
                                                      "--device", "cpu", "--max-new-tokens", "2", "--dtype", "fp32"]),
        "model config (predict)": (TINY, lambda p: ["predict", "--config", str(p), "--json"]),
        "hardware spec": (json.loads(files["spec"].read_text()),
                          lambda p: ["predict", "--model", "mini-gpt", "--hardware", str(p), "--json"]),
        "records": (json.loads(files["records"].read_text()), lambda p: ["calibrate", "--records", str(p)]),
        "profile": (json.loads(files["profile"].read_text()),
                    lambda p: ["simulate", "--model", "mini-gpt", "--rate", "1", "--requests", "5", "--profile",
                               str(p)]),
        "trace": ({"arrival": 0.0, "prompt_len": 16, "output_len": 4},
                  lambda p: ["simulate", "--model", "mini-gpt", "--requests", "5", "--arrivals", str(p)]),
        "checkpoint config.json": (json.loads((ws.native / "config.json").read_text()),
                                   lambda p: ["convert", "--checkpoint", str(p.parent), "--out", str(base / "out")]),
    }
    what = rng.choice(sorted(consumers))
    good, argv_for = consumers[what]
    if what == "checkpoint config.json":
        shutil.copytree(ws.native, base / "ckpt")
        (base / "ckpt" / "config.json").unlink()
        path = base / "ckpt" / "config.json"
    else:
        path = base / ("input.json" if what != "trace" else "trace.jsonl")
    kind = _bad_json_file(path, rng, good)
    case = _cli_run(argv_for(path), ws, base)
    case.description = f"{what}: {kind} -> {case.description}"
    case.outputs = [base / "out"]
    case.hints += [str(path), str(path.parent)]
    return case


# Server bodies -------------------------------------------------------------------------------------------
_SERVERS: dict[Path, Any] = {}


def _server(ws: Workspace) -> Any:
    if ws.root not in _SERVERS:
        import atexit

        from krakenlm.serve.process import ServerProcess

        server = ServerProcess(["--config", str(ws.config_json), "--device", "cpu", "--dtype", "fp32",
                                "--model-name", "tiny", "--max-body-bytes", "65536"], timeout=180)
        atexit.register(server.kill)
        _SERVERS[ws.root] = server
    return _SERVERS[ws.root]


def stop_servers() -> None:
    """Stop the fuzz servers (the harness calls this when a run ends)."""
    while _SERVERS:
        _SERVERS.popitem()[1].stop()


_FIELD_VALUES: dict[str, list[Any]] = {
    "prompt": ["hi", "", [1, 2, 3], [[1, 2]], ["a", "b"], [256, 300], [-1], [1.5], "\udcff", "x" * 100, None, 3,
               [["hi"]], {"a": 1}],
    "max_tokens": [1, 2, 0, -1, 1.0, 10**9, "2", True, None, 1e400],
    "temperature": [0, 0.5, 2, -1, 3, "1", None, float("nan")],
    "top_p": [0.5, 1, 0, -0.1, 1.5, None], "top_k": [1, 5, 0, -1, 1.5, None],
    "seed": [0, 1, -1, 2**64, 1.5, "1", None], "stream": [True, False, 1, "yes", None],
    "stop": ["\n", ["a", "b"], [], "", ["x"] * 100, 3, [1], "\udcff"], "n": [1, 2, 0, 1.0, "1", True],
    "user": ["me", 3, ["x"], None], "model": ["tiny", "other", 3, ""], "logprobs": [None, 1], "echo": [False, True],
    "bogus": [1], "stream_options": [{"include_usage": True}, {"include_usage": 1}, [], None],
}
# Values a lenient server might take but this one must refuse (compared with their type: 1.0 is not 1)
_REFUSED = [("n", 1.0), ("user", 3), ("user", ["x"]), ("model", "other"), ("model", 3)]


def _must_refuse(body: dict[str, Any]) -> bool:
    """Whether `body` holds a value the server must refuse: one of _REFUSED, or a lone surrogate anywhere."""
    return "\\udcff" in json.dumps(body) or any(
        key in body and type(body[key]) is type(value) and body[key] == value for key, value in _REFUSED)


def _body(rng: random.Random) -> tuple[bytes, str, bool]:
    """(raw body, description, whether the server must refuse it)."""
    if rng.random() < 0.15:
        raw = rng.choice([b"{", b"[]", b"\xff\xfe", b'{"prompt": NaN}', b"[" * 100_000 + b"]" * 100_000,
                          b"x" * 70_000, ('{"prompt": ' + "[" * 5000 + "]" * 5000 + "}").encode()])
        return raw, f"raw {raw[:40]!r}... ({len(raw)} bytes)", True
    body: dict[str, Any] = {"prompt": "To be", "max_tokens": 2, "temperature": 0}
    for key in rng.sample(sorted(_FIELD_VALUES), rng.randint(1, 3)):
        body[key] = rng.choice(_FIELD_VALUES[key])
    raw = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    return raw, f"body {json.dumps(body)[:300]}", _must_refuse(body)


def server_case(rng: random.Random, ws: Workspace) -> Case:
    raw, description, refuse = _body(rng)

    def run() -> Any:
        import httpx

        server = _server(ws)
        reply = httpx.post(f"{server.url}/v1/completions", content=raw, timeout=30,
                           headers={"Content-Type": "application/json"})
        if reply.status_code == 200:
            assert not refuse, "accepted a body it must refuse"
            text = reply.text
            assert "data: [DONE]" in text or json.loads(text)["choices"], text[:300]
            return "ok"
        message = reply.json().get("error", {}).get("message") if reply.headers.get(
            "content-type", "").startswith("application/json") else None
        if 400 <= reply.status_code < 500 and isinstance(message, str) and message:
            return CliError(f"HTTP {reply.status_code}: {message}")
        raise AssertionError(f"HTTP {reply.status_code}: {reply.text[:300]}")

    return Case("server", description, run, [])


VERB_FAMILIES: dict[str, Callable[[random.Random, Workspace], Case]] = {
    "predict": predict_case, "plan": plan_case, "simulate": simulate_case, "calibrate": calibrate_case,
    "size": size_case, "roofline": roofline_case, "convert": convert_case, "eval-tasks": eval_tasks_case,
    "loadtest": loadtest_case, "doctor": doctor_case, "long-verbs": long_verb_case, "files": file_case,
    "server": server_case}
ALL_FAMILIES = FAMILIES | VERB_FAMILIES
# Shares of a `--cases N` run (what a case costs: eval tasks runs lm-eval, a server case is one request)
WEIGHTS = {"config": 3, "checkpoint": 3, "cli": 2, "sampling": 3, "generate": 2, "engine": 2, "predict": 6,
           "plan": 3, "simulate": 4, "calibrate": 2, "size": 3, "roofline": 2, "convert": 2, "eval-tasks": 1,
           "loadtest": 2, "doctor": 1, "long-verbs": 4, "files": 8, "server": 8}
