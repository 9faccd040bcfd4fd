"""Generation options and token sampling: greedy, or seeded temperature / top-k / top-p."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class GenerationOptionsError(ValueError):
    """A generation option that cannot work."""


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens and when it stops.

    temperature 0 is greedy (top_k and top_p are then unused). A sampled sequence with a
    `seed` draws the same tokens on every run, alone or in a batch. Stop strings end the
    text before their first occurrence (they are not part of the output).
    """

    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy; otherwise sample at this temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling: keep the smallest set of tokens "
                                                        "whose probability reaches this"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens (0: all)"})
    seed: int | None = field(default=None, metadata={"help": "seed of the sampler (reproducible sampling)"})
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        def bad(msg: str) -> GenerationOptionsError:
            return GenerationOptionsError(msg)

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or \
                not (0.0 <= self.temperature <= 100.0):
            raise bad(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad(f"seed must be an integer, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise bad(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator | None:
        """A fresh generator for one sequence (None when greedy)."""
        if self.greedy:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from next-token logits [vocab]."""
    if params.greedy:
        return int(logits.argmax())
    logits = logits.float().cpu() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, 0) - sorted_p
        sorted_p = sorted_p.masked_fill(before >= params.top_p, 0.0)  # keep tokens until the mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))
