"""Evaluation results as JSON (with what produced them) and a markdown table comparing checkpoints.

The table follows the paper's SuperGLUE table: one row per model, one column per task (accuracy in
percent, F1 for ReCoRD), the average over the tasks shown, and validation perplexity when measured.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from krakenlm.eval.tasks import METRICS
from krakenlm.validation import check_output_file

TITLES = {"boolq": "BoolQ", "cb": "CB", "copa": "COPA", "multirc": "MultiRC", "record": "ReCoRD",
          "rte": "RTE", "wic": "WiC", "wsc": "WSC"}


def primary_metric(task: str) -> str:
    """The number the paper reports for a task: accuracy, F1 for ReCoRD."""
    return METRICS[task][0]


@dataclass
class ModelResult:
    """Scores of one checkpoint: {task: {metric: value}}, optional perplexity, and what the model was."""

    name: str
    checkpoint: str
    scores: dict[str, dict[str, float]]
    params: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    perplexity: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def average(self, tasks: list[str]) -> float | None:
        values = [self.scores[t][primary_metric(t)] for t in tasks if t in self.scores]
        return sum(values) / len(values) if values else None


def environment() -> dict[str, Any]:
    """Versions and machine facts a result came from (so numbers can be compared honestly)."""
    import importlib.metadata as md

    import torch

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {"krakenlm": version("krakenlm"), "lm_eval": version("lm_eval"), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "platform": platform.platform()}


def to_json(results: list[ModelResult], tasks: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"tasks": tasks, "metrics": {t: list(METRICS[t]) for t in tasks}, **(extra or {}),
            "environment": environment(),
            "models": [{"name": r.name, "checkpoint": r.checkpoint, "params": r.params, "perplexity": r.perplexity,
                        "average": r.average(tasks), "scores": r.scores, "settings": r.settings, "config": r.config}
                       for r in results]}


def markdown_table(results: list[ModelResult], tasks: list[str]) -> str:
    """Models as rows, tasks as columns (percent); a perplexity column when any model has one."""
    with_ppl = any(r.perplexity is not None for r in results)
    header = ["model", "params"] + [TITLES[t] + (" (F1)" if primary_metric(t) == "f1" else "") for t in tasks]
    header += ["avg"] + (["val ppl"] if with_ppl else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in results:
        cells = [r.name, _count(r.params)]
        cells += [f"{100 * r.scores[t][primary_metric(t)]:.1f}" if t in r.scores else "-" for t in tasks]
        avg = r.average(tasks)
        cells.append(f"{100 * avg:.1f}" if avg is not None else "-")
        if with_ppl:
            cells.append(f"{r.perplexity:.2f}" if r.perplexity is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _count(params: int | None) -> str:
    if not params:
        return "-"
    return f"{params / 1e6:.1f}M" if params >= 1e6 else f"{params / 1e3:.1f}K"


def write(results: list[ModelResult], tasks: list[str], path: str | Path,
          extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """PATH (JSON) and PATH with .md (the table), written side by side."""
    path = check_output_file(path, "out")
    table = check_output_file(path.with_suffix(".md"), "out (its table)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(results, tasks, extra), indent=2) + "\n")
    table.write_text(markdown_table(results, tasks))
    return path, table
