"""Shared value checks for config dataclasses and CLI verbs, so every number is validated the same way:
a bool is not an int, NaN and Infinity are never a valid float, and the error names the field."""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from krakenlm.errors import ConfigError, KrakenError


def check_int(value: Any, name: str, *, minimum: int | None = 1, maximum: int | None = None,
              optional: bool = False) -> int | None:
    """`value` if it is an int (not a bool) in [minimum, maximum]; ConfigError naming `name` otherwise."""
    if value is None and optional:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        raise ConfigError(f"{name}: must be {_describe('an integer', minimum, maximum, optional)}, got {shown(value)}")
    return value


def is_finite_number(value: Any) -> bool:
    """A real int or float (not a bool, which Python counts as an int), neither NaN nor infinite, nor an int
    past float's range (10**400 in a JSON file: as a float it would be infinite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_float(value: Any, name: str, *, minimum: float | None = None, maximum: float | None = None,
                exclusive: bool = False, optional: bool = False) -> float | None:
    """`value` as a float if it is a finite number in the range (open at `minimum` when `exclusive`)."""
    if value is None and optional:
        return None
    ok = is_finite_number(value)
    if ok and minimum is not None:
        ok = value > minimum if exclusive else value >= minimum
    ok = ok and (maximum is None or value <= maximum)
    if not ok:
        low = None if minimum is None else (f"> {minimum}" if exclusive else f">= {minimum}")
        raise ConfigError(f"{name}: must be {_describe('a finite number', low, maximum, optional)}, "
                          f"got {shown(value)}")
    return float(value)


def shown(value: Any, limit: int = 60) -> str:
    """repr(value) for a message, shortened when long (a 400-digit int from a JSON file)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit // 2]}... ({len(text)} characters)"


def _describe(kind: str, minimum: Any, maximum: Any, optional: bool) -> str:
    parts = [kind]
    if minimum is not None:
        parts.append(minimum if isinstance(minimum, str) else f">= {minimum}")
    if maximum is not None:
        parts.append(f"<= {maximum}")
    return " ".join(parts) + (" or null" if optional else "")


def _check_ancestors(path: Path, name: str) -> None:
    """The nearest existing folder above `path` must be a folder (a file there makes mkdir fail)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{name}: {parent} is a file, so {path} cannot be created")
            return


def _kind(mode: int) -> str:
    return "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
        "a socket" if stat.S_ISSOCK(mode) else "a regular file" if stat.S_ISREG(mode) else "a device or special file"


def _existing_mode(path: Path, name: str) -> int | None:
    """`path`'s mode (following links), or None when nothing is there and its folder can be made."""
    try:
        return os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        _check_ancestors(path, name)
        return None
    except OSError as err:
        raise ConfigError(f"{name}: {path}: cannot access ({err.strerror or err})") from None


def holding(*names: str) -> Callable[[Path], bool]:
    """An `ours` test for check_output_dir: the directory holds one of `names` (what that writer leaves)."""
    return lambda directory: any(os.path.lexists(directory / n) for n in names)


def check_output_dir(path: str | Path, name: str, ours: Callable[[Path], bool] | None = None,
                     what: str = "output") -> Path:
    """The one guard of every writer of a user-named directory, called before any work: the path is absent
    (the writer creates it) or a directory. Anything else there (a user's file, a device, a FIFO) is refused,
    never moved aside or replaced. ``ours``: a writer that replaces or prunes its directory passes the test
    of its own outputs, and a non-empty directory that fails it is refused, so no user's file goes with it."""
    path = Path(path)
    mode = _existing_mode(path, name)
    if mode is None:
        return path
    if not stat.S_ISDIR(mode):
        raise ConfigError(f"{name}: {path} exists and is {_kind(mode)}, not a directory; refusing to replace it "
                          "(choose another path)")
    if ours is not None:
        try:
            entries = sorted(os.listdir(path))
        except OSError as err:
            raise ConfigError(f"{name}: {path}: cannot list it ({err.strerror or err})") from None
        if entries and not ours(path):
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ConfigError(f"{name}: {path} is a non-empty directory that is not a krakenlm {what} (it holds "
                              f"{shown}); refusing to write there (choose a new or empty directory)")
    return path


def check_output_file(path: str | Path, name: str) -> Path:
    """An output file path that is absent or a regular file (overwritten) and can be created: checked before
    long work, so its result is not lost at the end. A directory, a device or a FIFO is refused by name."""
    path = Path(path)
    mode = _existing_mode(path, name)
    if mode is not None and not stat.S_ISREG(mode):
        hint = "; give a file path" if stat.S_ISDIR(mode) else "; refusing to write to it"
        raise ConfigError(f"{name}: {path} is {_kind(mode)}{hint}")
    return path


def regular_file(path: str | Path, error: type[KrakenError] = ConfigError) -> Path:
    """`path` if it is a regular file this user can read, checked before opening it (a FIFO would block the
    reader forever, a device would stream without end); `error` naming the path otherwise."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise error(f"{path}: no such file") from None
    except PermissionError:
        raise error(f"{path}: permission denied (this user cannot enter a folder on its path)") from None
    except OSError as err:
        raise error(f"{path}: cannot access ({err.strerror or err})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path}: is {_kind(mode)}, not a regular file; refusing to read it")
    if not os.access(path, os.R_OK, effective_ids=os.access in os.supports_effective_ids):
        raise error(f"{path}: permission denied (this user cannot read it)")
    return path
