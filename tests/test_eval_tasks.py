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
             "span1_index": 0, "span1_text": "Mark", "span2_index": 13, "span2_text": "his", "idx": 0, "label": 0},
            {"text": "The trophy does not fit into the suitcase because it is too large .",
             "span1_index": 1, "span1_text": "trophy", "span2_index": 9, "span2_text": "it", "idx": 1, "label": 1}],
}


def write_data(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for task, docs in EXAMPLES.items():
        (directory / f"{task}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return directory
