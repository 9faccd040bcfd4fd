"""The shipped indexer on the real default model: an evaluation-style needle at 4K+ tokens.

The needle and question follow the evaluation harness (RULER's "special magic number" in Paul
Graham essays), which the indexer never saw in training (its corpus is stdlib-docstring
prose with other templates). With at most 15% of the KV resident, `lsa` answers while
`recency` and `random` at the same budget do not. One shared prefill per needle depth.
"""

from __future__ import annotations

import pytest

from flashmemory import LSAConfig, LSAEngine
from flashmemory.policies import make_policy

BUDGET = 0.15
KEY, VALUE = "velvet-orchard", "7394052"
TEMPLATE = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the numbers afterwards.\n{context}\n{question}")


def needle_prompt(tokenizer, essays: str, depth: float, n_tokens: int = 4300) -> tuple[str, str]:
    hay = tokenizer.decode(tokenizer(essays)["input_ids"][:n_tokens])
    cut = hay.index(". ", int(len(hay) * depth)) + 2  # at a sentence boundary
    context = hay[:cut] + f"One of the special magic numbers for {KEY} is: {VALUE}. " + hay[cut:]
    question = f"What is the special magic number for {KEY} mentioned in the provided text?"
    return TEMPLATE.format(context=context, question=question), f"The special magic number for {KEY} is:"


@pytest.fixture(scope="module", params=[0.35, 0.6], ids=["depth35", "depth60"])
def prefilled(request, backbone, essays):
    engine = LSAEngine(backbone, LSAConfig(budget=BUDGET))
    prompt, prefix = needle_prompt(backbone.tokenizer, essays, request.param)
    ids = engine.encode(prompt, chat=True) + backbone.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    assert len(ids) > 4096
    return engine, engine.prefill(ids, max_new_tokens=16)


def test_lsa_answers_with_at_most_15_percent_resident(prefilled):
    engine, pre = prefilled
    policy = make_policy("lsa")
    result = engine.decode(pre, policy, 16)
    assert VALUE in result.text
    report = result.report
    assert report.policy == "lsa"
    assert 0 < report.resident_fraction_max <= BUDGET
    assert report.device_kv_bytes_peak <= BUDGET * report.full_kv_bytes
    # the sequence's key store is reported apart from the KV: one fp16 key per run-time key block of
    # every complete chunk at each target layer, a few percent of the cache
    cfg = policy.indexer.cfg
    n_keys = (len(pre.prompt_ids) // cfg.chunk_size) * (cfg.chunk_size // policy.key_block)
    assert report.index_bytes == len(cfg.layers) * n_keys * cfg.key_dim * 2
    assert report.index_bytes < 0.05 * report.full_kv_bytes


@pytest.mark.parametrize("policy", ["recency", "random"])
def test_training_free_policies_at_the_same_budget_fail(prefilled, policy):
    engine, pre = prefilled
    result = engine.decode(pre, policy, 16)
    assert result.report.resident_fraction_max <= BUDGET
    assert VALUE not in result.text
