"""Many questions on one context: RULER-style tasks whose context is prefilled once and asked in turn.

A `MultiSample` is a document (a haystack holding several needles with distinct keys) and one
question per needle. The harness prefills the document once and asks the questions one after
another, each appended after the previous answer (`LSAEngine.ask`), so a later question can only
be answered from what the cache still holds after the earlier ones. Needles sit in separate
slices of the context (needle j of k somewhere in the j-th k-th, depths drawn per sample) and
the questions are asked in a shuffled order, so no position in the conversation favours a depth.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from .haystack import essay_sentences, insert_at_depths, noise_sentences
from .ruler import _MAKERS, prompt_target, sample_rng
from .samples import EvalDataError, PromptBuilder, fit_length

DOCUMENT_TEMPLATE = ("Some special magic {types} are hidden within the following text. Make sure to memorize it. "
                     "I will quiz you about the {types} afterwards.\n{context}")


@dataclass
class Question:
    """One question of a multi-question sample, with its reference answers."""

    question: str
    answer_prefix: str
    answers: list[str]
    depth: float                     # where its needle sits in the context, 0..1


@dataclass
class MultiSample:
    """A document and the questions asked about it in turn."""

    id: str
    task: str
    document: str
    questions: list[Question]
    metric: str                      # a scorer name in scoring.SCORERS
    max_new_tokens: int              # per answer
    target_length: int = 0
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def answers(self) -> list[str]:
        return [a for q in self.questions for a in q.answers]

    @property
    def depth(self) -> None:
        """Several needles: each question has its own depth."""
        return None

    def digest(self) -> str:
        """A short hash of everything that defines the sample (for the results cache)."""
        blob = json.dumps([self.document, [asdict(q) for q in self.questions], self.metric, self.max_new_tokens])
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class MultiNeedle:
    """`needles` needles "One of the special magic numbers for KEY is: VALUE.", each asked for in turn."""

    name: str
    needles: int
    max_new_tokens: int = 16
    haystack: str = "essay"
    key_kind: str = "words"
    value_kind: str = "number"

    def generate(self, builder: PromptBuilder, index: int, length: int, seed: int = 0) -> MultiSample:
        rng = sample_rng(seed, self.name, length, index)
        reserve = self.needles * (self.max_new_tokens + 40)  # the questions and answers that follow the document
        target = prompt_target(length - reserve, 0, builder.max_context)
        make_key, make_value = _MAKERS[self.key_kind], _MAKERS[self.value_kind]
        keys: list[str] = []
        while len(keys) < self.needles:
            k = make_key(rng)
            if k not in keys:
                keys.append(k)
        values = [make_value(rng) for _ in keys]
        depths = [(j + 0.1 + 0.8 * rng.random()) / self.needles for j in range(self.needles)]
        needles = [(d, f"One of the special magic {self.value_kind}s for {k} is: {v}.")
                   for d, k, v in zip(depths, keys, values)]
        kind = self.value_kind + "s"
        offset = rng.randrange(10 ** 9)

        def build(n: int):
            if self.haystack == "noise":
                sentences = noise_sentences(n)
            else:
                sentences = essay_sentences(builder.tokenizer, n, offset)
            return DOCUMENT_TEMPLATE.format(types=kind, context=insert_at_depths(sentences, needles)[0]), ""

        per_unit = {"noise": 5.0, "essay": 1.0}[self.haystack]
        n, document, _, got = fit_length(build, builder.count, target, int(target / per_unit), per_unit)
        if abs(got - target) > max(0.02 * target, 80):
            raise EvalDataError(f"{self.name}: could not fit the document to {target} tokens (got {got})")
        order = list(range(self.needles))
        rng.shuffle(order)
        questions = [Question(f"What is the special magic {self.value_kind} for {keys[j]} mentioned in the provided "
                              f"text?", f"The special magic {self.value_kind} for {keys[j]} is:", [values[j]],
                              depths[j]) for j in order]
        return MultiSample(f"{self.name}-{length}-s{seed}-{index}", self.name, document, questions, "all",
                           self.max_new_tokens, target, {"haystack": self.haystack})


MULTI_TASKS: dict[str, MultiNeedle] = {t.name: t for t in [
    MultiNeedle("mq_niah_2", 2),
    MultiNeedle("mq_niah_3", 3),
    MultiNeedle("mq_niah_4", 4),
    MultiNeedle("mq_niah_noise_3", 3, haystack="noise"),
]}


def generate_multi(task: str, builder: PromptBuilder, n_samples: int, length: int, seed: int = 0) -> list[MultiSample]:
    """`n_samples` samples of a multi-question task."""
    if task not in MULTI_TASKS:
        raise EvalDataError(f"unknown multi-question task {task!r}; choose from: {', '.join(MULTI_TASKS)}")
    return [MULTI_TASKS[task].generate(builder, i, length, seed) for i in range(n_samples)]
