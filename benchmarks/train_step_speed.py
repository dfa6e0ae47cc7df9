"""Single-device Kraken training step: krakenlm's stacked sub-layers vs the authors' structure.

krakenlm stores Kraken's N sub-layers as stacked weights [N, ...] and runs them as batched matmuls;
the authors' code (nanoGPT-derived) holds N separate sub-layer modules and calls them in a Python
loop. Both models here get the same weights and the same batch; the script first checks that they
give the same loss, then times full training steps (forward, loss, backward, clip, AdamW), interleaving
the implementations so machine noise hits all alike, in fp32 and with bf16 autocast:

- krakenlm: the stacked model with the trainer's optimizer (`make_optimizer`, fused AdamW);
- reference: the authors' structure with their optimizer (nanoGPT: fused AdamW on CUDA only);
- reference+fused: the authors' structure with krakenlm's optimizer, which isolates the model layout.

On CPU it also profiles one reference step and reports its GEMM time, the floor no layout can remove.

    python benchmarks/train_step_speed.py [--preset kraken-125m-2way] [--batch 4] [--seq 256] [--steps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from krakenlm.config import ModelConfig
from krakenlm.model import Transformer
from krakenlm.source import build_model
from krakenlm.train import make_optimizer


class RefBlock(nn.Module):
    """One sub-layer of one layer, laid out as in the authors' code (ln_1, attn, ln_2, mlp)."""

    def __init__(self, d: int, heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d, eps=eps, bias=False)
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.attn_proj = nn.Linear(d, d, bias=False)
        self.ln_2 = nn.LayerNorm(d, eps=eps, bias=False)
        self.c_fc = nn.Linear(d, hidden, bias=False)
        self.mlp_proj = nn.Linear(hidden, d, bias=False)

    def attention(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.attn_proj(out.transpose(1, 2).reshape(b, t, d))

    def ffn(self, x: Tensor) -> Tensor:
        return self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class ReferenceKraken(nn.Module):
    """The paper's forward pass with h[i][l] = sub-layer i of layer l, called one by one."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, n = cfg.n_embd, cfg.n_sub
        self.wte = nn.Embedding(cfg.vocab_size, d)
        self.wpe = nn.Embedding(cfg.block_size, d)
        self.h = nn.ModuleList(
            nn.ModuleList(RefBlock(d, cfg.n_head, cfg.ffn_size, cfg.norm_eps) for _ in range(cfg.n_layer))
            for _ in range(n))
        self.conjunction = nn.Linear(n * d, d, bias=False)
        self.ln_f = nn.LayerNorm(d, eps=cfg.norm_eps, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        subs = range(len(self.h))
        ys = []
        for i in subs:  # layer 0: plain pre-LN blocks on the shared embedding
            a = x + self.h[i][0].attention(x)
            ys.append(a + self.h[i][0].ffn(a))
        for layer in range(1, len(self.h[0])):
            total = sum(ys)  # the AllReduce of the previous layer's outputs
            new = []
            for i in subs:
                block = self.h[i][layer]
                h = block.attention(ys[i])
                new.append(ys[i] + h + block.ffn(h + total))
            ys = new
        z = self.ln_f(self.conjunction(torch.cat(ys, dim=-1)))
        return F.linear(z, self.wte.weight)

    @torch.no_grad()
    def load_from(self, model: Transformer) -> ReferenceKraken:
        """Copy krakenlm's stacked weights into the per-sub-layer modules (slice index i of each)."""
        self.wte.weight.copy_(model.wte.weight)
        self.wpe.weight.copy_(model.wpe.weight)
        self.conjunction.weight.copy_(model.conj_weight)
        self.ln_f.weight.copy_(model.ln_f.weight[0])
        pairs = {"ln_1": "ln1", "c_attn": "attn.qkv", "attn_proj": "attn.proj", "ln_2": "ln2", "c_fc": "mlp.up",
                 "mlp_proj": "mlp.down"}
        state = model.state_dict()
        for i, blocks in enumerate(self.h):
            for layer, block in enumerate(blocks):
                for ref, native in pairs.items():
                    name = f"layers.{layer}.{native}" + ("_weight" if "." in native else ".weight")
                    getattr(block, ref).weight.copy_(state[name][i])
        return self


def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())


def nanogpt_optimizer(model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """The authors' (nanoGPT's) optimizer: decay on >=2-D tensors, fused AdamW only on CUDA."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")


def fused_optimizer(model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """The reference structure with krakenlm's optimizer: isolates what the model layout alone buys."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)


def make_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, autocast: torch.dtype | None,
              device: torch.device) -> Callable[[], float]:
    """A closure running one training step (forward, backward, clip, AdamW) and returning its seconds."""

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        cast = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with cast:
            logits = model(x)
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul")


def gemm_seconds(step: Callable[[], float]) -> tuple[float, float]:
    """(GEMM seconds, step seconds) of one profiled step: the GEMMs are a floor no layout can remove."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        total = step()
    gemm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS) / 1e6
    return gemm, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="kraken-125m-2way")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per implementation and dtype")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)

    ours = build_model(preset=args.preset, seed=0).to(device).train()
    cfg = ours.config
    ref = ReferenceKraken(cfg).to(device).load_from(ours).train()
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
    x, y = batch[:, :-1], batch[:, 1:]
    with torch.no_grad():
        ours_loss, ref_loss = float(loss_of(ours, x, y)), float(loss_of(ref, x, y))
    print(f"{args.preset}: {cfg.num_params() / 1e6:.2f}M params, batch {args.batch}x{args.seq}, device {device}, "
          f"threads {torch.get_num_threads()}")
    print(f"fp32 loss, same weights and batch: krakenlm {ours_loss:.6f}  reference {ref_loss:.6f}  "
          f"|diff| {abs(ours_loss - ref_loss):.2e}")
    if abs(ours_loss - ref_loss) > 1e-4:
        raise SystemExit("the two implementations disagree: the timing would compare different models")

    results = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "device": str(device),
               "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "loss": {"krakenlm": ours_loss, "reference": ref_loss}, "dtypes": {}}
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    for name in args.dtypes.split(","):
        # ours and the reference each own their weights; the two reference optimizers share the reference's
        # weights, which is harmless for timing (the loss check above ran before any step)
        steps = {
            "krakenlm": make_step(ours, make_optimizer(ours, 1e-4, (0.9, 0.95), 0.1), x, y, dtypes[name], device),
            "reference": make_step(ref, nanogpt_optimizer(ref, device), x, y, dtypes[name], device),
            "reference+fused": make_step(ref, fused_optimizer(ref, device), x, y, dtypes[name], device),
        }
        for step in steps.values():  # warm-up: allocator, kernels, optimizer state
            step()
        times: dict[str, list[float]] = {k: [] for k in steps}
        for rep in range(args.steps):
            order = list(steps) if rep % 2 == 0 else list(reversed(steps))
            for impl in order:
                times[impl].append(steps[impl]())
        med = {k: statistics.median(v) for k, v in times.items()}
        ratios = {k: statistics.median(r / o for r, o in zip(times[k], times["krakenlm"], strict=True))
                  for k in ("reference", "reference+fused")}
        gemm, profiled = gemm_seconds(steps["reference"]) if device.type == "cpu" else (float("nan"), float("nan"))
        results["dtypes"][name] = {"seconds": times, "median": med, "speedup": ratios["reference"],
                                   "speedup_same_optimizer": ratios["reference+fused"],
                                   "reference_gemm_seconds": gemm, "reference_profiled_step": profiled}
        print(f"{name}: " + "   ".join(f"{k} {v * 1e3:.0f} ms" for k, v in med.items())
              + f"   speedup x{ratios['reference']:.2f} (same optimizer x{ratios['reference+fused']:.2f})")
        if device.type == "cpu":
            print(f"  reference step profiled: GEMMs {gemm * 1e3:.0f} of {profiled * 1e3:.0f} ms; a layout that "
                  f"removed all other work would be at most x{med['reference'] / gemm:.2f} faster")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
