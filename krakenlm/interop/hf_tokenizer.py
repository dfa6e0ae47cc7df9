"""krakenlm's tokenizers as Hugging Face tokenizer files (tokenizer.json + tokenizer_config.json), so
``AutoTokenizer.from_pretrained(OUT)`` (and lm-eval's ``hf`` model, and vLLM) encode text as krakenlm does.

- gpt2: GPT-2's BPE as vocab.json + merges.txt and the same as tokenizer.json; ``<|endoftext|>`` (50256) is
  the special token for bos, eos and unk, as in transformers' own GPT-2 tokenizer, and for padding (what
  generation_config.json pads with).
- a corpus-trained BPE (a prepared data dir): its tokenizer.json, ``<|endoftext|>`` special.
- bytes: a byte-level tokenizer.json without merges, so UTF-8 byte b is token b and ``<|endoftext|>`` is
  256. One difference remains: krakenlm's byte tokenizer reads the literal text ``<|endoftext|>`` as 13
  bytes, a Hugging Face tokenizer as the special token (it splits special tokens out of text first).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from krakenlm.errors import ConfigError
from krakenlm.tokenizer import (
    BPE_TOKENIZER_FILE,
    EOT_TEXT,
    BPETokenizer,
    ByteTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    default_tokenizer_for,
    gpt2_files,
    load_tokenizer,
)

NO_TOKENIZER = "none"


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ModuleNotFoundError as err:
        raise ConfigError("export: writing tokenizer files needs the `tokenizers` package (pip install "
                          "tokenizers), or pass --tokenizer none") from err
    return tokenizers


def byte_chars() -> list[str]:
    """The printable character GPT-2's byte-level scheme gives each byte 0..255: bytes that are printable
    Latin-1 characters stand for themselves, the others are mapped in order to 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _byte_tokenizer(directory: Path) -> None:
    tk = _tokenizers()
    model = tk.models.BPE(vocab={c: b for b, c in enumerate(byte_chars())}, merges=[])
    tok = tk.Tokenizer(model)
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tk.decoders.ByteLevel()
    tok.add_special_tokens([EOT_TEXT])
    tok.save(str(directory / "tokenizer.json"))


def _gpt2_tokenizer(directory: Path) -> None:
    vocab, merges = gpt2_files()
    shutil.copyfile(vocab, directory / "vocab.json")
    shutil.copyfile(merges, directory / "merges.txt")
    tok = _tokenizers().ByteLevelBPETokenizer(str(vocab), str(merges))
    tok.add_special_tokens([EOT_TEXT])
    tok.save(str(directory / "tokenizer.json"))


def write_tokenizer(spec: str | None, directory: Path, vocab_size: int, block_size: int) -> int | None:
    """Tokenizer files for krakenlm's tokenizer ``spec`` (gpt2, bytes, a prepared data dir holding a BPE, or
    none; default: by vocabulary size, as krakenlm's verbs choose). Returns the end-of-text id, or None."""
    spec = spec or default_tokenizer_for(vocab_size)
    if spec == NO_TOKENIZER:
        return None
    tok: Tokenizer = load_tokenizer(spec)
    if tok.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer: {tok.name!r} has {tok.vocab_size} tokens but the model only {vocab_size}; "
                          "pass the tokenizer the model was trained with (--tokenizer), or none")
    if isinstance(tok, GPT2Tokenizer):
        _gpt2_tokenizer(directory)
    elif isinstance(tok, ByteTokenizer):
        _byte_tokenizer(directory)
    else:
        assert isinstance(tok, BPETokenizer)
        if tok.eot_token is None:
            raise ConfigError(f"tokenizer: the BPE in {spec} has no {EOT_TEXT} token")
        shutil.copyfile(Path(spec) / BPE_TOKENIZER_FILE, directory / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT_TEXT, "eos_token": EOT_TEXT,
              "unk_token": EOT_TEXT, "pad_token": EOT_TEXT, "model_max_length": block_size,
              "clean_up_tokenization_spaces": False, "krakenlm_tokenizer": tok.name}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.eot_token
