"""Export to a Hugging Face directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

Layouts (``format="hf"`` picks the first that computes exactly the model):

- gpt2: GPT-2-shaped gpt models as GPT2LMHeadModel (krakenlm.checkpoint.export_hf_gpt2);
- llama: gpt models with RMSNorm, RoPE, SwiGLU and no biases as LlamaForCausalLM;
- krakenlm (every architecture; ``format="hf-krakenlm"`` forces it): krakenlm's own weights, names and
  shapes unchanged (``layers.0.attn.qkv_weight`` keeps its leading sub-layer dimension; no
  ``lm_head.weight`` when the head is tied), with ``configuration_krakenlm.py`` and ``modeling_krakenlm.py``
  (hf_files/, self-contained: torch and transformers only) beside them; config.json names them in
  ``auto_map`` (load with ``trust_remote_code=True``) and holds krakenlm's whole ModelConfig under
  ``"krakenlm"``, plus the standard fields derived from it.

Every layout also gets tokenizer files (krakenlm.interop.hf_tokenizer) and generation_config.json. The
directory is written beside OUT and renamed into place; an existing OUT is replaced only if it is empty
or a previous export (its ``krakenlm-export.json`` lists every file in it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from krakenlm.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    _save_safetensors,
    check_state,
    export_hf_gpt2,
    gpt2_shaped,
    load_model,
    refuse_non_finite,
)
from krakenlm.config import ModelConfig
from krakenlm.errors import ConfigError
from krakenlm.hf_llama import llama_hf_config, llama_shaped, llama_state
from krakenlm.interop.hf_tokenizer import write_tokenizer
from krakenlm.model import Transformer
from krakenlm.validation import check_output_dir

FORMATS = ("hf", "hf-krakenlm")
MARKER_FILE = "krakenlm-export.json"
SHIPPED_DIR = Path(__file__).parent / "hf_files"
SHIPPED_FILES = ("configuration_krakenlm.py", "modeling_krakenlm.py")
AUTO_MAP = {"AutoConfig": "configuration_krakenlm.KrakenLMConfig",
            "AutoModelForCausalLM": "modeling_krakenlm.KrakenLMForCausalLM"}


@dataclass(frozen=True)
class Export:
    path: Path
    layout: str  # gpt2 | llama | krakenlm


def choose_layout(config: ModelConfig, format: str = "hf") -> str:
    """gpt2 or llama where that Hugging Face class computes exactly the model, krakenlm otherwise."""
    if format not in FORMATS:
        raise ConfigError(f"format: must be one of {FORMATS}, got {format!r}")
    if format == "hf" and gpt2_shaped(config):
        return "gpt2"
    if format == "hf" and llama_shaped(config):
        return "llama"
    return "krakenlm"


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, format: str = "hf",
                      tokenizer: str | None = None) -> Export:
    """Export any checkpoint krakenlm loads (native, HF GPT-2 / Llama, nanoGPT, the Kraken authors')."""
    out = _check_out(Path(out))
    return export_model(load_model(checkpoint), out, format=format, tokenizer=tokenizer, source=str(checkpoint))


def export_model(model: Transformer, out: str | Path, *, format: str = "hf", tokenizer: str | None = None,
                 source: str = "") -> Export:
    """Write a full (unsharded) model as a Hugging Face directory ``out``; ``tokenizer``: gpt2, bytes, a
    prepared data dir, none, or None for krakenlm's default for the vocabulary size."""
    config = model.config
    layout = choose_layout(config, format)
    state = model.state_dict()
    check_state(state, config, "export")  # e.g. heads padded at load time do not belong in a checkpoint
    refuse_non_finite(state, "export")
    out = _check_out(Path(out))
    with _staging(out) as tmp:
        dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
        if layout == "gpt2":  # first: it refuses a directory that already holds other files
            export_hf_gpt2(tmp, model)
            hf = json.loads((tmp / CONFIG_FILE).read_text())
        elif layout == "llama":
            _save_safetensors(llama_state(state, config), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
            hf = llama_hf_config(config)
        else:
            _save_safetensors(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
            hf = krakenlm_hf_config(config)
            for name in SHIPPED_FILES:
                shutil.copyfile(SHIPPED_DIR / name, tmp / name)
        eot = write_tokenizer(tokenizer, tmp, config.vocab_size, config.block_size)
        tokens = {} if eot is None else {"bos_token_id": eot, "eos_token_id": eot}
        hf |= tokens
        _write_json(tmp / CONFIG_FILE, hf | {"torch_dtype": dtype})
        _write_json(tmp / "generation_config.json", tokens and tokens | {"pad_token_id": eot})
        files = sorted(p.name for p in tmp.iterdir())
        _write_json(tmp / MARKER_FILE, {"layout": layout, "source": source, "files": files})
    return Export(out, layout)


def krakenlm_hf_config(config: ModelConfig) -> dict[str, Any]:
    """config.json of the krakenlm layout: the native config and the standard fields of one sub-layer."""
    return {"model_type": "krakenlm", "architectures": ["KrakenLMForCausalLM"], "auto_map": AUTO_MAP,
            "krakenlm": config.to_dict(), "vocab_size": config.vocab_size, "hidden_size": config.n_embd,
            "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
            "num_key_value_heads": config.kv_heads, "head_dim": config.head_size,
            "intermediate_size": config.ffn_size, "max_position_embeddings": config.block_size,
            "tie_word_embeddings": config.tie_embeddings, "use_cache": True,
            **({"rope_theta": config.rope_theta} if config.position == "rope" else {})}


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _check_out(out: Path) -> Path:
    """``out`` if writing there replaces nothing but an empty directory or a previous export."""
    if out.is_symlink():
        raise ConfigError(f"out: {out} is a symbolic link; give the directory itself")
    return check_output_dir(out, "out", lambda d: {p.name for p in d.iterdir()} <= _previous_export_files(d),
                            "export")


def _previous_export_files(out: Path) -> set[str]:
    """The files a previous export wrote to ``out`` (empty if it is not one)."""
    marker = out / MARKER_FILE
    if not marker.is_file() or marker.is_symlink():
        return set()
    with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, AttributeError):
        files = json.loads(marker.read_text()).get("files")
        if isinstance(files, list) and all(isinstance(f, str) for f in files):
            return {*files, MARKER_FILE}
    return set()


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh directory beside ``out``, renamed to ``out`` when the block finishes (removed if it fails)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old.{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
