"""Checkpoints: the native format (safetensors + JSON config) and interop with other people's weights.

Native: a directory with ``config.json`` ({"format": "krakenlm", "config": {...}}) and
``model.safetensors`` holding the full, single-device state dict. A tensor-parallel rank reads only
its slice of each tensor (safetensors slicing, krakenlm.model.sharding). Every native checkpoint
carries ``manifest.json`` (size and SHA-256 of every file; written last): loading verifies the files
it reads, so a corrupt or modified checkpoint is never loaded silently. (Format version 1, before
manifests, still loads, with a warning that it cannot be verified.)

Imported: (a) the Kraken authors' nanoGPT-derived torch.save files (a run directory holding one
``ckpt.pt``, beside the config.json of training arguments their train.py writes, is accepted too),
(b) nanoGPT GPT files, both loaded with ``torch.load(weights_only=True)`` so nothing but tensors, plain
containers and numpy scalars is ever unpickled, and zip-format files are CRC-checked first; (c) Hugging
Face GPT-2 directories (config.json + model.safetensors); (d) Hugging Face Llama directories
(krakenlm.hf_llama; sharded safetensors too); (e) krakenlm's own Hugging Face exports
(krakenlm.interop.hf_export: native tensors, the config under "krakenlm"). Exported: HF GPT-2.

Every reader refuses what is not a regular file before opening it (a FIFO would block), names the
file on any failure, and checks the tensors it returns: floating point, finite, one dtype.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import os
import pickle
import re
import shutil
import stat
import uuid
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from krakenlm.config import ModelConfig
from krakenlm.errors import CheckpointError, ConfigError, KrakenError
from krakenlm.hf_llama import llama_config, read_llama
from krakenlm.jsonio import read_json
from krakenlm.model import Shard, Transformer
from krakenlm.model.params import FORMATS, foreign, foreign_state, shapes, strip_foreign, tied_names
from krakenlm.model.sharding import shard_ranges, shard_state_dict, take
from krakenlm.resources import gib, model_bytes, require_memory
from krakenlm.validation import check_output_dir
from krakenlm.validation import regular_file as check_regular_file

FORMAT = "krakenlm"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2  # 2: manifest.json is part of every checkpoint
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Files: every reader goes through these, so a FIFO, a device, a permission problem or a corrupt file
# is one named CheckpointError, never a hang or a raw traceback ------------------------------------------
def _stat(path: Path) -> os.stat_result | None:
    """os.stat(path), None if it does not exist; CheckpointError naming the path on any other failure."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied (this user cannot enter a folder on its path)") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot access ({err.strerror or err})") from None


def regular_file(path: str | Path) -> Path:
    """`path` if it is a readable regular file (checked before opening: a FIFO would block the reader)."""
    return check_regular_file(path, CheckpointError)


def describe_error(err: BaseException) -> str:
    """A library's error message as one plain line (no terminal escape codes, no stack of hints)."""
    text = _ANSI.sub("", str(err))
    hit = re.search(r"(?:WeightsUnpickler error|enforce fail[^\]]*\])[:\s]*([^\n]+)", text)
    line = hit.group(1) if hit else next((x.strip() for x in text.splitlines() if x.strip()), "")
    return f"{type(err).__name__}: {line[:200]}" if line else type(err).__name__


@contextlib.contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn any failure while parsing `path` into CheckpointError naming it (parsers of corrupt files raise
    KeyError, IndexError, struct errors and more, not only OSError)."""
    try:
        yield
    except KrakenError:
        raise
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied (this user cannot read it)") from None
    except Exception as err:  # noqa: BLE001  (see the docstring: any parser failure means "corrupt file")
        raise CheckpointError(f"{path}: unreadable or truncated {what} ({describe_error(err)})") from err


def _save_safetensors(tensors: dict[str, Tensor], file: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors.save_file, but with the permissions every other file gets (it creates files 0600)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(file), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)


def _check_tensors(state: dict[str, Any], source: str) -> dict[str, Tensor]:
    """Refuse anything but finite floating-point tensors (naming the first bad one) and give all of them one
    dtype, the widest stored (a bf16 tensor in an fp32 file must not reach the forward pass as bf16)."""
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{source}: {name} is a {type(value).__name__}, not a tensor")
        if not value.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name} has dtype {value.dtype}; weights must be floating point")
    if not state:
        return state
    common = next(iter(state.values())).dtype
    for value in state.values():
        common = torch.promote_types(common, value.dtype)
    common = torch.float32 if common == torch.float64 else common
    refuse_non_finite(state, source)
    return {name: value.to(common) for name, value in state.items()}


def refuse_non_finite(state: dict[str, Tensor], source: str) -> None:
    """CheckpointError naming the first tensor holding NaN or Inf: such weights are never saved or loaded."""
    for name, value in state.items():
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: tensor {name} holds NaN or Inf values; refusing a broken checkpoint")


def refuse_overflow(model: torch.nn.Module, source: str) -> None:
    """CheckpointError naming the first weight that is not finite after conversion: finite weights beyond a
    narrower dtype's range (fp16's 65504) become Inf, and the model would then generate garbage silently."""
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            limit = torch.finfo(value.dtype).max
            raise CheckpointError(f"{source}: {name} overflows {value.dtype} (values beyond +-{limit:.6g} become "
                                  "Inf); run it in a wider dtype (--dtype fp32 or bf16)")


# Native format -------------------------------------------------------------------------------------
def expected_shapes(config: ModelConfig, shard: Shard | None = None) -> dict[str, tuple[int, ...]]:
    """Native name -> shape of every tensor of ``config``'s model (of ``shard``'s slices when given)."""
    full = shapes(config)
    if shard is None:
        return full
    return {name: tuple(sum(b - a for a, b in r) for r in shard_ranges(name, shape, config, shard))
            for name, shape in full.items()}


def check_state(state: dict[str, Tensor], config: ModelConfig, source: str) -> None:
    """Refuse a state dict that does not match the config exactly (names and shapes)."""
    want = expected_shapes(config)
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        raise CheckpointError(f"{source}: tensors do not match the config: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(state[name].shape)}, config needs {shape}")


def _config_field(directory: Path, field: str) -> Any:
    with contextlib.suppress(OSError, ValueError, AttributeError, CheckpointError, ConfigError):
        return json.loads(regular_file(directory / CONFIG_FILE).read_text()).get(field)
    return None


def is_native_checkpoint(directory: Path) -> bool:
    """Whether `directory` is a checkpoint save_checkpoint wrote: the only kind of directory it replaces."""
    return _config_field(directory, "format") == FORMAT


def save_checkpoint(path: str | Path, state: dict[str, Tensor] | torch.nn.Module, config: ModelConfig,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write a native checkpoint atomically (a temp directory renamed into place), manifest included.
    An existing `path` must be an empty directory or a native checkpoint (which is replaced): a user's file,
    a device or another directory is refused, never moved aside."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    path = check_output_dir(path, "out", is_native_checkpoint, "checkpoint")
    check_state(state, config, str(path))
    refuse_non_finite(state, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # created with the user's umask (mkdtemp would leave the checkpoint private, 0700)
    try:
        _save_safetensors(state, tmp / WEIGHTS_FILE)
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_dict(), **(metadata or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2))
        write_manifest(tmp)
        _swap_in(tmp, path)
    except (OSError, SafetensorError) as err:  # a full disk, a quota, an I/O error
        free = ""
        with contextlib.suppress(OSError):
            free = f"; {gib(shutil.disk_usage(path.parent).free)} free there"
        raise CheckpointError(f"{path}: could not write the checkpoint ({describe_error(err)}{free}); "
                              "nothing was replaced") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename the finished `tmp` to `path`; a checkpoint already there is replaced, or kept if that fails."""
    if not path.is_dir():
        os.replace(tmp, path)
        return
    old = tmp.with_name(tmp.name + ".old")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(regular_file(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or new entry in `path` durable (a crash after return cannot undo it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest_files(directory: Path) -> dict[str, Any]:
    with _reading(directory / MANIFEST_FILE, "manifest"):
        files = json.loads(regular_file(directory / MANIFEST_FILE).read_text())["files"]
        if not isinstance(files, dict):
            raise CheckpointError(f"{directory / MANIFEST_FILE}: 'files' must be an object")
        return files


def write_manifest(directory: Path, extra: dict[str, Any] | None = None) -> None:
    """fsync every file in `directory` and record its size and SHA-256 in manifest.json, written last.

    Entries of an existing manifest are reused for files whose size and mtime are unchanged (the
    trainer adds its files to the checkpoint save_checkpoint wrote, without hashing the weights twice).
    """
    known = _manifest_files(directory) if (directory / MANIFEST_FILE).exists() else {}
    files = {}
    for file in sorted(directory.iterdir()):
        if file.name == MANIFEST_FILE:
            continue
        with open(regular_file(file), "rb") as f:
            os.fsync(f.fileno())
        st = file.stat()
        old = known.get(file.name, {})
        same = old.get("bytes") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns
        files[file.name] = {"sha256": old["sha256"] if same else _sha256(file), "bytes": st.st_size,
                            "mtime_ns": st.st_mtime_ns}
    tmp = directory / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps({**(extra or {}), "files": files}, indent=2))
    os.replace(tmp, directory / MANIFEST_FILE)
    fsync_dir(directory)


def verify_manifest(directory: str | Path, names: tuple[str, ...], required: bool = False) -> None:
    """Check the files `names` of `directory` against its manifest.json (CheckpointError on any mismatch).

    Only the files a reader is about to use are hashed: serving a trained checkpoint must not read
    its optimizer state. Without a manifest this passes unless `required`.
    """
    directory = Path(directory)
    if _stat(directory / MANIFEST_FILE) is None:
        if required:
            raise CheckpointError(f"{directory}: incomplete checkpoint (no {MANIFEST_FILE}); it was never finished "
                                  "or its manifest was removed")
        return
    files = _manifest_files(directory)
    with _reading(directory / MANIFEST_FILE, "manifest"):
        checks = [(name, int(files[name]["bytes"]), str(files[name]["sha256"])) for name in names]
    for name, size, sha256 in checks:
        file = directory / name
        if _stat(file) is None:
            raise CheckpointError(f"{directory}: {name} is missing")
        if regular_file(file).stat().st_size != size or _sha256(file) != sha256:
            raise CheckpointError(f"{directory}: {name} does not match its checksum (corrupt or modified)")


def _read_json(path: Path) -> dict[str, Any]:
    doc = read_json(path, "checkpoint config", CheckpointError)
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: config must be a JSON object")
    return doc


def _locate(path: Path) -> Path:
    """The file or directory a checkpoint path names: a directory without config.json that holds exactly one
    .pt file (the Kraken authors' / nanoGPT's out_dir with its ckpt.pt) means that file."""
    st = _stat(path)
    if st is None:
        raise CheckpointError(f"{path}: no such checkpoint")
    if not stat.S_ISDIR(st.st_mode) or _stat(path / CONFIG_FILE) is not None:
        return path
    return _run_file(path, f"no {CONFIG_FILE}")


def _run_file(path: Path, why: str) -> Path:
    """The one .pt file of a run directory (the authors' / nanoGPT's out_dir), or CheckpointError saying `why`
    the directory is not a checkpoint itself."""
    try:
        pts = sorted(p for p in path.iterdir() if p.suffix == ".pt")
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied (this user cannot list it)") from None
    if len(pts) == 1:
        return pts[0]
    if pts:
        raise CheckpointError(f"{path}: {why} and several .pt files ({', '.join(p.name for p in pts)}); "
                              "pass the one to load")
    raise CheckpointError(f"{path}: {why} (nor a .pt checkpoint file)")


class Checkpoint:
    """A checkpoint opened once: format detected, config read and, for torch files, the file loaded
    once (a tensor-parallel rank used to torch.load an authors' .pt four times). A run directory that
    holds exactly one .pt file (the authors' out_dir with its ckpt.pt, and the config.json their train.py
    dumps its arguments to, or none) opens that file."""

    def __init__(self, path: str | Path) -> None:
        self.path = _locate(Path(path))
        self._torch: dict[str, Any] | None = None
        self._doc: dict[str, Any] = {}
        self.format_version: int | None = None  # native checkpoints only
        if _stat(self.path / CONFIG_FILE) is not None:
            self._doc = _read_json(self.path / CONFIG_FILE)
            if self._doc.get("format") == FORMAT or self._doc.get("model_type") is not None:
                self._open_config()
                return
            # The authors' train.py writes its own config.json (its training arguments) beside ckpt.pt: the
            # .pt's model_args describe the model
            self.path = _run_file(self.path, f"{CONFIG_FILE} is neither a krakenlm, a GPT-2 nor a Llama config")
            self._doc = {}
        self._torch = _torch_load(self.path)
        self.format = "kraken-authors" if "n_heads_in_split" in self._torch["model_args"] else "nanogpt"
        self.config = _nanogpt_config(self._torch, self.format, str(self.path))

    def _open_config(self) -> None:
        """Format and config of a directory whose config.json describes the model (native, HF GPT-2, HF Llama)."""
        if self._doc.get("format") == FORMAT:
            self.format_version = _format_version(self.path, self._doc)
            self.format, self.config = "native", _native_config(self.path, self._doc)
        elif self._doc.get("model_type") == "gpt2":
            self.format, self.config = "hf-gpt2", _hf_config(self._doc, str(self.path))
        elif self._doc.get("model_type") == "llama":
            self.format, self.config = "hf-llama", llama_config(self._doc)
        elif self._doc.get("model_type") == "krakenlm":  # `krakenlm export --format hf`: native tensors inside
            self.format, self.config = "hf-krakenlm", _native_config(self.path, {"config": self._doc.get("krakenlm")})
        else:
            raise CheckpointError(f"{self.path}: config.json is neither a krakenlm, a GPT-2 nor a Llama config")

    def state(self, shard: Shard | None = None) -> dict[str, Tensor]:
        """The native state dict, or only ``shard``'s slices of it (native files are read sliced); every
        tensor checked (floating point, finite) and given one dtype."""
        source = str(self.path)
        if self.format == "native":
            verify_manifest(self.path, (CONFIG_FILE, WEIGHTS_FILE), required=self.format_version != 1)
            if _stat(self.path / MANIFEST_FILE) is None:
                warnings.warn(f"{source}: written by an older krakenlm without checksums; corruption cannot be "
                              "detected (load and save it again to add them)", stacklevel=3)
        if self.format in ("native", "hf-krakenlm"):
            _require_model_memory(self.config, shard, source)
            return _check_tensors(_read_native(self.path, self.config, shard or Shard.full(self.config)), source)
        if self.format == "hf-llama":
            _require_model_memory(self.config, shard, source)
            state = read_llama(self.path, self.config, shard or Shard.full(self.config), expected_shapes(self.config))
            return _check_tensors(state, source)
        _require_model_memory(self.config, None, source)
        if self.format == "hf-gpt2":
            state = _import_hf(self.path, self.config)
        else:
            assert self._torch is not None
            state = _import_nanogpt(self._torch, self.config, self.format, source)
        check_state(state, self.config, source)
        return state if shard is None else shard_state_dict(state, self.config, shard)

    def model(self, shard: Shard | None = None, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> Transformer:
        """A ready-to-run model (eval mode) on ``device``."""
        state = self.state(shard)
        with torch.device("meta"):
            model = Transformer(self.config, shard, init=False)
        model.load_state_dict(state, assign=True)
        model = model.to(device=device, dtype=dtype).eval()
        if dtype is not None:
            refuse_overflow(model, str(self.path))
        return model

    def release(self) -> None:
        """Drop the loaded torch file (once the model is built it is not needed)."""
        self._torch = None


def detect_format(path: str | Path) -> str:
    """'native', 'hf-gpt2', 'hf-llama', 'hf-krakenlm' (an export), 'kraken-authors' or 'nanogpt' (the last two
    by peeking inside)."""
    return Checkpoint(path).format


def load_config(path: str | Path) -> ModelConfig:
    return Checkpoint(path).config


def _format_version(path: Path, doc: dict[str, Any]) -> int:
    """The native format version a config.json states (1 when absent: written before versions); a version this
    krakenlm does not know is refused, not read as the latest (a newer layout would load wrong or unverified)."""
    version = doc.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{path / CONFIG_FILE}: format_version must be an integer 1..{FORMAT_VERSION} (this "
                              f"krakenlm's), got {version!r}; a newer krakenlm wrote it, or the file was edited")
    return version


def _native_config(path: Path, doc: dict[str, Any]) -> ModelConfig:
    """The config a native checkpoint states: every field but the name (a default would silently reshape it)."""
    required = tuple(name for name in ModelConfig.__dataclass_fields__ if name != "name")
    try:
        return ModelConfig.from_dict(doc.get("config"), required)
    except ConfigError as err:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid config: {err}") from err


def _require_model_memory(config: ModelConfig, shard: Shard | None, source: str) -> None:
    fraction = 1.0 if shard is None else shard.sub_count / config.n_sub / shard.parts
    require_memory(model_bytes(config, fraction=fraction), f"{source}: the model's weights")


def load_state(path: str | Path, shard: Shard | None = None) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Config and (sharded) native state dict from a checkpoint of any supported format."""
    ckpt = Checkpoint(path)
    return ckpt.config, ckpt.state(shard)


def _read_native(path: Path, config: ModelConfig, shard: Shard) -> dict[str, Tensor]:
    file = regular_file(path / WEIGHTS_FILE)
    want = expected_shapes(config)
    with _reading(file, "safetensors file"), safe_open(str(file), framework="pt") as f:
        names = set(f.keys())
        if names != set(want):
            raise CheckpointError(f"{file}: tensors do not match config.json: "
                                  f"missing {sorted(set(want) - names)[:5]}, "
                                  f"unexpected {sorted(names - set(want))[:5]}")
        state = {}
        for name, shape in want.items():
            sl = f.get_slice(name)
            if tuple(sl.get_shape()) != shape:
                raise CheckpointError(f"{file}: {name} has shape {tuple(sl.get_shape())}, config needs {shape}")
            state[name] = take(lambda index, sl=sl: sl[index], shard_ranges(name, shape, config, shard))
    return state


def load_model(path: str | Path, shard: Shard | None = None, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> Transformer:
    """A ready-to-run model (eval mode) from any supported checkpoint."""
    return Checkpoint(path).model(shard, dtype, device)


# Imports from other code bases ------------------------------------------------------------------------
def _numpy_globals() -> list[Any]:
    """Exactly the globals a numpy scalar needs (the authors' DDP runs save best_val_loss as numpy.float32):
    numpy's scalar constructor under its numpy 1.x and 2.x module paths, np.dtype and the numeric dtype
    classes. Nothing here can construct anything but a number."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    codes = np.typecodes["AllInteger"] + np.typecodes["AllFloat"] + "?"
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
            *{type(np.dtype(code)) for code in codes}]


def _check_zip(path: Path) -> None:
    """A zip-format torch file stores a CRC-32 per record: check them all (torch.load does not)."""
    with _reading(path, "torch checkpoint"):
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    if bad is not None:
        raise CheckpointError(f"{path}: record {bad} fails its CRC-32 check (the file is corrupt)")


def load_tensors(path: str | Path) -> Any:
    """torch.load(weights_only=True) of a regular, CRC-checked file, numpy scalars allowed; any failure is a
    one-line CheckpointError naming the file (and, for a refused pickle, the global that blocked it)."""
    path = regular_file(path)
    _check_zip(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = _ANSI.sub("", str(err))
        blocked = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"but got <class '([\w.]+)'>", text)
        if blocked:
            raise CheckpointError(f"{path}: refused: it needs {blocked.group(1)}, which is not a tensor, plain "
                                  "container or numpy scalar (krakenlm never unpickles arbitrary objects)") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({describe_error(err)})") from None
    except Exception as err:  # noqa: BLE001  (torch.load of a corrupt file raises KeyError, IndexError, ...)
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({describe_error(err)})") from None


def _torch_load(path: Path) -> dict[str, Any]:
    ckpt = load_tensors(path)
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict)
            and isinstance(ckpt.get("model_args"), dict)):
        raise CheckpointError(f"{path}: expected a nanoGPT-style dict with 'model' and 'model_args'")
    return ckpt


def _arg(args: dict[str, Any], name: str, source: str, default: Any = None) -> int:
    """An integer model_args field: an int or numpy integer, never a float silently truncated."""
    value = args.get(name, default)
    if value is None:
        raise CheckpointError(f"{source}: model_args: missing field {name!r}")
    try:
        if isinstance(value, bool) or hasattr(value, "dtype") and value.dtype.kind == "b":
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise CheckpointError(f"{source}: model_args: {name} must be an integer, got {value!r}") from None


def _nanogpt_config(ckpt: dict[str, Any], fmt: str, source: str) -> ModelConfig:
    args = ckpt["model_args"]
    bias = args.get("bias", False)
    if not isinstance(bias, bool) and not (hasattr(bias, "dtype") and bias.dtype.kind == "b"):
        raise CheckpointError(f"{source}: model_args: bias must be true or false, got {bias!r}")
    fields = {name: _arg(args, name, source) for name in ("n_layer", "n_embd", "vocab_size", "block_size")}
    fields["bias"] = bool(bias)
    try:
        if fmt == "kraken-authors":
            per_sub, total = _arg(args, "n_heads_in_split", source), _arg(args, "n_head", source)
            if per_sub < 1 or total % per_sub:
                raise CheckpointError(f"{source}: model_args: n_heads_in_split={per_sub} must be a positive divisor of "
                                      f"n_head={total}")
            return ModelConfig(arch="kraken", n_head=per_sub, n_sub=total // per_sub,
                               ffn_hidden=_arg(args, "ffn_expansion", source, 2) * fields["n_embd"], **fields)
        return ModelConfig(arch="gpt", n_head=_arg(args, "n_head", source), **fields)
    except ConfigError as err:
        raise CheckpointError(f"{source}: model_args: {err}") from err


def _strip(state: dict[str, Any], fmt: str, source: str) -> dict[str, Any]:
    """Names as krakenlm.model.params gives them (torch.compile's and HF's prefixes, mask buffers dropped)."""
    bad = [k for k in state if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{source}: tensor names must be strings, got {bad[:3]!r}")
    return {short: state[k] for k, short in strip_foreign(list(state), fmt).items()}


def _gather(state: dict[str, Tensor], config: ModelConfig, fmt: str, source: str) -> dict[str, Tensor]:
    """Native state from a GPT-2-family format's per-block tensors (names and layout: model.params.foreign)."""
    state = dict(state)
    out: dict[str, Tensor] = {}
    for entry in foreign(config, fmt, every=True):
        names = [name for part in entry.parts for name in part]
        if not all(n in state for n in names):
            continue
        parts = [state.pop(n) for n in names]  # one tensor per sub-layer in this family
        parts = [p.t() for p in parts] if entry.transpose and parts[0].dim() == 2 else parts
        if any(p.shape != parts[0].shape for p in parts):
            raise CheckpointError(f"{source}: the sub-layers' {entry.native.param.names_in(FORMATS[fmt])[0]} "
                                  "tensors differ in shape")
        out[entry.native.name] = torch.stack(parts).contiguous() if entry.native.param.stacked else parts[0]
    for name, native in tied_names(config, fmt).items():
        head = state.pop(name, None)
        if head is not None and not torch.equal(head, out.get(native, head)):
            raise CheckpointError(f"{source}: lm_head is not tied to the token embedding; GPT-2 / nanoGPT imports "
                                  "expect a tied head")
    if state:
        raise CheckpointError(f"{source}: unexpected tensors {sorted(state)[:5]}")
    return out


def _import_nanogpt(ckpt: dict[str, Any], config: ModelConfig, fmt: str,
                    source: str | None = None) -> dict[str, Tensor]:
    source = source or fmt
    state = _check_tensors(_strip(ckpt["model"], fmt, source), source)
    return _gather(state, config, fmt, source)


def _hf_config(doc: dict[str, Any], source: str) -> ModelConfig:
    act = doc.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{source}: HF GPT-2 activation_function={act!r} is not supported "
                              "(krakenlm uses GELU-tanh)")
    try:
        return ModelConfig(arch="gpt", n_layer=doc["n_layer"], n_embd=doc["n_embd"], n_head=doc["n_head"],
                           ffn_hidden=doc.get("n_inner"), vocab_size=doc["vocab_size"],
                           block_size=doc.get("n_positions", 1024), bias=True,
                           norm_eps=doc.get("layer_norm_epsilon", 1e-5))
    except (KeyError, ConfigError) as err:
        raise CheckpointError(f"{source}: HF GPT-2 config.json: missing or bad field {err}") from err


def _import_hf(path: Path, config: ModelConfig) -> dict[str, Tensor]:
    file = path / WEIGHTS_FILE
    if _stat(file) is None:
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE} (only safetensors HF checkpoints are read; "
                              "pickled pytorch_model.bin files are refused)")
    with _reading(regular_file(file), "safetensors file"), safe_open(str(file), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    state = _check_tensors(_strip(state, "hf-gpt2", str(file)), str(file))
    return _gather(state, config, "hf-gpt2", str(path))


def gpt2_shaped(config: ModelConfig) -> bool:
    """Whether GPT2LMHeadModel computes exactly this model: a gpt model with biases, LayerNorm, GELU, learned
    positions, multi-head attention of head size n_embd / n_head and a tied head."""
    return (config.arch == "gpt" and config.bias and config.mlp == "gelu" and config.position == "learned"
            and config.kv_heads == config.n_head and config.head_size * config.n_head == config.n_embd
            and config.norm == "layernorm" and config.tie_embeddings)


def export_hf_gpt2(path: str | Path, model: Transformer) -> Path:
    """Write a gpt model as a Hugging Face GPT-2 directory (GPT2LMHeadModel layout, Conv1D weights)."""
    config = model.config
    if not gpt2_shaped(config):
        raise ConfigError("export: only GPT-2-shaped gpt models (bias, LayerNorm, GELU, learned positions, MHA, "
                          "tied head) export to HF GPT-2")
    prefix = FORMATS["hf-gpt2"].prefix
    out = {prefix + name: t for name, t in foreign_state(model.state_dict(), config, "hf-gpt2").items()}
    path = check_output_dir(path, "path", lambda d: _config_field(d, "model_type") == "gpt2", "GPT-2 export")
    path.mkdir(parents=True, exist_ok=True)
    _save_safetensors(out, path / WEIGHTS_FILE, metadata={"format": "pt"})
    hf = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": config.n_layer,
          "n_embd": config.n_embd, "n_head": config.n_head, "n_inner": config.ffn_hidden,
          "n_positions": config.block_size, "n_ctx": config.block_size, "vocab_size": config.vocab_size,
          "layer_norm_epsilon": config.norm_eps, "activation_function": "gelu_new", "tie_word_embeddings": True,
          "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    (path / CONFIG_FILE).write_text(json.dumps(hf, indent=2))
    return path
