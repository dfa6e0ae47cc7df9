"""Checkpoints: the native format (safetensors + JSON config) and interop with other people's weights.

Native: a directory with ``config.json`` ({"format": "krakenlm", "config": {...}}) and
``model.safetensors`` holding the full, single-device state dict. A tensor-parallel rank reads only
its slice of each tensor (safetensors slicing, krakenlm.model.sharding). A directory may also carry
``manifest.json`` (size and SHA-256 of every file; the trainer writes one per checkpoint): when it is
there, loading verifies the files it reads, so a corrupt or modified checkpoint is never loaded silently.

Imported: (a) the Kraken authors' nanoGPT-derived torch.save files, (b) nanoGPT GPT files, both
loaded with ``torch.load(weights_only=True)`` so nothing but tensors and plain containers is ever
unpickled; (c) Hugging Face GPT-2 directories (config.json + model.safetensors); (d) Hugging Face
Llama directories (krakenlm.hf_llama; sharded safetensors too). Exported: HF GPT-2.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from krakenlm.config import ModelConfig
from krakenlm.errors import CheckpointError, ConfigError
from krakenlm.hf_llama import llama_config, read_llama
from krakenlm.model import Shard, Transformer
from krakenlm.model.sharding import shard_ranges, shard_state_dict, take

FORMAT = "krakenlm"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"

# GPT-2 / nanoGPT / Kraken-authors per-block names -> native per-layer names (stacked over sub-layers).
_BLOCK_KEYS = {
    "ln_1.weight": "ln1.weight", "ln_1.bias": "ln1.bias",
    "attn.c_attn.weight": "attn.qkv_weight", "attn.c_attn.bias": "attn.qkv_bias",
    "attn.c_proj.weight": "attn.proj_weight", "attn.c_proj.bias": "proj_bias",
    "ln_2.weight": "ln2.weight", "ln_2.bias": "ln2.bias",
    "mlp.c_fc.weight": "mlp.up_weight", "mlp.c_fc.bias": "mlp.up_bias",
    "mlp.c_proj.weight": "mlp.down_weight", "mlp.c_proj.bias": "down_bias",
}
_GLOBAL_KEYS = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight", "ln_f.weight": "ln_f.weight",
                "ln_f.bias": "ln_f.bias", "conjunction.weight": "conj_weight", "conjunction.bias": "conj_bias"}


# Native format -------------------------------------------------------------------------------------
def expected_shapes(config: ModelConfig, shard: Shard | None = None) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Transformer(config, shard, init=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


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


def save_checkpoint(path: str | Path, state: dict[str, Tensor] | torch.nn.Module, config: ModelConfig,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write a native checkpoint atomically (a temp directory renamed into place)."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    check_state(state, config, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # created with the user's umask (mkdtemp would leave the checkpoint private, 0700)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / WEIGHTS_FILE))
        doc = {"format": FORMAT, "format_version": 1, "config": config.to_dict(), **(metadata or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
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


def write_manifest(directory: Path, extra: dict[str, Any] | None = None) -> None:
    """fsync every file in `directory` and record its size and SHA-256 in manifest.json, written last."""
    files = {}
    for file in sorted(directory.iterdir()):
        if file.name == MANIFEST_FILE:
            continue
        with open(file, "rb") as f:
            os.fsync(f.fileno())
        files[file.name] = {"sha256": _sha256(file), "bytes": file.stat().st_size}
    (directory / MANIFEST_FILE).write_text(json.dumps({**(extra or {}), "files": files}, indent=2))
    fsync_dir(directory)


def verify_manifest(directory: str | Path, names: tuple[str, ...], required: bool = False) -> None:
    """Check the files `names` of `directory` against its manifest.json (CheckpointError on any mismatch).

    Only the files a reader is about to use are hashed: serving a trained checkpoint must not read
    its optimizer state. Without a manifest this passes unless `required`.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.exists():
        if required:
            raise CheckpointError(f"{directory}: incomplete checkpoint (no {MANIFEST_FILE}); it was never finished")
        return
    try:
        files = json.loads(manifest_path.read_text())["files"]
        checks = [(name, int(files[name]["bytes"]), str(files[name]["sha256"])) for name in names]
    except KeyError as err:
        raise CheckpointError(f"{manifest_path}: does not cover {err}") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({err})") from err
    for name, size, sha256 in checks:
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{directory}: {name} is missing")
        if file.stat().st_size != size or _sha256(file) != sha256:
            raise CheckpointError(f"{directory}: {name} does not match its checksum (corrupt or modified)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON config ({err})") from err
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: config must be a JSON object")
    return doc


class Checkpoint:
    """A checkpoint opened once: format detected, config read and, for torch files, the file loaded
    once (a tensor-parallel rank used to torch.load an authors' .pt four times)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._torch: dict[str, Any] | None = None
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such checkpoint")
        if self.path.is_dir():
            if not (self.path / CONFIG_FILE).exists():
                raise CheckpointError(f"{self.path}: directory has no {CONFIG_FILE}")
            doc = _read_json(self.path / CONFIG_FILE)
            if doc.get("format") == FORMAT:
                self.format, self.config = "native", _native_config(self.path)
            elif doc.get("model_type") == "gpt2":
                self.format, self.config = "hf-gpt2", _hf_config(doc)
            elif doc.get("model_type") == "llama":
                self.format, self.config = "hf-llama", llama_config(doc)
            else:
                raise CheckpointError(f"{self.path}: config.json is neither a krakenlm, a GPT-2 nor a Llama config")
        else:
            self._torch = _torch_load(self.path)
            self.format = "kraken-authors" if "n_heads_in_split" in self._torch["model_args"] else "nanogpt"
            self.config = _nanogpt_config(self._torch, self.format)

    def state(self, shard: Shard | None = None) -> dict[str, Tensor]:
        """The native state dict, or only ``shard``'s slices of it (native files are read sliced)."""
        if self.format == "native":
            verify_manifest(self.path, (CONFIG_FILE, WEIGHTS_FILE))
            return _read_native(self.path, self.config, shard or Shard.full(self.config))
        if self.format == "hf-llama":
            return read_llama(self.path, self.config, shard or Shard.full(self.config), expected_shapes(self.config))
        if self.format == "hf-gpt2":
            state = _import_hf(self.path, self.config)
        else:
            assert self._torch is not None
            state = _import_nanogpt(self._torch, self.config, self.format)
        check_state(state, self.config, str(self.path))
        return state if shard is None else shard_state_dict(state, self.config, shard)

    def model(self, shard: Shard | None = None, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> Transformer:
        """A ready-to-run model (eval mode) on ``device``."""
        with torch.device("meta"):
            model = Transformer(self.config, shard, init=False)
        model.load_state_dict(self.state(shard), assign=True)
        return model.to(device=device, dtype=dtype).eval()

    def release(self) -> None:
        """Drop the loaded torch file (once the model is built it is not needed)."""
        self._torch = None


def detect_format(path: str | Path) -> str:
    """'native', 'hf-gpt2', 'hf-llama', 'kraken-authors' or 'nanogpt' (the last two by peeking inside)."""
    return Checkpoint(path).format


def load_config(path: str | Path) -> ModelConfig:
    return Checkpoint(path).config


def _native_config(path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(_read_json(path / CONFIG_FILE).get("config"))
    except ConfigError as err:
        raise CheckpointError(f"{path}: invalid config: {err}") from err


def load_state(path: str | Path, shard: Shard | None = None) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Config and (sharded) native state dict from a checkpoint of any supported format."""
    ckpt = Checkpoint(path)
    return ckpt.config, ckpt.state(shard)


def _read_native(path: Path, config: ModelConfig, shard: Shard) -> dict[str, Tensor]:
    file = path / WEIGHTS_FILE
    want = expected_shapes(config)
    try:
        with safe_open(str(file), framework="pt") as f:
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
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{file}: unreadable or truncated safetensors file ({err})") from err
    return state


def load_model(path: str | Path, shard: Shard | None = None, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> Transformer:
    """A ready-to-run model (eval mode) from any supported checkpoint."""
    return Checkpoint(path).model(shard, dtype, device)


# Imports from other code bases ------------------------------------------------------------------------
def _torch_load(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused: the file contains pickled objects other than tensors "
                              f"and plain containers ({str(err).splitlines()[0]})") from err
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from err
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict)
            and isinstance(ckpt.get("model_args"), dict)):
        raise CheckpointError(f"{path}: expected a nanoGPT-style dict with 'model' and 'model_args'")
    return ckpt


def _nanogpt_config(ckpt: dict[str, Any], fmt: str) -> ModelConfig:
    args = ckpt["model_args"]
    try:
        n_layer, n_embd = int(args["n_layer"]), int(args["n_embd"])
        fields = dict(n_layer=n_layer, n_embd=n_embd, vocab_size=int(args["vocab_size"]),
                      block_size=int(args["block_size"]), bias=bool(args.get("bias", False)))
        if fmt == "kraken-authors":
            per_sub = int(args["n_heads_in_split"])
            return ModelConfig(arch="kraken", n_head=per_sub, n_sub=int(args["n_head"]) // per_sub,
                               ffn_hidden=int(args.get("ffn_expansion", 2)) * n_embd, **fields)
        return ModelConfig(arch="gpt", n_head=int(args["n_head"]), **fields)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"model_args is missing or has a bad field: {err}") from err


def _strip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix("_orig_mod.").removeprefix("transformer."): v for k, v in state.items()
            if not k.endswith((".attn.bias", ".attn.masked_bias"))}


def _gather(state: dict[str, Tensor], config: ModelConfig, block_name: Callable[[int, int], str], transpose: bool,
            source: str) -> dict[str, Tensor]:
    """Native state from per-block GPT-style names; ``block_name(layer, sub)`` gives a block's prefix."""
    state = _strip(state)
    out: dict[str, Tensor] = {}
    for old, new in _GLOBAL_KEYS.items():
        if old in state:
            out[new] = state.pop(old)
    if "ln_f.weight" in out:
        out["ln_f.weight"] = out["ln_f.weight"].unsqueeze(0)
    if "ln_f.bias" in out:
        out["ln_f.bias"] = out["ln_f.bias"].unsqueeze(0)
    for layer in range(config.n_layer):
        for old, new in _BLOCK_KEYS.items():
            names = [f"{block_name(layer, sub)}.{old}" for sub in range(config.n_sub)]
            if not all(n in state for n in names):
                continue
            parts = [state.pop(n) for n in names]
            if transpose and parts[0].dim() == 2:
                parts = [p.t() for p in parts]
            out[f"layers.{layer}.{new}"] = torch.stack(parts).contiguous()
    head = state.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, out.get("wte.weight", head)):
        raise CheckpointError(f"{source}: lm_head is not tied to the token embedding; GPT-2 / nanoGPT imports "
                              "expect a tied head")
    if state:
        raise CheckpointError(f"{source}: unexpected tensors {sorted(state)[:5]}")
    return out


def _import_nanogpt(ckpt: dict[str, Any], config: ModelConfig, fmt: str) -> dict[str, Tensor]:
    if fmt == "kraken-authors":
        return _gather(ckpt["model"], config, lambda layer, sub: f"h.{sub}.{layer}", False, fmt)
    return _gather(ckpt["model"], config, lambda layer, sub: f"h.{layer}", False, fmt)


def _hf_config(doc: dict[str, Any]) -> ModelConfig:
    act = doc.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"HF GPT-2 activation_function={act!r} is not supported (krakenlm uses GELU-tanh)")
    try:
        return ModelConfig(arch="gpt", n_layer=doc["n_layer"], n_embd=doc["n_embd"], n_head=doc["n_head"],
                           ffn_hidden=doc.get("n_inner"), vocab_size=doc["vocab_size"],
                           block_size=doc.get("n_positions", 1024), bias=True,
                           norm_eps=doc.get("layer_norm_epsilon", 1e-5))
    except (KeyError, ConfigError) as err:
        raise CheckpointError(f"HF GPT-2 config.json: missing or bad field {err}") from err


def _import_hf(path: Path, config: ModelConfig) -> dict[str, Tensor]:
    file = path / WEIGHTS_FILE
    if not file.exists():
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE} (only safetensors HF checkpoints are read; "
                              "pickled pytorch_model.bin files are refused)")
    try:
        with safe_open(str(file), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: unreadable or truncated safetensors file ({err})") from err
    return _gather(state, config, lambda layer, sub: f"h.{layer}", True, str(path))


def export_hf_gpt2(path: str | Path, model: Transformer) -> Path:
    """Write a gpt model as a Hugging Face GPT-2 directory (GPT2LMHeadModel layout, Conv1D weights)."""
    config = model.config
    if config.arch != "gpt" or not config.bias or config.mlp != "gelu" or config.position != "learned" \
            or config.kv_heads != config.n_head or config.head_dim not in (None, config.n_embd // config.n_head) \
            or config.norm != "layernorm" or not config.tie_embeddings:
        raise ConfigError("export: only GPT-2-shaped gpt models (bias, LayerNorm, GELU, learned positions, MHA, "
                          "tied head) export to HF GPT-2")
    state = model.state_dict()
    block_names = {v: k for k, v in _BLOCK_KEYS.items()}
    global_names = {v: k for k, v in _GLOBAL_KEYS.items()}
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        if name.startswith("layers."):
            _, layer, leaf = name.split(".", 2)
            t = t[0]
            out[f"transformer.h.{layer}.{block_names[leaf]}"] = t.t() if t.dim() == 2 else t
        else:
            out[f"transformer.{global_names[name]}"] = t.squeeze(0) if name.startswith("ln_f") else t
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in out.items()}, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    hf = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": config.n_layer,
          "n_embd": config.n_embd, "n_head": config.n_head, "n_inner": config.ffn_hidden,
          "n_positions": config.block_size, "n_ctx": config.block_size, "vocab_size": config.vocab_size,
          "layer_norm_epsilon": config.norm_eps, "activation_function": "gelu_new", "tie_word_embeddings": True,
          "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    (path / CONFIG_FILE).write_text(json.dumps(hf, indent=2))
    return path
