"""The trainer: AdamW + warmup/cosine schedule, gradient accumulation, clipping, bf16 autocast,
optional torch.compile, DDP under torchrun, and checkpoints that make a killed run resumable exactly.

Run directory layout (``out``):

    checkpoints/step-000500/   a native model checkpoint (krakenlm.checkpoint.load_model reads it)
        config.json, model.safetensors    model (save_checkpoint)
        trainer.pt                        optimizer state + RNG states, tensors only (weights_only load)
        trainer_state.json                step, data position, the TrainConfig
        manifest.json                     sha256 of every file above; written last = completeness marker
    latest -> checkpoints/step-000500     symlink, replaced atomically after a checkpoint is complete
    metrics.jsonl, loss.png               one record per step (+ val loss at eval steps), the curve

A checkpoint is built in a hidden temp directory and renamed into place, then ``latest`` is swapped;
a kill at any moment leaves either the previous or the new checkpoint, never a partial one, and
the manifest check refuses a checkpoint whose files were damaged afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from krakenlm.checkpoint import (
    describe_error,
    fsync_dir,
    load_state,
    load_tensors,
    save_checkpoint,
    verify_manifest,
    write_manifest,
)
from krakenlm.choices import resolve as resolve_choices
from krakenlm.config import ModelConfig, dataclass_fields
from krakenlm.data import WindowSampler, load_tokens, read_meta
from krakenlm.dtypes import DTYPES, check_dtype
from krakenlm.errors import CheckpointError, ConfigError, TrainingError
from krakenlm.eval.perplexity import mean_cross_entropy
from krakenlm.model import Transformer
from krakenlm.model.params import lookup
from krakenlm.parallel.group import init_distributed, resolve_device
from krakenlm.preflight import check_training_memory
from krakenlm.resources import gib
from krakenlm.roofline import agreed_dtype
from krakenlm.validation import check_float, check_int, check_output_dir, holding

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TRAINER_TENSORS = "trainer.pt"
TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "train_config.json"
GROUP_TIMEOUT_S = 1800.0  # rendezvous and every collective: a lost rank fails the run instead of hanging it
# Peak dense FLOP/s per device for the MFU estimate when --peak-tflops is not given: one Sapphire
# Rapids core (AMX bf16 ~1.4 TFLOP/s measured, fp32 ~0.17) times threads; an H100 SXM on CUDA.
# Per-thread peak FLOP/s by the CPU's best matrix ISA: AMX measured on Sapphire Rapids; AVX-512 BF16
# nominal for Zen 5 at 4 GHz (two 512-bit pipes); AVX2 FMA nominal at 3 GHz (bf16 runs as fp32 there).
CPU_PEAK_PER_THREAD = {"amx_bf16": {"bf16": 1.4e12, "fp16": 1.4e12, "fp32": 0.17e12},
                       "avx512_bf16": {"bf16": 512e9, "fp16": 256e9, "fp32": 256e9},
                       "avx2": {"bf16": 96e9, "fp16": 96e9, "fp32": 96e9}}
CUDA_PEAK = {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}
# Fields that fix which windows each step sees; a resume must not change them.
DATA_LAYOUT_FIELDS = ("batch_size", "grad_accum", "block_size", "seed", "tokens_per_step")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run's result (and a few intervals that do not)."""

    data: str = ""
    out: str = ""
    steps: int = 1000
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    decay_steps: int | None = None  # cosine reaches lr * min_lr_ratio here; default: steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    batch_size: int = 8  # sequences per micro-step per rank
    grad_accum: int = 1  # micro-steps per optimizer step per rank
    tokens_per_step: int | None = None  # if set, grad_accum is derived from it and the world size
    block_size: int | None = None  # window length; default: the model's context
    dtype: str = "fp32"  # autocast dtype (or auto: the faster here; the CLI's default); weights stay fp32
    compile: bool = False
    seed: int = 0  # model init and data order
    eval_interval: int = 100
    eval_windows: int = 50
    checkpoint_interval: int = 500
    keep_checkpoints: int = 2
    peak_tflops: float | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_interval", "eval_windows", "checkpoint_interval",
                     "keep_checkpoints"):
            check_int(getattr(self, name), name)
        for name in ("warmup_steps", "seed"):
            check_int(getattr(self, name), name, minimum=0)
        for name in ("decay_steps", "tokens_per_step", "block_size"):
            check_int(getattr(self, name), name, optional=True)
        check_float(self.lr, "lr", minimum=0, exclusive=True)
        check_float(self.min_lr_ratio, "min_lr_ratio", minimum=0, maximum=1)
        check_float(self.weight_decay, "weight_decay", minimum=0)
        check_float(self.grad_clip, "grad_clip", minimum=0)
        for name in ("beta1", "beta2"):
            check_float(getattr(self, name), name, minimum=0, maximum=1)
            if getattr(self, name) == 1:
                raise ConfigError(f"{name}: must be < 1 (AdamW's moment would never decay), got 1")
        check_float(self.peak_tflops, "peak_tflops", minimum=0, exclusive=True, optional=True)
        object.__setattr__(self, "dtype", check_dtype(self.dtype))  # 'bfloat16' is 'bf16' from here on
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: must be auto, cpu or cuda, got {self.device!r}")
        for name in ("data", "out"):
            if isinstance(getattr(self, name), Path):
                object.__setattr__(self, name, str(getattr(self, name)))  # stored as JSON with the checkpoint
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name}: must be a path string, got {getattr(self, name)!r}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile: must be true or false, got {self.compile!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(**dataclass_fields(cls, data, "training config"))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def recipes() -> dict[str, dict[str, Any]]:
    """The paper's six training recipes (krakenlm/train/recipes.json), each with its model preset."""
    doc = json.loads(resources.files("krakenlm.train").joinpath("recipes.json").read_text())
    return {name: {"preset": name, **doc["common"], **fields} for name, fields in doc["recipes"].items()}


def get_recipe(name: str) -> dict[str, Any]:
    """Training fields of a named recipe plus its ``preset``."""
    table = recipes()
    if name not in table:
        raise ConfigError(f"recipe: unknown recipe {name!r}; available: {', '.join(table)}")
    return dict(table[name])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, cosine decay to lr*min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay = cfg.decay_steps or cfg.steps
    floor = cfg.lr * cfg.min_lr_ratio
    if step >= decay:
        return floor
    progress = (step - cfg.warmup_steps) / max(1, decay - cfg.warmup_steps)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices only (the paper's >=2-D rule), not norms, biases or gains.

    The rule is applied per sub-layer: a stacked LayerNorm weight [N, d] is N vectors, not a matrix.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = p.dim() - 1 if lookup(name)[0].stacked else p.dim()  # without the sub-layer dimension
        (decay if ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused into one kernel per step on CPU and CUDA.

    The unfused (foreach) AdamW makes ~10 passes over every fp32 parameter-sized tensor; the fused one
    makes one, which saved 0.13-0.25 s of a ~1.8 s bf16 Kraken-125M training step on a 2-core CPU.
    """
    params = param_groups(model, weight_decay)
    device = next(model.parameters()).device
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=1e-8, fused=fused)


# Checkpoint files ---------------------------------------------------------------------------------
def latest_checkpoint(out: str | Path) -> Path | None:
    """The checkpoint `out/latest` points to, or None if the run has none yet."""
    link = Path(out) / LATEST
    if not link.is_symlink():
        return None
    target = link.resolve()
    if not target.is_dir():
        raise CheckpointError(f"{link} points to {target}, which does not exist")
    return target


def resume_candidates(out: str | Path) -> list[Path]:
    """A run's checkpoints to resume from: the one `latest` names first, then the others newest first."""
    out = Path(out)
    link = out / LATEST
    first = [link.resolve()] if link.is_symlink() and link.resolve().is_dir() else []
    rest = sorted((out / CHECKPOINT_DIR).glob("step-*"), reverse=True) if (out / CHECKPOINT_DIR).is_dir() else []
    return first + [p for p in rest if p.resolve() not in first]


@dataclass
class Restored:
    """Everything a resumed run takes from one verified checkpoint."""

    path: Path
    state: dict[str, Any]  # trainer_state.json
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tensors: dict[str, Any]  # trainer.pt: optimizer and RNG states


def _read_state(path: Path) -> dict[str, Any]:
    verify_manifest(path, (TRAINER_STATE,), required=True)
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
        TrainConfig.from_dict(state["train_config"])
        if not all(isinstance(state[k], int) for k in ("step", "data_drawn", "world_size")):
            raise TypeError("step, data_drawn and world_size must be integers")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path / TRAINER_STATE}: unreadable ({describe_error(err)})") from err
    return state


def _read_checkpoint(path: Path) -> Restored:
    state = _read_state(path)
    verify_manifest(path, (TRAINER_TENSORS,), required=True)
    config, weights = load_state(path)  # verifies the model files
    tensors = load_tensors(path / TRAINER_TENSORS)
    if not (isinstance(tensors, dict) and {"optimizer", "rng"} <= set(tensors)):
        raise CheckpointError(f"{path / TRAINER_TENSORS}: not a krakenlm trainer state")
    return Restored(path, state, config, weights, tensors)


def restore_checkpoint(out: str | Path, announce: Callable[[str], None] = print) -> Restored | None:
    """The newest intact checkpoint of the run in `out` (None if it has none). A damaged newer one (bit flip,
    truncation, missing file) is skipped, and `announce` says which one and what is used instead."""
    problems: list[str] = []
    for path in resume_candidates(out):
        try:
            restored = _read_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if problems:
            announce(f"resume: skipped damaged checkpoint(s): {'; '.join(problems)}. Resuming from {path} "
                     f"(step {restored.state['step']}) instead")
        return restored
    if problems or (Path(out) / LATEST).is_symlink():
        reasons = "; ".join(problems) or f"{LATEST} points to nothing"
        raise CheckpointError(f"{out}: no intact checkpoint to resume from ({reasons})")
    return None


def stored_train_config(out: str | Path) -> dict[str, Any]:
    """The TrainConfig fields stored with the newest checkpoint whose state is intact ({} for a new run)."""
    for path in resume_candidates(out):
        with contextlib.suppress(CheckpointError):
            return _read_state(path)["train_config"]
    return {}


def _write_checkpoint(out: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                      sampler: WindowSampler, cfg: TrainConfig, extra: dict[str, Any], keep: int) -> Path:
    ckpt_root = out / CHECKPOINT_DIR
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_checkpoint(tmp, model, model.config, {"train_step": step})
        tensors = {"optimizer": optimizer.state_dict(),
                   "rng": {"torch": torch.get_rng_state(), "data": sampler.state()["generator"],
                           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
        torch.save(tensors, tmp / TRAINER_TENSORS)
        state = {"step": step, "data_drawn": sampler.drawn, "train_config": cfg.to_dict(), **extra}
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        write_manifest(tmp, {"step": step})
    except (OSError, RuntimeError, SafetensorError, CheckpointError) as err:  # disk full, quota, I/O error
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(ckpt_root).free
        raise TrainingError(f"step {step}: could not write the checkpoint to {ckpt_root} ({describe_error(err)}; "
                            f"{gib(free)} free there); the previous checkpoint is intact") from None
    if final.exists():  # left by a run killed between this rename and the `latest` swap
        shutil.rmtree(final)
    os.replace(tmp, final)
    link_tmp = out / f".{LATEST}.tmp-{os.getpid()}"
    link_tmp.unlink(missing_ok=True)
    os.symlink(final.relative_to(out), link_tmp)
    os.replace(link_tmp, out / LATEST)
    fsync_dir(out)
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _clean_temps(out: Path) -> None:
    """Remove what a killed run left half-written: only this trainer's own temp names (a run directory
    may also hold a user's hidden files, .git or .env, which are never touched)."""
    patterns = {out: (f".{LATEST}.tmp-*", f".{METRICS_FILE}.tmp"),
                out / CHECKPOINT_DIR: (".tmp-step-*", "..tmp-step-*")}
    for parent, globs in patterns.items():
        for item in (i for g in globs for i in parent.glob(g)):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)


# Metrics -----------------------------------------------------------------------------------------
def read_metrics(path: str | Path, upto: int | None = None) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (a torn last line from a kill is skipped), optionally step <= upto."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if upto is None or rec["step"] <= upto:
            records.append(rec)
    return records


def plot_losses(runs: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "",
                x: str = "step") -> None:
    """Loss curves of one or more runs in one PNG (matplotlib Agg, no display needed).

    Per run: train loss per step (thin line) and val loss at eval steps (dots); `x` is "step" or "tokens".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 1e6 if x == "tokens" else 1

    def xs(records: list[dict[str, Any]]) -> list[float]:
        return [r[x] / scale for r in records]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, records in runs.items():
        prefix = f"{name} " if name else ""
        line, = ax.plot(xs(records), [r["loss"] for r in records], lw=0.8, alpha=0.5, label=f"{prefix}train")
        val = [r for r in records if "val_loss" in r]
        if val:
            ax.plot(xs(val), [r["val_loss"] for r in val], "o-", ms=3, color=line.get_color(), label=f"{prefix}val")
    ax.set_xlabel("training tokens (M)" if x == "tokens" else "step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Distributed -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(requested: str) -> Dist:
    """torchrun / spawn environment (WORLD_SIZE > 1) -> process group, set up as the engine does it:
    cuda:LOCAL_RANK made current, NCCL when each local rank has a GPU (gloo otherwise), a loopback
    multi-node setup refused up front, rendezvous and collectives bounded by GROUP_TIMEOUT_S."""
    device = resolve_device(requested)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(0, 1, device, False)
    owns = init_distributed(GROUP_TIMEOUT_S, device)
    return Dist(dist.get_rank(), dist.get_world_size(), device, owns)


# The run -----------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    out: Path
    step: int
    loss: float
    val_loss: float | None
    checkpoint: Path | None
    config: TrainConfig


def _accum_for(cfg: TrainConfig, block: int, world: int) -> int:
    if cfg.tokens_per_step is None:
        return cfg.grad_accum
    per_micro = cfg.batch_size * block * world
    if cfg.tokens_per_step % per_micro:
        raise ConfigError(f"tokens_per_step={cfg.tokens_per_step} is not a multiple of batch_size*block*world "
                          f"= {per_micro}")
    return cfg.tokens_per_step // per_micro


def _peak_flops(cfg: TrainConfig, device: torch.device) -> float:
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda":
        return CUDA_PEAK[cfg.dtype]
    return cpu_peak_per_thread(cfg.dtype) * torch.get_num_threads()


def cpu_peak_per_thread(dtype: str) -> float:
    """The MFU denominator on CPU, from the ISA flags in /proc/cpuinfo (AVX2 if unreadable)."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    isa = next((name for name in ("amx_bf16", "avx512_bf16") if name in flags), "avx2")
    return CPU_PEAK_PER_THREAD[isa][dtype]


def _check_resume(stored: TrainConfig, cfg: TrainConfig, stored_world: int, world: int) -> None:
    changed = [f for f in DATA_LAYOUT_FIELDS if getattr(stored, f) != getattr(cfg, f)]
    if stored_world != world and cfg.tokens_per_step is None:
        changed.append(f"world size {stored_world} -> {world}")
    if changed:
        raise ConfigError(f"resume: the checkpoint was trained with different {changed}; resuming would not "
                          "continue the same run (start a new --out instead)")


class Trainer:
    """One training run on this process (one rank of a DDP job, or the only one)."""

    def __init__(self, cfg: TrainConfig, model_config: ModelConfig | None, ctx: Dist, *, resume: bool = False,
                 progress: bool = True) -> None:
        if not cfg.out or not cfg.data:
            raise ConfigError("train: both data (a prepared directory) and out (the run directory) are needed")
        self.out = check_output_dir(cfg.out, "out", holding(LATEST, CHECKPOINT_DIR, METRICS_FILE, RUN_CONFIG),
                                    "run directory")
        self.dist = ctx
        self.progress = progress and self.dist.is_main
        if not resume and (self.out / LATEST).is_symlink():
            raise ConfigError(f"{self.out} already holds a run; pass --resume to continue it or choose a new --out")
        restored = restore_checkpoint(self.out, self._announce) if resume else None
        if restored is not None:
            if model_config is not None and model_config.replace(name="") != restored.config.replace(name=""):
                raise ConfigError(f"resume: the model config differs from the checkpoint's ({restored.path})")
            model_config = restored.config
            _check_resume(TrainConfig.from_dict(restored.state["train_config"]), cfg, restored.state["world_size"],
                          self.dist.world)
        if model_config is None:
            raise ConfigError("train: no model given (use a preset, a config JSON or a recipe)")
        self.block = cfg.block_size or model_config.block_size
        self.model_config = model_config
        if self.block > model_config.block_size:
            raise ConfigError(f"block_size: {self.block} exceeds the model's context of {model_config.block_size}")
        meta = read_meta(cfg.data)
        if meta["vocab_size"] > model_config.vocab_size:
            raise ConfigError(f"vocab_size: data uses {meta['vocab_size']} token ids (tokenizer {meta['tokenizer']}), "
                              f"the model has only {model_config.vocab_size}")
        self.accum = _accum_for(cfg, self.block, self.dist.world)
        self.tokens_per_step = self.accum * cfg.batch_size * self.block * self.dist.world
        windows = self.accum * cfg.batch_size * (self.block + 1) * 8 + 8 * cfg.eval_windows  # int64 window starts
        # inputs and memory first: the dtype probe below takes minutes for a model that could never fit
        check_training_memory(model_config, cfg.batch_size, self.block, cfg.dtype, windows, self.dist.device)
        # 'auto': the faster of bf16 and fp32 for this model's GEMMs here; the checkpoint records the answer
        self.cfg = cfg = cfg.replace(dtype=agreed_dtype(cfg.dtype, model_config, self.dist.device,
                                                        tokens=cfg.batch_size * self.block,
                                                        distributed=self.dist.world > 1))
        self.autocast_dtype = None if cfg.dtype == "fp32" else DTYPES[cfg.dtype]

        self._build_model(model_config, restored)
        self.optimizer = make_optimizer(self.model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
        self.sampler = WindowSampler(load_tokens(cfg.data, "train"), self.block, cfg.batch_size, self.accum,
                                     self.dist.world, self.dist.rank, cfg.seed)
        self.val_tokens = load_tokens(cfg.data, "val")
        self.step = 0
        if restored is not None:
            self._restore(restored)
        self.resumed_from = None if restored is None else restored.path

        self.ddp = None
        forward: nn.Module = self.model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            cuda = self.dist.device.type == "cuda"
            forward = self.ddp = DistributedDataParallel(forward, device_ids=[self.dist.device] if cuda else None)
        self.forward = torch.compile(forward) if cfg.compile else forward
        self.peak = _peak_flops(cfg, self.dist.device) * self.dist.world
        self.params = model_config.num_params()

    def _progress_bar(self) -> Any:
        """The run's progress bar (None without progress), after a line naming the measured choices."""
        if not self.progress:
            return None
        from tqdm import tqdm

        self._announce(str(self.choices))
        return tqdm(total=self.cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    def _build_model(self, model_config: ModelConfig, restored: Restored | None) -> None:
        """The model on the device, restored or freshly initialised, running the forms measured fastest for
        the training step's shapes (krakenlm.choices; resolved once, here)."""
        cfg = self.cfg
        self.model = Transformer(model_config, init=False)
        if restored is not None:
            self.model.load_state_dict(restored.weights)
        else:
            self.model.reset_parameters(cfg.seed)
        self.model.to(self.dist.device).train()
        self.choices = resolve_choices(self.model, cfg.dtype, self.autocast_dtype or torch.float32, self.dist.device,
                                       sequences=cfg.batch_size, prompt=self.block, training=True)
        self.model.set_forms(self.choices.attention, self.choices.linear, self.choices.gelu)

    def _announce(self, message: str) -> None:
        if self.dist.is_main:
            print(message, file=sys.stderr, flush=True)

    def _restore(self, restored: Restored) -> None:
        """Optimizer, RNG and data position of a verified checkpoint (weights are loaded by the caller)."""
        try:
            self.optimizer.load_state_dict(restored.tensors["optimizer"])
            torch.set_rng_state(restored.tensors["rng"]["torch"])
            if restored.tensors["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(restored.tensors["rng"]["cuda"])
            self.sampler.load_state({"generator": restored.tensors["rng"]["data"],
                                     "drawn": restored.state["data_drawn"]})
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{restored.path / TRAINER_TENSORS}: does not fit this run "
                                  f"({describe_error(err)})") from err
        self.step = restored.state["step"]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over accum micro-batches; returns (mean loss over ranks, grad norm)."""
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = self.sampler.next_step()
        total = torch.zeros((), device=self.dist.device)
        for i, (x, y) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    logits = self.forward(x.to(self.dist.device))
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(self.dist.device).flatten()) / self.accum
                loss.backward()
            total += loss.detach()
        # max_norm=inf measures the norm without clipping (grad_clip 0 disables clipping)
        norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip or math.inf))
        if self.dist.world > 1:
            dist.all_reduce(total)  # SUM: gloo has no AVG
            total /= self.dist.world
        loss = float(total)
        if not (math.isfinite(loss) and math.isfinite(norm)):  # the same on every rank: gradients are all-reduced
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"step {self.step + 1}: the loss is {loss} and the gradient norm {norm}: training "
                                "diverged (try a lower --lr or --grad-clip); the weights were not updated")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, norm

    def evaluate(self) -> float:
        """Mean val cross-entropy on a fixed seeded window set (same windows at every eval)."""
        return mean_cross_entropy(self.model, self.val_tokens, block_size=self.block,
                                  num_windows=self.cfg.eval_windows, batch_size=self.cfg.batch_size,
                                  seed=self.cfg.seed + 1, autocast=self.autocast_dtype)

    def save(self) -> Path:
        return _write_checkpoint(self.out, self.step, self.model, self.optimizer, self.sampler, self.cfg,
                                 {"world_size": self.dist.world, "tokens_per_step": self.tokens_per_step},
                                 self.cfg.keep_checkpoints)

    def run(self) -> TrainResult:
        """Train from the current step to cfg.steps, logging, evaluating and checkpointing on the way."""
        main = self.dist.is_main
        metrics_path = self.out / METRICS_FILE
        records: list[dict[str, Any]] = []
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            _clean_temps(self.out)
            # A killed run may have logged steps past its last checkpoint: they are redone now.
            records = read_metrics(metrics_path, upto=self.step)
            text = "".join(json.dumps(r) + "\n" for r in records)
            tmp = metrics_path.with_name(f".{METRICS_FILE}.tmp")
            tmp.write_text(text)
            os.replace(tmp, metrics_path)
            (self.out / RUN_CONFIG).write_text(json.dumps(
                {"train": self.cfg.to_dict(), "model": self.model_config.to_dict(), "world_size": self.dist.world,
                 "grad_accum": self.accum, "tokens_per_step": self.tokens_per_step, "params": self.params}, indent=2))
        bar = self._progress_bar()
        loss, val_loss, ckpt = float("nan"), None, self.resumed_from
        try:
            with open(metrics_path, "a") if main else contextlib.nullcontext() as log:
                while self.step < self.cfg.steps:
                    start = time.perf_counter()
                    try:
                        loss, norm = self.train_step()
                    except TrainingError as err:
                        kept = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was written yet"
                        raise TrainingError(f"{err}; nothing was saved from it, {kept}") from None
                    if self.dist.device.type == "cuda":
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - start
                    tok_s = self.tokens_per_step / seconds
                    rec = {"step": self.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                           "grad_norm": norm, "tokens": self.step * self.tokens_per_step,
                           "tokens_per_s": tok_s, "mfu": 6 * self.params * tok_s / self.peak}
                    done = self.step == self.cfg.steps
                    if main and (self.step % self.cfg.eval_interval == 0 or done):
                        val_loss = self.evaluate()
                        rec |= {"val_loss": val_loss, "val_ppl": math.exp(val_loss)}
                    if main:
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                        records.append(rec)
                    if bar is not None:  # no forced refresh: tqdm throttles redraws of fast steps
                        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", mfu=f"{rec['mfu']:.1%}",
                                        refresh=False)
                        bar.update(1)
                    if main and (self.step % self.cfg.checkpoint_interval == 0 or done):
                        os.fsync(log.fileno())
                        ckpt = self.save()
                        plot_losses({"": records}, self.out / PLOT_FILE, f"{self.model_config.name or 'model'} "
                                    f"({self.model_config.arch}, {self.params / 1e6:.1f}M params)")
        finally:
            if bar is not None:
                bar.close()
        return TrainResult(self.out, self.step, loss, val_loss, ckpt, self.cfg)


def train(cfg: TrainConfig, model_config: ModelConfig | None = None, *, resume: bool = False,
          progress: bool = True) -> TrainResult:
    """Run (or, with resume, continue from out/latest) a training run; the library entry point."""
    ctx = _init_distributed(cfg.device)
    try:
        result = Trainer(cfg, model_config, ctx, resume=resume, progress=progress).run()
        if ctx.owns_group and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # every rank past its last collective before any tears gloo down (a rank that
            # tore down first once aborted its peer: "terminate called without an active exception")
        return result
    finally:
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()
