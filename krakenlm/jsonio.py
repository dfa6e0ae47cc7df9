"""One JSON reader for every file and body a user hands in (configs, hardware specs, records, profiles,
traces, checkpoint metadata, server requests), so bad input is refused the same way everywhere:

- only a regular file is opened (a FIFO would block forever, /dev/zero would grow memory until killed),
  and at most ``max_bytes`` of it is read;
- nesting deeper than ``MAX_DEPTH`` is refused before the parser recurses (a RecursionError, or a later
  walk over the value, would otherwise surface as a traceback);
- NaN / Infinity are not JSON and are refused (``constants=True`` accepts them);
- every failure is one ``error`` (a KrakenError type; for ``parse_json`` any exception factory, so the
  server can make it a 400) naming the file or the body.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from krakenlm.errors import ConfigError, KrakenError
from krakenlm.validation import regular_file

MAX_DEPTH = 64  # deeper than any config, spec or request this project reads
MAX_BYTES = 256 << 20  # larger than any benchmark record file; a bound, not a budget
# A string runs to its closing quote or, unterminated, to the end (so every quote starts one match and the
# scan is linear: an unterminated string of escaped quotes was a quadratic rescan from each one)
_STRUCTURE = re.compile(r'"(?:[^"\\]|\\[\s\S]?)*(?:"|\Z)|[\[\]{}]')


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in `text` (brackets inside strings do not count); linear
    time, no recursion, so it is safe on any input."""
    depth = deepest = 0
    for match in _STRUCTURE.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif token in "]}":
            depth -= 1
    return deepest


def parse_json(text: str, what: str, error: Callable[[str], Exception] = ConfigError, *, max_depth: int = MAX_DEPTH,
               constants: bool = False) -> Any:
    """`text` parsed, or `error(message)` naming `what`: malformed JSON, nesting deeper than `max_depth`, or
    (unless `constants`) NaN / Infinity. `error` is any exception factory (the server's makes a 400)."""
    if ("[" in text or "{" in text) and nesting_depth(text) > max_depth:
        raise error(f"{what}: JSON nested deeper than {max_depth} levels; refusing it")

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(text, **({} if constants else {"parse_constant": refuse_constant}))
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise error(f"{what}: not valid JSON ({str(err)[:200]})") from None


def read_text(path: str | Path, what: str, error: type[KrakenError] = ConfigError, *,
              max_bytes: int = MAX_BYTES) -> str:
    """The UTF-8 text of a regular file of at most `max_bytes`; `error` naming `what` and the path otherwise."""
    try:
        path = regular_file(path, error)
    except KrakenError as err:
        raise error(f"cannot read {what} {err}") from None
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}") from None
    if len(data) > max_bytes:
        raise error(f"cannot read {what} {path}: larger than {max_bytes:,} bytes; refusing to read it")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"cannot read {what} {path}: not UTF-8 text (byte {err.start})") from None


def read_json(path: str | Path, what: str, error: type[KrakenError] = ConfigError, *,
              max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH, constants: bool = False) -> Any:
    """A JSON file, read with every bound above; errors name `what` and the path."""
    text = read_text(path, what, error, max_bytes=max_bytes)
    return parse_json(text, f"cannot read {what} {path}", error, max_depth=max_depth, constants=constants)


def read_json_or_lines(path: str | Path, what: str, error: type[KrakenError] = ConfigError, *,
                       max_bytes: int = MAX_BYTES) -> Any:
    """A JSON document, or JSON lines (one value per non-blank line, returned as a list)."""
    text = read_text(path, what, error, max_bytes=max_bytes)
    try:
        return parse_json(text, f"cannot read {what} {path}", error)
    except KrakenError:
        if "\n" not in text.strip():
            raise
    return [parse_json(line, f"cannot read {what} {path} line {i}", error)
            for i, line in enumerate(text.splitlines(), 1) if line.strip()]
