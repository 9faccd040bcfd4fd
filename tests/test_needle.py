"""The mechanism, not luck: a distant needle is found by full and oracle, lost by recency at the same budget."""

from __future__ import annotations

import pytest

from flashmemory import LSAConfig, LSAEngine

ANSWER = "4817"
BUDGET = 0.15


@pytest.fixture(scope="module")
def setup(backbone, essays):
    tok = backbone.tokenizer
    hay = tok.decode(tok(essays)["input_ids"][:3300])
    cut = len(hay) // 3
    context = hay[:cut] + " The secret passcode for the blue door is 4817. " + hay[cut:]
    prompt = context + "\n\nWhat is the secret passcode for the blue door?"
    engine = LSAEngine(backbone, LSAConfig(budget=BUDGET))
    ids = engine.encode(prompt, chat=True)
    assert len(ids) > 3000
    needle_pos = len(tok(hay[:cut])["input_ids"])
    return engine, engine.prefill(ids, max_new_tokens=24), needle_pos, len(ids)


def test_full_answers(setup):
    engine, prefill, _, _ = setup
    assert ANSWER in engine.decode(prefill, "full", 24).text


def test_oracle_answers_within_budget(setup):
    engine, prefill, _, _ = setup
    result = engine.decode(prefill, "oracle", 24)
    assert ANSWER in result.text
    assert 0 < result.report.resident_fraction_max <= BUDGET
    assert result.report.device_kv_bytes_peak <= BUDGET * result.report.full_kv_bytes


def test_recency_misses_a_needle_outside_its_tail(setup):
    engine, prefill, needle_pos, n = setup
    result = engine.decode(prefill, "recency", 24)
    window = result.report.resident_fraction_max * n
    assert needle_pos < n - window  # the needle is far outside what recency keeps
    assert result.report.resident_fraction_max <= BUDGET
    assert ANSWER not in result.text
