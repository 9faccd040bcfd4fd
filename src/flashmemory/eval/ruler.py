"""RULER-style synthetic tasks, generated locally from a seed.

Families (one small class each): needle-in-a-haystack (single / multi-key / multi-value /
multi-query), variable tracking, common-words and frequent-words extraction. Every sample's
prompt length is fitted in the backbone's own tokens; needle depths are spread over the
context: sample i of n sits at depth (i + 0.5) / n. Scoring follows RULER: the share of
reference strings found in the prediction ("all"), or whether any is found ("part").
"""

from __future__ import annotations

import hashlib
import random
import string
import uuid
from dataclasses import dataclass

from .haystack import essay_sentences, insert_at_depths, noise_sentences, vocabulary
from .samples import EvalDataError, PromptBuilder, Sample, fit_length

NIAH_TEMPLATE = ("Some special magic {types} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {types} afterwards.\n{context}\n{question}")


def sample_rng(seed: int, task: str, length: int, index: int) -> random.Random:
    """A generator that depends only on (seed, task, length, index): stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}:{task}:{length}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def spread_depth(index: int, n_samples: int) -> float:
    """Depth of sample `index` of `n_samples`: evenly spread, never exactly at an edge."""
    return (index + 0.5) / max(1, n_samples)


def prompt_target(length: int, max_new_tokens: int, max_context: int, tau: int = 64) -> int:
    """Prompt tokens for a task of total `length` (RULER counts the generated tokens in it).

    Near the model's context the prompt also leaves room for `tau` tokens of lookahead (oracle).
    """
    target = length - max_new_tokens
    if max_context:
        target = min(target, max_context - max_new_tokens - tau)
    if target < 128:
        raise EvalDataError(f"--length {length} is too short for a synthetic task (need at least "
                            f"{128 + max_new_tokens} tokens)")
    return target


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _word_key(rng: random.Random) -> str:
    vocab = vocabulary()
    return f"{rng.choice(vocab)}-{rng.choice(vocab)}"


_MAKERS = {"number": _number, "uuid": _uuid, "words": _word_key}


@dataclass(frozen=True)
class RulerTask:
    """Base: a named task that can make sample `index` of `n_samples` at a total `length`."""

    name: str
    max_new_tokens: int

    def generate(self, builder: PromptBuilder, index: int, n_samples: int, length: int, seed: int = 0) -> Sample:
        raise NotImplementedError

    def _fit(self, builder: PromptBuilder, target: int, build, n0: int, tokens_per_unit: float):
        cap = builder.max_context - self.max_new_tokens if builder.max_context else None
        n, text, prefix, got = fit_length(build, builder.count, target, n0, tokens_per_unit, cap=cap)
        # a haystack of whole needles (~20-60 tokens each) cannot always land within 2% of a short target
        if abs(got - target) > max(0.02 * target, 80):
            raise EvalDataError(f"{self.name}: could not fit the prompt to {target} tokens (got {got})")
        return n, text, prefix


@dataclass(frozen=True)
class Needle(RulerTask):
    """Needle in a haystack. Needles read "One of the special magic numbers for KEY is: VALUE."

    haystack: "noise" (repeated sentences), "essay" (Paul Graham essays) or "needle" (the
    haystack is made of distractor needles). `keys` needles with distinct keys are placed;
    the first `queries` of them are asked for, each with `values` values.
    """

    haystack: str = "essay"
    key_kind: str = "words"
    value_kind: str = "number"
    keys: int = 1
    values: int = 1
    queries: int = 1

    def _needle(self, key: str, value: str) -> str:
        return f"One of the special magic {self.value_kind}s for {key} is: {value}."

    def generate(self, builder: PromptBuilder, index: int, n_samples: int, length: int, seed: int = 0) -> Sample:
        rng = sample_rng(seed, self.name, length, index)
        target = prompt_target(length, self.max_new_tokens, builder.max_context)
        depth = spread_depth(index, n_samples)
        make_key, make_value = _MAKERS[self.key_kind], _MAKERS[self.value_kind]
        keys: list[str] = []
        while len(keys) < max(self.keys, self.queries):
            k = make_key(rng)
            if k not in keys:
                keys.append(k)
        values = {k: [make_value(rng) for _ in range(self.values)] for k in keys}
        queried = keys[: self.queries]
        # the first queried needle sits at the sample's depth; every other one at a random depth
        needles = [(depth if (k == queried[0] and j == 0) else rng.random(), self._needle(k, v))
                   for k in keys for j, v in enumerate(values[k])]
        offset = rng.randrange(10 ** 9)
        distractors = [self._needle(make_key(rng), make_value(rng)) for _ in range(target // 8)]
        kind = self.value_kind + "s"
        if self.queries == 1 and self.values == 1:
            question = f"What is the special magic {self.value_kind} for {queried[0]} mentioned in the provided text?"
            # RULER primes "... mentioned in the provided text is"; echoing the needle's own wording
            # makes small models answer at once instead of restating the question first
            prefix = f"The special magic {self.value_kind} for {queried[0]} is:"
        else:
            names = ", ".join(queried)
            question = f"What are all the special magic {kind} for {names} mentioned in the provided text?"
            prefix = f"The special magic {kind} for {names} are:"

        made: dict[int, tuple[str, list[int]]] = {}

        def build(n: int):
            if self.haystack == "noise":
                sentences = noise_sentences(n)
            elif self.haystack == "essay":
                sentences = essay_sentences(builder.tokenizer, n, offset)
            else:
                sentences = distractors[:n]
            context, offs = made[n] = insert_at_depths(sentences, needles)
            return NIAH_TEMPLATE.format(types=kind, context=context, question=question), prefix

        overhead = builder.count(NIAH_TEMPLATE.format(types=kind, context=" ".join(n for _, n in needles),
                                                      question=question), prefix)
        per_unit = {"noise": 5.0, "essay": 1.0, "needle": 22.0}[self.haystack]
        n, text, prefix = self._fit(builder, target, build, int((target - overhead) / per_unit), per_unit)
        context, offsets = made[n]
        start = text.index(context)
        answers = [v for k in queried for v in values[k]]
        return Sample(id=f"{self.name}-{length}-s{seed}-{index}", task=self.name, input=text, answers=answers,
                      metric="all", max_new_tokens=self.max_new_tokens, question=question, answer_prefix=prefix,
                      depth=depth, target_length=target,
                      meta={"context_span": [start, start + len(context)],
                            "needle_offset": start + offsets[0], "haystack": self.haystack})


@dataclass(frozen=True)
class VariableTracking(RulerTask):
    """A chain VAR A = 12345, VAR B = VAR A, ... hidden in noise; name every variable holding the value."""

    hops: int = 4

    def generate(self, builder: PromptBuilder, index: int, n_samples: int, length: int, seed: int = 0) -> Sample:
        rng = sample_rng(seed, self.name, length, index)
        target = prompt_target(length, self.max_new_tokens, builder.max_context)
        depth = spread_depth(index, n_samples)
        names: list[str] = []
        while len(names) < self.hops + 1:
            name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if name not in names:
                names.append(name)
        value = str(rng.randint(10_000, 99_999))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
        needles = [(depth, chain[0])] + [(rng.random(), s) for s in chain[1:]]
        question = f"Question: Find all variables that are assigned the value {value} in the text above."
        prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} "
                  f"variables are assigned the value {value}, they are:")
        template = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                    "{context}\n{question}")

        made: dict[int, tuple[str, list[int]]] = {}

        def build(n: int):
            context, _ = made[n] = insert_at_depths(noise_sentences(n), needles)
            return template.format(context=context, question=question), prefix

        overhead = builder.count(template.format(context=" ".join(chain), question=question), prefix)
        n, text, prefix = self._fit(builder, target, build, int((target - overhead) / 5), 5.0)
        context, offsets = made[n]
        start = text.index(context)
        return Sample(id=f"{self.name}-{length}-s{seed}-{index}", task=self.name, input=text, answers=names,
                      metric="all", max_new_tokens=self.max_new_tokens, question=question, answer_prefix=prefix,
                      depth=depth, target_length=target,
                      meta={"context_span": [start, start + len(context)],
                            "needle_offset": start + offsets[0], "haystack": "noise"})


@dataclass(frozen=True)
class CommonWords(RulerTask):
    """A numbered word list: `top` words repeat often, the rest a few times; name the most common."""

    top: int = 10
    freq_common: int = 30
    freq_rare: int = 3

    def generate(self, builder: PromptBuilder, index: int, n_samples: int, length: int, seed: int = 0) -> Sample:
        rng = sample_rng(seed, self.name, length, index)
        target = prompt_target(length, self.max_new_tokens, builder.max_context)
        words = list(vocabulary())
        rng.shuffle(words)
        common, rare_pool = words[: self.top], words[self.top:]
        # short contexts: common words may take at most about half of the list (RULER lowers it too)
        freq = max(self.freq_rare + 2, min(self.freq_common, target // (2 * 4 * self.top)))
        order_seed = rng.randrange(2 ** 31)
        question = f"Question: What are the {self.top} most common words in the above list?"
        prefix = f"Answer: The top {self.top} words that appear most often in the list are:"
        template = ("Below is a numbered list of words. In these words, some appear more often than others. "
                    "Memorize the ones that appear most often.\n{context}\n{question}")

        def build(n: int):
            if n > len(rare_pool):
                raise EvalDataError(f"{self.name}: the vocabulary is too small for {length} tokens")
            items = common * freq + rare_pool[:n] * self.freq_rare
            random.Random(order_seed).shuffle(items)
            context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
            return template.format(context=context, question=question), prefix

        overhead = builder.count(template.format(context=" ".join(f"{i}. {w}" for i, w in enumerate(common * freq)),
                                                 question=question), prefix)
        per_unit = 4.0 * self.freq_rare
        _, text, prefix = self._fit(builder, target, build, int((target - overhead) / per_unit), per_unit)
        return Sample(id=f"{self.name}-{length}-s{seed}-{index}", task=self.name, input=text, answers=common,
                      metric="all", max_new_tokens=self.max_new_tokens, question=question, answer_prefix=prefix,
                      depth=None, target_length=target, meta={"freq_common": freq, "freq_rare": self.freq_rare})


@dataclass(frozen=True)
class FrequentWords(RulerTask):
    """Coded text of random words with Zipf-like counts (rank r appears ~c/r^alpha times): name the top 3."""

    top: int = 3
    alpha: float = 2.0

    def generate(self, builder: PromptBuilder, index: int, n_samples: int, length: int, seed: int = 0) -> Sample:
        rng = sample_rng(seed, self.name, length, index)
        target = prompt_target(length, self.max_new_tokens, builder.max_context)
        coded: list[str] = []
        seen: set[str] = set()
        while len(coded) < target:  # more than enough distinct coded words
            w = "".join(rng.choice(string.ascii_lowercase) for _ in range(5))
            if w not in seen:
                seen.add(w)
                coded.append(w)
        order_seed = rng.randrange(2 ** 31)
        question = ("Question: Do not provide any explanation. What are the three most frequently appeared "
                    "words in the above coded text?")
        prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
        template = ("Read the following coded text and track the frequency of each coded word. Find the three "
                    "most frequently appeared coded words.\n{context}\n{question}")

        def counts(n: int) -> list[int]:
            head = max(18, n // 6)  # >= 18 keeps the top three strictly apart from the rest
            out = []
            for r in range(1, len(coded) + 1):
                c = int(head / r ** self.alpha)
                if c < 2 or sum(out) + c > n:
                    break
                out.append(c)
            return out + [1] * max(0, n - sum(out))

        def build(n: int):
            items = [w for w, c in zip(coded, counts(n)) for _ in range(c)]
            random.Random(order_seed).shuffle(items)
            return template.format(context=" ".join(items), question=question), prefix

        overhead = builder.count(template.format(context="", question=question), prefix)
        _, text, prefix = self._fit(builder, target, build, int((target - overhead) / 3), 3.0)
        return Sample(id=f"{self.name}-{length}-s{seed}-{index}", task=self.name, input=text,
                      answers=coded[: self.top], metric="all", max_new_tokens=self.max_new_tokens,
                      question=question, answer_prefix=prefix, depth=None, target_length=target)


RULER_TASKS: dict[str, RulerTask] = {t.name: t for t in [
    Needle("niah_single_1", 16, haystack="noise"),
    Needle("niah_single_2", 16, haystack="essay"),
    Needle("niah_single_3", 40, haystack="essay", value_kind="uuid"),
    Needle("niah_multikey_1", 16, haystack="essay", keys=4),
    Needle("niah_multikey_2", 16, haystack="needle"),
    Needle("niah_multikey_3", 40, haystack="needle", key_kind="uuid", value_kind="uuid"),
    Needle("niah_multivalue", 48, haystack="essay", values=4),
    Needle("niah_multiquery", 48, haystack="essay", keys=4, queries=4),
    VariableTracking("vt", 32),
    CommonWords("cwe", 64),
    FrequentWords("fwe", 32),
]}


def generate_samples(task: str, builder: PromptBuilder, n_samples: int, length: int, seed: int = 0) -> list[Sample]:
    """`n_samples` samples of a RULER-style task, depths spread over the context."""
    if task not in RULER_TASKS:
        raise EvalDataError(f"unknown synthetic task {task!r}; choose from: {', '.join(RULER_TASKS)}")
    spec = RULER_TASKS[task]
    return [spec.generate(builder, i, n_samples, length, seed) for i in range(n_samples)]
