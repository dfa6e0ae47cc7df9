"""The `krakenlm` model for EleutherAI's lm-evaluation-harness.

Any krakenlm checkpoint (native, Kraken authors', nanoGPT, HF GPT-2) is scored the way lm-eval's own
`hf` model scores a causal LM, so numbers are comparable with published lm-eval tables: the same
context/continuation split, the same left truncation to the block size (keep the last block_size
tokens of context + continuation), the same rolling windows, the same stop-sequence handling.

Every batch runs through krakenlm's Engine: on one device it runs in this process; with tp > 1 this
process (the one running lm-eval) is rank 0 and drives follower ranks in lockstep, so scores equal
the single-device ones.
"""

from __future__ import annotations

import sys
from typing import Any

import lm_eval.models  # noqa: F401  (registers lm-eval's own models before ours, see registry.get_model)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from krakenlm.dtypes import dtype_name, parse_dtype
from krakenlm.engine import Engine, EngineOptions
from krakenlm.errors import ConfigError, InputError
from krakenlm.generate import SamplingConfig, Stop
from krakenlm.source import ModelSource
from krakenlm.tokenizer import Tokenizer, default_tokenizer_for, load_tokenizer

DEFAULT_BATCH_SIZE = 8
MAX_GEN_TOKS = 256  # lm-eval's default for generate_until requests


def parse_model_dtype(name: str | torch.dtype) -> str:
    """krakenlm's and lm-eval's dtype names; lm-eval's 'auto' means the checkpoints' stored fp32."""
    return "fp32" if name == "auto" else dtype_name(parse_dtype(name))


def _int(value: int | str, field: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{field}: expected an integer, got {value!r}") from err


def parse_batch_size(value: int | str | None) -> int:
    """lm-eval passes ints, numeric strings or 'auto[:N]'; auto has no meaning here, so it means the default."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError as err:
        raise ConfigError(f"batch_size: expected a positive integer or 'auto', got {value!r}") from err
    if size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {size}")
    return size


def _pick_device(requested: str | None) -> str:
    """lm-eval's CLI asks for 'cuda' by default; like its hf model, fall back to the CPU when there is none."""
    if requested is None:
        return "auto"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        print(f"krakenlm: device {requested!r} is not available, using cpu", file=sys.stderr)
        return "cpu"
    return requested


# The lm-eval model class --------------------------------------------------------------------------------
@register_model("krakenlm")
class KrakenLM(TemplateLM):
    """lm-eval model over a krakenlm checkpoint.

    model_args: checkpoint=PATH (required; ``pretrained=PATH`` is the same, and is the key lm-eval names
    its output folder after), dtype=fp32|bf16|fp16|auto, batch_size=N, tp=N (tensor-parallel
    ranks spawned locally), tokenizer=gpt2|bytes|DATA_DIR (a prepared dir with its BPE; default: by
    vocabulary size), device=cpu|cuda, timeout=SECONDS (how long tensor-parallel ranks wait for each
    other). lm-eval also passes max_batch_size, which has no use here. `engine` (Python only) runs an
    already loaded model.
    """

    def __init__(self, checkpoint: str | None = None, dtype: str = "fp32", batch_size: int | str | None = None,
                 tp: int = 1, tokenizer: str | None = None, device: str | None = None, timeout: float = 1800.0,
                 max_batch_size: int | None = None, engine: Engine | None = None, pretrained: str | None = None,
                 **unused: Any) -> None:
        super().__init__()
        if pretrained is not None and checkpoint is not None and pretrained != checkpoint:
            raise ConfigError("krakenlm model_args: checkpoint and pretrained name the same thing; give one")
        checkpoint = checkpoint if checkpoint is not None else pretrained
        if unused:
            raise ConfigError(f"krakenlm model_args: unknown argument(s) {sorted(unused)}; known: checkpoint, "
                              "dtype, batch_size, tp, tokenizer, device, timeout")
        self.batch_size = parse_batch_size(batch_size)
        if engine is None:
            if not checkpoint:
                raise ConfigError("krakenlm model_args: checkpoint=PATH is required")
            options = EngineOptions(device=_pick_device(device), dtype=parse_model_dtype(dtype), tp=_int(tp, "tp"),
                                    timeout=float(timeout))
            engine = Engine.launch(ModelSource(checkpoint=str(checkpoint)), options)
        self.engine = engine
        self.config = engine.config
        self.checkpoint = checkpoint
        self.tp = engine.world
        self._rank, self._world_size = 0, 1
        self._device = engine.device
        self.tokenizer_id = str(tokenizer or default_tokenizer_for(self.config.vocab_size))
        try:
            self.tok: Tokenizer = load_tokenizer(self.tokenizer_id)
            if self.tok.vocab_size > self.config.vocab_size:
                raise ConfigError(f"tokenizer {self.tok.name!r} has {self.tok.vocab_size} tokens but the model only "
                                  f"{self.config.vocab_size}; pass the tokenizer the model was trained with")
        except BaseException:
            engine.close()  # do not leave tensor-parallel followers waiting
            raise

    # Facts lm-eval asks for ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_token

    @property
    def max_length(self) -> int:
        return self.config.block_size

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def get_model_info(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "tp": self.tp, "model_config": self.config.to_dict(),
                "model_num_parameters": self.config.num_params()}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string)

    def close(self) -> None:
        """Stop tensor-parallel followers (a no-op on one device)."""
        self.engine.close()

    # Scoring -------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Batches sorted longest first (as lm-eval's hf model does); results back in request order."""
        limit = self.max_length
        rows = []
        for _, context, target in requests:
            if not context or not target:
                raise InputError("loglikelihood: a request has an empty context or continuation after tokenization")
            if len(target) > limit:
                raise InputError(f"loglikelihood: a continuation of {len(target)} tokens does not fit the model's "
                                 f"context of {limit} tokens")
            rows.append(((context + target)[-(limit + 1):][:-1], target))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        bar = tqdm(total=len(rows), disable=disable_tqdm, desc="krakenlm loglikelihood")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            scores = self.engine.score([rows[i][0] for i in chunk], [rows[i][1] for i in chunk])
            for i, score in zip(chunk, scores, strict=True):
                results[i] = score
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood over disjoint windows of block_size tokens (lm-eval's scheme)."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for n, (text,) in enumerate(req.args for req in requests):
            for context, target in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[n] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Requests grouped by generation settings, batched longest first; output cut at the first stop string."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="krakenlm generate_until")
        eos = self.tok.decode([self.eot_token_id])
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            new_tokens = int(kwargs.pop("max_gen_toks"))
            sampling = self._sampling(kwargs)
            stop = Stop((self.eot_token_id,), tuple(s for s in until if s))
            max_context = self.max_length - new_tokens
            if max_context <= 0:
                raise ConfigError(f"generate_until: max_gen_toks={new_tokens} leaves no room for a context in "
                                  f"the model's {self.max_length} tokens")
            encoded = {i: self.tok_encode(requests[i].args[0])[-max_context:] for i in members}
            members = sorted(members, key=lambda i: -len(encoded[i]))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                contexts = [encoded[i] or [self.prefix_token_id] for i in chunk]
                outputs = self.engine.generate(contexts, new_tokens, sampling, stop, vocab_limit=self.tok.vocab_size,
                                               text=self.tok.decode).tokens
                for i, tokens in zip(chunk, outputs, strict=True):
                    results[i] = postprocess_generated_text(self.tok.decode(tokens), until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    @staticmethod
    def _sampling(kwargs: dict[str, Any]) -> SamplingConfig:
        if not kwargs.get("do_sample"):
            return SamplingConfig()
        return SamplingConfig(temperature=float(kwargs.get("temperature", 1.0)) or 1.0, top_k=kwargs.get("top_k"),
                              top_p=kwargs.get("top_p"), seed=int(kwargs.get("seed", 0)))
