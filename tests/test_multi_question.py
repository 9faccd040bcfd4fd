"""The mechanism on the real default model: an eviction policy forgets what its first question did not need.

A 2K-token essay holds two facts (RULER needles). Question 1 asks for fact A; question 2, appended
after answer 1, asks for fact B. At a 20% budget snapkv keeps the pages the first question attends
to, so it answers question 1, but fact B's page was dropped at that decision and question 2 fails;
lsa re-selects every cycle and answers both. Also: the multi-question harness on that sample.
"""

from __future__ import annotations

import pytest

from flashmemory import LSAConfig, LSAEngine, context_ids
from flashmemory.eval.harness import EvalSettings, evaluate
from flashmemory.eval.multi import MULTI_TASKS, generate_multi
from flashmemory.eval.report import position_rows
from flashmemory.eval.samples import PromptBuilder

BUDGET = 0.2


@pytest.fixture(scope="module")
def conversation(backbone):
    sample = generate_multi("mq_niah_2", PromptBuilder(backbone.tokenizer, max_context=backbone.max_context), 1,
                            2000)[0]
    engine = LSAEngine(backbone, LSAConfig(budget=BUDGET))
    prefill = engine.prefill(context_ids(engine, sample.document, chat=True), max_new_tokens=12)
    yield engine, sample, prefill
    engine.close()


def _page_of(engine, ids: list[int], value: str) -> int:
    needle = engine.tokenizer(" " + value, add_special_tokens=False)["input_ids"]
    hits = [i for i in range(len(ids) - len(needle)) if ids[i:i + len(needle)] == needle]
    assert len(hits) == 1
    return hits[0] // engine.config.page_size


def _ask_both(engine, prefill, sample, policy):
    a, b = sample.questions
    first = engine.ask(prefill, a.question, policy, chat=True, answer_prefix=a.answer_prefix, max_new_tokens=12)
    second = engine.ask(first, b.question, chat=True, answer_prefix=b.answer_prefix, max_new_tokens=12)
    return first, second


def test_snapkv_answers_the_first_question_and_forgets_the_second_fact(conversation):
    engine, sample, prefill = conversation
    a, b = sample.questions
    first, second = _ask_both(engine, prefill, sample, "snapkv")
    assert a.answers[0] in first.text
    assert b.answers[0] not in second.text
    assert _page_of(engine, prefill.prompt_ids, b.answers[0]) in first.report.evicted_pages
    assert _page_of(engine, prefill.prompt_ids, a.answers[0]) not in first.report.evicted_pages


def test_lsa_answers_both(conversation):
    engine, sample, prefill = conversation
    first, second = _ask_both(engine, prefill, sample, "lsa")
    assert sample.questions[0].answers[0] in first.text
    assert sample.questions[1].answers[0] in second.text
    assert max(first.report.resident_fraction_max, second.report.resident_fraction_max) <= BUDGET + 1e-6


def test_multi_question_harness_reports_each_position(backbone, tmp_path):
    settings = EvalSettings(tasks=["mq_niah_2"], length=600, samples=1, policies=["kvzip"], budgets=[0.3])
    with LSAEngine(backbone) as engine:
        run = evaluate(engine, settings, tmp_path / "results.jsonl", progress=False)
        again = evaluate(engine, settings, tmp_path / "results.jsonl", progress=False)  # resumed from the file
    assert again.reused == 1 and again.records == run.records
    (kvzip,) = run.records
    assert [t["position"] for t in kvzip["turns"]] == [1, 2]
    assert kvzip["score"] == sum(t["score"] for t in kvzip["turns"]) / 2
    assert kvzip["scoring_forward_seconds"] > 0 and kvzip["scoring_prefill_ratio"] > 0
    assert kvzip["turns"][1]["report"]["evicted_pages"] == kvzip["turns"][0]["report"]["evicted_pages"] != []
    rows = position_rows(run.records)
    assert [(r["policy"], r["position"]) for r in rows] == [("kvzip", 1), ("kvzip", 2)]
    assert [r["accuracy"] for r in rows] == [100.0 * t["score"] for t in kvzip["turns"]]


@pytest.mark.parametrize("task", list(MULTI_TASKS))
def test_multi_question_samples(backbone, task):
    builder = PromptBuilder(backbone.tokenizer, max_context=backbone.max_context)
    first, second = generate_multi(task, builder, 2, 4096)
    assert generate_multi(task, builder, 1, 4096)[0].digest() == first.digest() != second.digest()
    k = MULTI_TASKS[task].needles
    for sample in (first, second):
        assert len(sample.questions) == k
        assert abs(builder.count(sample.document) - sample.target_length) <= 0.02 * sample.target_length
        slices = sorted(int(q.depth * k) for q in sample.questions)
        assert slices == list(range(k))                     # one needle in each k-th of the context
        for q in sample.questions:
            key = q.answer_prefix.split(" for ")[1].split(" is:")[0]
            assert key in q.question and f"for {key} is: {q.answers[0]}." in sample.document
