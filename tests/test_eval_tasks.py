"""Local SuperGLUE tasks, lm-eval runs on them, reports and the `krakenlm eval` CLI (tiny byte-level models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from krakenlm.eval import tasks as sg  # noqa: E402

EXAMPLES = {
    "boolq": [{"question": "is the sky blue", "passage": "The sky is blue on a clear day.", "idx": 0, "label": 1},
              {"question": "is fire cold", "passage": "Fire is hot.", "idx": 1, "label": 0},
              {"question": "do cats bark", "passage": "Cats meow; dogs bark.", "idx": 2, "label": 0}],
    "cb": [{"premise": "It rained all day.", "hypothesis": "The ground is wet", "idx": 0, "label": 0},
           {"premise": "She never left home.", "hypothesis": "She went to Paris", "idx": 1, "label": 1},
           {"premise": "He said something.", "hypothesis": "He was happy", "idx": 2, "label": 2}],
    "copa": [{"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
              "choice2": "He got a hole in his sock.", "question": "cause", "idx": 0, "label": 0},
             {"premise": "I tipped the bottle.", "choice1": "The liquid in the bottle froze.",
              "choice2": "The liquid in the bottle poured out.", "question": "effect", "idx": 1, "label": 1}],
    "multirc": [{"paragraph": "Tom has two apples and a pear.", "question": "How many apples?", "answer": "Two",
                 "idx": {"paragraph": 0, "question": 0, "answer": 0}, "label": 1},
                {"paragraph": "Tom has two apples and a pear.", "question": "How many apples?", "answer": "Five",
                 "idx": {"paragraph": 0, "question": 0, "answer": 1}, "label": 0}],
    "record": [{"passage": "Paris is in France.\n@highlight\nFrance has a capital", "query": "@placeholder is big.",
                "entities": ["Paris", "France", "Paris"], "entity_spans": {}, "answers": ["France"],
                "idx": {"passage": 0, "query": 0}},
               {"passage": "Alice met Bob in Rome.\n@highlight\nThey talked", "query": "@placeholder smiled.",
                "entities": ["Alice", "Bob", "Rome"], "entity_spans": {}, "answers": ["Bob"],
                "idx": {"passage": 1, "query": 1}}],
    "rte": [{"premise": "A dog runs in the park.", "hypothesis": "An animal is outside.", "idx": 0, "label": 0},
            {"premise": "The shop is closed.", "hypothesis": "The shop is open.", "idx": 1, "label": 1}],
    "wic": [{"word": "bank", "sentence1": "He sat on the river bank.", "sentence2": "She went to the bank.",
             "start1": 19, "end1": 23, "start2": 18, "end2": 22, "idx": 0, "label": 0},
            {"word": "run", "sentence1": "I run daily.", "sentence2": "They run fast.",
             "start1": 2, "end1": 5, "start2": 5, "end2": 8, "idx": 1, "label": 1}],
    "wsc": [{"text": "Mark told Pete many lies about himself , which Pete included in his book .",
             "span1_index": 0, "span1_text": "Mark", "span2_index": 12, "span2_text": "his", "idx": 0, "label": 0},
            {"text": "The trophy does not fit into the suitcase because it is too large .",
             "span1_index": 1, "span1_text": "trophy", "span2_index": 9, "span2_text": "it", "idx": 1, "label": 1}],
}


def write_data(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for task, docs in EXAMPLES.items():
        (directory / f"{task}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return directory


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("superglue"))


@pytest.fixture(scope="module")
def kraken_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny 2-way Kraken model with a byte-level vocabulary, saved natively."""
    from krakenlm.checkpoint import save_checkpoint
    from krakenlm.config import ModelConfig
    from krakenlm.source import build_model

    cfg = ModelConfig(arch="kraken", n_layer=2, n_embd=32, n_head=2, n_sub=2, vocab_size=257, block_size=256)
    path = tmp_path_factory.mktemp("ckpt") / "kraken-2way"
    save_checkpoint(path, build_model(config=cfg, seed=3), cfg)
    return str(path)


def _task(yaml_path: Path, **overrides):
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(str(yaml_path), resolve_func=True) | overrides
    config.pop("tag", None)
    return ConfigurableTask(config=config)


def _prompts(task) -> list:
    return [(task.doc_to_text(d), task.doc_to_choice(d), task.doc_to_target(d)) for d in task.validation_docs()]


@pytest.mark.parametrize("task", [t for t in sg.TASKS if t != "record"])
def test_prompts_match_lm_eval_superglue(task: str, data_dir: Path, tmp_path: Path) -> None:
    """Our YAML + hooks give exactly the text, choices and target of lm-eval's own task on the same docs."""
    import lm_eval.tasks

    sg.render_tasks(data_dir, tmp_path, [task])
    builtin = Path(lm_eval.tasks.__file__).parent / "super_glue" / task / "default.yaml"
    ref = _task(builtin, dataset_path="json", dataset_name=None, training_split=None,
                dataset_kwargs={"data_files": {"validation": str(data_dir / f"{task}.jsonl")}})
    mine = _task(tmp_path / f"{sg.task_name(task)}.yaml")
    assert _prompts(mine) == _prompts(ref)
    assert len(_prompts(mine)) == len(EXAMPLES[task])


def test_record_prompts_and_scoring(data_dir: Path, tmp_path: Path) -> None:
    """lm-eval's ReCoRD hooks import transformers' removed squad_metrics, so check against the known format."""
    sg.render_tasks(data_dir, tmp_path, ["record"])
    task = _task(tmp_path / "kraken_record.yaml")
    doc = next(iter(task.validation_docs()))
    assert doc["entities"] == ["France", "Paris"]  # deduplicated and sorted
    assert task.doc_to_text(doc) == "Paris is in France.\n\n  - France has a capital.\n"
    assert task.doc_to_choice(doc) == ["  - France is big.", "  - Paris is big."]
    assert task.doc_to_target(doc) == "  - France is big."
    assert sg.record_results(doc, [(-1.0, False), (-2.0, False)]) == {"f1": 1.0, "em": 1.0}
    assert sg.record_results(doc, [(-3.0, False), (-2.0, False)]) == {"f1": 0.0, "em": 0.0}
    assert sg.squad_f1("the Eiffel Tower", "Eiffel tower!") == 1.0
    assert sg.squad_f1("New York City", "York") == pytest.approx(0.5)


def test_macro_f1_matches_hand_count() -> None:
    items = [(0, 0), (0, 1), (1, 1), (2, 2), (2, 0)]  # (gold, pred)
    f1_0, f1_1, f1_2 = 2 / (2 + 2), 2 / (2 + 1), 2 / (2 + 1)
    assert sg.macro_f1(items) == pytest.approx((f1_0 + f1_1 + f1_2) / 3)


def test_bad_data_and_task_names_are_named(data_dir: Path, tmp_path: Path) -> None:
    from krakenlm.errors import InputError

    with pytest.raises(InputError, match="missing"):
        sg.check_data(tmp_path, ["boolq"])
    (tmp_path / "cb.jsonl").write_text('{"premise": "p", "label": 0}\n')
    with pytest.raises(InputError, match=r"cb.jsonl:1: missing field\(s\) \['hypothesis'\]"):
        sg.check_data(tmp_path, ["cb"])
    with pytest.raises(InputError, match="unknown task"):
        sg.parse_tasks("boolq,glue")
    assert sg.parse_tasks("all") == list(sg.TASKS)


def test_all_tasks_identical_at_tp1_and_tp2(data_dir: Path, kraken_ckpt: str) -> None:
    from krakenlm.eval.harness import KrakenLM

    scores = {}
    for tp in (1, 2):
        lm = KrakenLM(checkpoint=kraken_ckpt, tp=tp, batch_size=4)
        try:
            scores[tp] = sg.evaluate(lm, data_dir, list(sg.TASKS))
        finally:
            lm.close()
    assert scores[1] == scores[2]
    assert set(scores[1]) == set(sg.TASKS) and scores[1]["record"]["examples"] == 2
    assert {"acc", "f1"} <= set(scores[1]["cb"]) and "f1" in scores[1]["record"]


def _prepared(tmp_path: Path) -> Path:
    from krakenlm.data import prepare

    text = tmp_path / "corpus.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    out = tmp_path / "prepared"
    prepare(out, [text], tokenizer="bytes", val_fraction=0.5)
    return out


def test_cli_tasks_compares_checkpoints_with_perplexity(data_dir: Path, kraken_ckpt: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from krakenlm.cli import main

    prepared = _prepared(tmp_path)
    out = tmp_path / "results" / "superglue.json"
    code = main(["eval", "tasks", "--checkpoint", kraken_ckpt, "--checkpoint", kraken_ckpt, "--name", "A",
                 "--name", "B", "--tasks", "boolq,copa,record", "--data-dir", str(data_dir), "--limit", "2",
                 "--ppl-data", str(prepared), "--windows", "4", "--out", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0] == "| model | params | BoolQ | COPA | ReCoRD (F1) | avg | val ppl |"
    assert table.splitlines()[2].startswith("| A |") and table.splitlines()[3].startswith("| B |")
    doc = json.loads(out.read_text())
    assert [m["name"] for m in doc["models"]] == ["A", "B"]
    assert doc["models"][0]["scores"] == doc["models"][1]["scores"]
    assert doc["models"][0]["perplexity"] > 1 and doc["models"][0]["scores"]["boolq"]["examples"] == 2
    assert doc["environment"]["lm_eval"] and out.with_suffix(".md").read_text() == table

    assert main(["eval", "ppl", "--checkpoint", kraken_ckpt, "--data", str(prepared), "--windows", "4"]) == 0
    ppl = json.loads(capsys.readouterr().out)
    assert ppl["perplexity"] == pytest.approx(doc["models"][0]["perplexity"])


@pytest.mark.parametrize("extra,message", [
    (["--tasks", "boolq,nope"], "unknown task"),
    (["--tasks", "boolq", "--name", "A", "--name", "B"], "--name given 2 times"),
    (["--tasks", "boolq", "--tp", "3"], "tp"),
    (["--tasks", "boolq", "--out", "/"], "--out: / is a directory"),  # refused before the evaluation runs
])
def test_cli_tasks_bad_input_is_one_line(extra: list[str], message: str, data_dir: Path, kraken_ckpt: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import torch.distributed as dist

    from krakenlm.cli import main

    assert main(["eval", "tasks", "--checkpoint", kraken_ckpt, "--data-dir", str(data_dir), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("krakenlm eval: error:") and message in err
    assert not dist.is_initialized()  # a failed tensor-parallel start leaves no process group behind


def test_lm_eval_command_line_finds_the_model(data_dir: Path, kraken_ckpt: str, tmp_path: Path) -> None:
    """The documented command: `python -m krakenlm.eval` is lm-eval's CLI with `--model krakenlm` registered."""
    import subprocess
    import sys

    tasks_dir = tmp_path / "tasks"
    sg.render_tasks(data_dir, tasks_dir, ["boolq"])
    out = tmp_path / "lm-eval-out"
    r = subprocess.run([sys.executable, "-m", "krakenlm.eval", "run", "--model", "krakenlm", "--model_args",
                        f"checkpoint={kraken_ckpt}", "--batch_size", "2", "--tasks", "kraken_boolq", "--include_path",
                        str(tasks_dir), "--output_path", str(out)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "kraken_boolq" in r.stdout and "acc" in r.stdout
    from lm_eval.utils import sanitize_model_name

    folder = out / sanitize_model_name(kraken_ckpt)  # named after the checkpoint, as `hf` runs are
    assert list(folder.glob("results_*.json")), sorted(p.name for p in out.iterdir())


def test_corpus_bpe_from_a_prepared_dir_is_used(tmp_path: Path) -> None:
    """Models trained on `prepare --tokenizer bpe:N` data are evaluated with that BPE (tokenizer=DATA_DIR)."""
    from krakenlm.checkpoint import save_checkpoint
    from krakenlm.config import ModelConfig
    from krakenlm.data import prepare
    from krakenlm.errors import ConfigError
    from krakenlm.eval.harness import KrakenLM
    from krakenlm.source import build_model
    from krakenlm.tokenizer import load_bpe

    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log. " * 30)
    prepare(tmp_path / "data", [text], tokenizer="bpe:300", val_fraction=0.5)
    cfg = ModelConfig(n_layer=1, n_embd=16, n_head=2, vocab_size=320, block_size=32)
    save_checkpoint(tmp_path / "m", build_model(config=cfg, seed=0), cfg)
    lm = KrakenLM(checkpoint=str(tmp_path / "m"), tokenizer=str(tmp_path / "data"), dtype="auto")
    assert lm.tok_encode("the cat") == load_bpe(tmp_path / "data").encode("the cat")
    assert lm.eot_token_id == load_bpe(tmp_path / "data").eot_token
    with pytest.raises(ConfigError, match="has 50257 tokens but the model only 320"):
        KrakenLM(checkpoint=str(tmp_path / "m"), tokenizer="gpt2")
