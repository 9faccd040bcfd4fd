"""What one evaluation sample is, and how its prompt becomes the backbone's tokens."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Callable


class EvalDataError(ValueError):
    """A data file that is missing, malformed, or asks for something the harness cannot do."""


@dataclass
class Sample:
    """One prompt with its reference answers.

    `input` is the user message; `answer_prefix` is appended after the chat template's assistant
    header (RULER's answer prefix), so the model's first tokens are the answer itself.
    `depth` is where the (first queried) needle sits in the context, 0..1 (None when it does not
    apply); `target_length` is the prompt length aimed for, in the backbone's tokens.
    """

    id: str
    task: str
    input: str
    answers: list[str]
    metric: str                      # a scorer name in scoring.SCORERS
    max_new_tokens: int
    question: str = ""
    answer_prefix: str = ""
    depth: float | None = None
    target_length: int = 0
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        """A short hash of everything that defines the sample (for the results cache)."""
        blob = json.dumps([self.input, self.answer_prefix, self.answers, self.metric, self.max_new_tokens])
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


class PromptBuilder:
    """Turns (user text, answer prefix) into token ids exactly as the harness feeds the engine.

    Mirrors `LSAEngine.encode(text, chat)` followed by the prefix's tokens, so generators can
    measure lengths with the tokenizer alone.
    """

    def __init__(self, tokenizer, chat: bool = True, max_context: int = 0):
        if chat and not getattr(tokenizer, "chat_template", None):
            raise EvalDataError("this model has no chat template; run without --chat")
        self.tokenizer = tokenizer
        self.chat = chat
        self.max_context = max_context

    def text_ids(self, text: str) -> list[int]:
        """The user message as ids (inside the chat template when `chat`)."""
        tok = self.tokenizer
        if self.chat:
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        return list(tok(text, add_special_tokens=True)["input_ids"])

    def prefix_ids(self, prefix: str) -> list[int]:
        """The answer prefix as ids, no special tokens (it continues the assistant turn)."""
        return list(self.tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else []

    def ids(self, text: str, prefix: str = "") -> list[int]:
        """The whole prompt: user message then answer prefix."""
        return self.text_ids(text) + self.prefix_ids(prefix)

    def count(self, text: str, prefix: str = "") -> int:
        """Prompt length in the backbone's tokens."""
        return len(self.ids(text, prefix))

    def sample_ids(self, sample: Sample) -> list[int]:
        """The ids the harness prefills for `sample`."""
        return self.ids(sample.input, sample.answer_prefix)


def fit_length(build: Callable[[int], tuple[str, str]], count: Callable[[str, str], int], target: int,
               n0: int, tokens_per_unit: float, tolerance: float = 0.005,
               max_iter: int = 8, cap: int | None = None) -> tuple[int, str, str, int]:
    """Find the size `n` (in haystack units) whose prompt is closest to `target` tokens.

    `build(n)` returns (text, prefix); `count` measures it. Newton-like steps on n, keeping the
    best seen. A prompt longer than `cap` tokens (the model's context less the answer) is never
    chosen: if every size tried overshoots it, the haystack shrinks until one fits. Returns
    (n, text, prefix, tokens).
    """
    best: tuple[int, int, str, str] | None = None  # (abs error, n, text, prefix)
    seen: dict[int, int] = {}
    slope = max(tokens_per_unit, 1e-6)
    n = max(0, int(n0))
    for _ in range(max_iter):
        if n in seen:
            break
        text, prefix = build(n)
        got = count(text, prefix)
        if seen:  # secant: learn tokens per unit from the last two sizes tried
            last_n = next(reversed(seen))
            if n != last_n and got != seen[last_n]:
                slope = max((got - seen[last_n]) / (n - last_n), 1e-6)
        seen[n] = got
        err = abs(got - target)
        fits = cap is None or got <= cap
        if fits and (best is None or err < best[0]):
            best = (err, n, text, prefix)
        if fits and err <= tolerance * target:
            break
        step = (target - got) / slope
        n = max(0, n + (int(round(step)) or (1 if target > got else -1)))
    while best is None:  # every size tried overshoots the cap
        n = min(seen)
        if n == 0:
            raise EvalDataError(f"even an empty haystack gives a {seen[0]}-token prompt, over the {cap} allowed")
        n = max(0, n - max(1, math.ceil((seen[n] - cap) / slope)))
        text, prefix = build(n)
        seen[n] = got = count(text, prefix)
        if got <= cap:
            best = (abs(got - target), n, text, prefix)
    err, n, text, prefix = best
    return n, text, prefix, seen[n]
