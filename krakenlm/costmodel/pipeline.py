"""Pipeline parallelism: S stages of consecutive layers, each on its own T chips, fed M micro-batches.

Stage s holds l_s layers (the first L mod S stages one more than the others), stage 0 the embeddings,
the last stage the final norm, Kraken's conjunction and a copy of the (tied) LM head. Chips are
numbered stage-major, T per stage, so on a spec with nodes of c chips consecutive stages share a node
when T < c and sit in different nodes when T >= c.

A micro-batch of B/M sequences takes t_s on stage s (the estimator's composition for its l_s layers,
plus the LM head on the last stage), then x_s to send its activations to stage s+1: every chip sends
its 1/T share of tokens x width (width = n_embd, or N*d for Kraken's N streams) to its peer, over the
node fabric or, when the next stage is in another node, its NIC (collectives.p2p_time). The beat
tau = max_s max(t_s, x_s) is the slowest stage or transfer; sends overlap the next micro-batch.

    prefill (one forward of the batch):   T = sum_s t_s + sum_s x_s + (M - 1) * tau
        the first micro-batch crosses every stage, the other M - 1 follow one beat apart.
    decode (one step of the batch, steady state):   T = max(M * tau, sum_s (t_s + x_s))
        a micro-batch's next token needs its last one through every stage (the round trip), while
        every stage serves all M micro-batches per step: full when M >= S and the stages balance.
    bubble_s = T - M * max_s t_s: the time the busiest stage idles per forward; for prefill with equal
        stages and free transfers bubble_s / T = (S - 1) / (M + S - 1), the textbook bubble.

With S = 1 and M = 1 both are t_0: exactly the unpipelined estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

from krakenlm.errors import ConfigError

PHASES = ("prefill", "decode")
MAX_AUTO_MICROBATCHES = 1024  # largest micro-batch count the automatic choice tries


def _check_count(key: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{key}: must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class Pipeline:
    """Pipeline stages and micro-batches per phase (0 = the fastest divisor of that phase's batch)."""

    stages: int = 1
    prefill_microbatches: int = 0
    decode_microbatches: int = 0

    def __post_init__(self) -> None:
        _check_count("stages", self.stages, 1)
        _check_count("prefill_microbatches", self.prefill_microbatches, 0)
        _check_count("decode_microbatches", self.decode_microbatches, 0)

    def microbatches(self, phase: str) -> int:
        """The requested micro-batch count of ``phase`` (0 = automatic)."""
        return self.prefill_microbatches if phase == "prefill" else self.decode_microbatches

    def options(self, phase: str, batch: int) -> list[int]:
        """Micro-batch counts to evaluate for ``phase`` at ``batch`` sequences: the requested one, or
        every divisor of the batch (up to MAX_AUTO_MICROBATCHES) when automatic with several stages."""
        m = self.microbatches(phase)
        if m:
            if batch % m:
                raise ConfigError(f"microbatches: {m} {phase} micro-batches do not divide the {phase} batch of "
                                  f"{batch} sequences")
            return [m]
        if self.stages == 1:
            return [1]
        return [d for d in divisors(batch) if d <= MAX_AUTO_MICROBATCHES]


def divisors(n: int) -> list[int]:
    """Positive divisors of n, ascending (trial division up to sqrt(n))."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def stage_layers(n_layer: int, stages: int) -> list[int]:
    """Layers per stage: the first n_layer mod stages stages hold one more."""
    if stages > n_layer:
        raise ConfigError(f"stages: {stages} pipeline stages exceed the model's {n_layer} layers")
    base, extra = divmod(n_layer, stages)
    return [base + (1 if s < extra else 0) for s in range(stages)]


def crosses_node(stage: int, tp: int, chips_per_node: int) -> bool:
    """Whether stage ``stage`` sends to stage ``stage + 1`` over the network (different nodes)."""
    if not chips_per_node:
        return False
    return (stage + 1) * tp // chips_per_node != ((stage + 1) * tp - 1) // chips_per_node


def pipeline_time(phase: str, stage_s: list[float], p2p_s: list[float], microbatches: int) -> float:
    """Seconds for the phase (module docstring): ``stage_s`` per stage and ``p2p_s`` per boundary
    (len(stage_s) - 1 of them), for one micro-batch."""
    if phase not in PHASES:
        raise ConfigError(f"phase: must be one of {PHASES}, got {phase!r}")
    if len(p2p_s) != len(stage_s) - 1:
        raise ConfigError(f"pipeline: {len(stage_s)} stages need {len(stage_s) - 1} transfers, got {len(p2p_s)}")
    beat = max(max(stage_s), max(p2p_s, default=0.0))
    if phase == "prefill":
        return sum(stage_s) + sum(p2p_s) + (microbatches - 1) * beat
    return max(microbatches * beat, sum(stage_s) + sum(p2p_s))
