"""Zero-shot SuperGLUE on local JSONL files, with lm-eval's own prompts.

lm-eval's built-in SuperGLUE tasks download from the Hugging Face hub. These tasks read
``DATA_DIR/<task>.jsonl`` instead (one validation example per line, fields exactly as in the HF
``super_glue`` dataset; WSC as in ``wsc.fixed``) and mirror lm-eval's ``super-glue-lm-eval-v1``
prompts, choices and metrics, so scores are comparable with lm-eval runs made online.

The task YAMLs (krakenlm/eval/superglue/) are templates: ``render_tasks`` writes them with the data
paths filled in, next to a small module holding the Python hooks they name, into a directory that
lm-eval's TaskManager (or ``lm_eval --include_path``) reads.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from krakenlm.errors import InputError
from krakenlm.jsonio import parse_json, read_text

TASKS = ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc")
TEMPLATES = Path(__file__).parent / "superglue"
HOOKS_MODULE = "kraken_superglue"  # the name the YAMLs use in `!function kraken_superglue.<hook>`
# Metrics reported per task (the paper's table: accuracy everywhere, F1 for ReCoRD; CB also gets F1).
METRICS = {task: ("acc",) for task in TASKS} | {"cb": ("acc", "f1"), "record": ("f1", "em")}
REQUIRED_FIELDS = {
    "boolq": ("passage", "question", "label"),
    "cb": ("premise", "hypothesis", "label"),
    "copa": ("premise", "choice1", "choice2", "question", "label"),
    "multirc": ("paragraph", "question", "answer", "label"),
    "record": ("passage", "query", "entities", "answers"),
    "rte": ("premise", "hypothesis", "label"),
    "wic": ("sentence1", "sentence2", "start1", "end1", "label"),
    "wsc": ("text", "span1_text", "span2_index", "span2_text", "label"),
}


def task_name(task: str) -> str:
    """lm-eval task name of a local SuperGLUE task (prefixed so it never clashes with the built-in ones)."""
    return f"kraken_{task}"


def parse_tasks(spec: str) -> list[str]:
    """'boolq,cb' -> ['boolq', 'cb']; 'all' or 'superglue' -> all eight."""
    if spec.strip() in ("all", "superglue"):
        return list(TASKS)
    tasks = [t.strip().lower() for t in spec.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise InputError(f"tasks: unknown task(s) {unknown}; choose from {', '.join(TASKS)} or 'all'")
    return list(dict.fromkeys(tasks))


def check_data(data_dir: str | Path, tasks: list[str]) -> dict[str, Path]:
    """Fail early, naming the file and field, when a task's JSONL is missing or malformed."""
    data_dir = Path(data_dir)
    files = {}
    for task in tasks:
        path = data_dir / f"{task}.jsonl"
        if not path.is_file():
            raise InputError(f"{path}: missing; expected one JSON object per line with the HF super_glue "
                             f"'{task}' fields {list(REQUIRED_FIELDS[task])}")
        lines = [line for line in read_text(path, "task data", InputError).splitlines() if line.strip()]
        if not lines:
            raise InputError(f"{path}: no examples")
        for number, line in enumerate(lines, 1):
            doc = parse_json(line, f"{path}:{number}", InputError)
            missing = [f for f in REQUIRED_FIELDS[task] if not isinstance(doc, dict) or f not in doc]
            if missing:
                raise InputError(f"{path}:{number}: missing field(s) {missing}")
            for name in REQUIRED_FIELDS[task]:
                problem = _field_problem(task, name, doc[name])
                if problem:
                    raise InputError(f"{path}:{number}: {name} {problem}, got {doc[name]!r:.80}")
        files[task] = path.resolve()
    return files


def _field_problem(task: str, name: str, value: Any) -> str | None:
    """What is wrong with one field's value (the prompt hooks index, slice and compare with them), or None."""
    if name == "label":
        classes = 3 if task == "cb" else 2
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < classes
        return None if ok else f"must be an integer class 0..{classes - 1}"
    if name in ("span2_index", "start1", "end1"):
        return None if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else \
            "must be a word or character index >= 0"
    if name in ("entities", "answers"):
        ok = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
        return None if ok else "must be a non-empty list of strings"
    if task == "copa" and name == "question":
        return None if value in ("cause", "effect") else "must be 'cause' or 'effect'"
    return None if isinstance(value, str) else "must be a string"


def render_tasks(data_dir: str | Path, out_dir: str | Path, tasks: list[str] | None = None) -> list[str]:
    """Write task YAMLs reading DATA_DIR/<task>.jsonl into out_dir; returns the lm-eval task names."""
    tasks = list(TASKS) if tasks is None else tasks
    files = check_data(data_dir, tasks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{HOOKS_MODULE}.py").write_text('"""Hooks named by the krakenlm SuperGLUE task YAMLs."""\n'
                                            f"from krakenlm.eval.tasks import {', '.join(HOOKS)}  # noqa: F401\n")
    for task in tasks:
        text = (TEMPLATES / f"{task}.yaml").read_text()
        (out / f"{task_name(task)}.yaml").write_text(text.replace("__DATA_FILE__", json.dumps(str(files[task]))))
    return [task_name(t) for t in tasks]


# Hooks: the Python half of lm-eval's prompts ------------------------------------------------------------
def _lower_first(choice: str) -> str:
    return choice[0].lower() + choice[1:]


def copa_text(doc: dict[str, Any]) -> str:
    """Premise without its final period, joined to the choice by 'because' / 'therefore'."""
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"


def copa_target(doc: dict[str, Any]) -> str:
    return " " + _lower_first(doc["choice1"] if doc["label"] == 0 else doc["choice2"])


def copa_choices(doc: dict[str, Any]) -> list[str]:
    return [" " + _lower_first(doc["choice1"]), " " + _lower_first(doc["choice2"])]


def wsc_text(doc: dict[str, Any]) -> str:
    """The passage with the pronoun starred (span indices count words, as in HF's wsc.fixed)."""
    from lm_eval.utils import general_detokenize

    raw = doc["text"]
    pre = " ".join(raw.split()[:doc["span2_index"]])
    post = raw[len(pre) + len(doc["span2_text"]) + 1:]
    passage = general_detokenize(pre + f" *{doc['span2_text']}*" + post)
    return (f"Passage: {passage}\n"
            f'Question: In the passage above, does the pronoun "*{doc["span2_text"]}*" refer to '
            f'"*{doc["span1_text"]}*"?\nAnswer:')


def record_docs(dataset: Any) -> Any:
    """Entities and answers deduplicated and sorted, as lm-eval does."""
    return dataset.map(lambda doc: {"passage": doc["passage"], "query": doc["query"],
                                    "entities": sorted(set(doc["entities"])), "answers": sorted(set(doc["answers"]))})


def record_text(doc: dict[str, Any]) -> str:
    initial, *highlights = doc["passage"].strip().split("\n@highlight\n")
    return initial + "\n\n" + "".join(f"  - {h}.\n" for h in highlights)


def _record_answer(query: str, entity: str) -> str:
    return f"  - {query}".replace("@placeholder", entity)


def record_target(doc: dict[str, Any]) -> str:
    return _record_answer(doc["query"], doc["answers"][0])


def record_choices(doc: dict[str, Any]) -> list[str]:
    return [_record_answer(doc["query"], entity) for entity in doc["entities"]]


def record_results(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """Most likely entity, scored against every gold answer with SQuAD token F1 / exact match."""
    prediction = doc["entities"][int(np.argmax([r[0] for r in results]))]
    return {"f1": max(squad_f1(gold, prediction) for gold in doc["answers"]),
            "em": max(float(_normalize(gold) == _normalize(prediction)) for gold in doc["answers"])}


def _normalize(text: str) -> str:
    """SQuAD answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad_f1(gold: str, prediction: str) -> float:
    """Token-overlap F1 of the official SQuAD script (used by lm-eval's ReCoRD)."""
    gold_toks, pred_toks = _normalize(gold).split(), _normalize(prediction).split()
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)
    same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def macro_f1(items: list[tuple[int, int]]) -> float:
    """Unweighted mean over classes 0, 1, 2 of per-class F1 (lm-eval's CB F1, without scikit-learn)."""
    golds, preds = (np.asarray(x) for x in zip(*items, strict=True))
    scores = []
    for label in range(3):
        tp = int(np.sum((golds == label) & (preds == label)))
        fp_fn = int(np.sum((golds == label) != (preds == label)))
        scores.append(2 * tp / (2 * tp + fp_fn) if tp or fp_fn else 0.0)
    return float(np.mean(scores))


HOOKS = ("copa_text", "copa_target", "copa_choices", "wsc_text", "record_docs", "record_text", "record_target",
         "record_choices", "record_results", "macro_f1")


def evaluate(lm: Any, data_dir: str | Path, tasks: list[str], limit: int | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval (offline) on the local tasks; {task: {metric: value, metric_stderr: value}}."""
    import tempfile

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="krakenlm-tasks-") as tmp:
        names = render_tasks(data_dir, tmp, tasks)
        manager = TaskManager(include_path=tmp, include_defaults=False)
        out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=False,
                              bootstrap_iters=1000)
    scores: dict[str, dict[str, float]] = {}
    for task in tasks:
        raw = out["results"][task_name(task)]
        scores[task] = {}
        for metric in METRICS[task]:
            scores[task][metric] = float(raw[f"{metric},none"])
            stderr = raw.get(f"{metric}_stderr,none")
            if isinstance(stderr, (int, float)):
                scores[task][f"{metric}_stderr"] = float(stderr)
        scores[task]["examples"] = int(out["n-samples"][task_name(task)]["effective"])
    return scores
