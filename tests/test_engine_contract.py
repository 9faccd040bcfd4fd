"""One contract over every policy and every supported architecture (tiny random-weight models).

- Every chunk resident (budget 1.0): each policy's tokens equal transformers' greedy `generate`,
  alone and in a batch of sequences with different prompt lengths.
- A small budget: a batch yields the tokens each sequence yields alone.
"""

from __future__ import annotations

import pytest

from flashmemory import LSAConfig, LSAEngine, policy_names

from tiny import ARCHITECTURES, hf_greedy, random_prompts, tiny_model

NEW = 80  # more than one cycle of tau=64
LENGTHS = (1100, 1300, 1500)
# lsa's indexer is trained for the default backbone (its contract runs on the real model in test_stock_path);
# deepseek-lsa scores DeepSeek-V4's compressed entries (tests/test_deepseek_runtime.py)
POLICIES = [p for p in policy_names() if p not in ("lsa", "deepseek-lsa")]


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request):
    model = tiny_model(request.param)
    prompts = random_prompts(LENGTHS)
    return model, prompts, [hf_greedy(model, p, NEW) for p in prompts]


@pytest.mark.parametrize("policy", POLICIES)
def test_every_chunk_resident_equals_transformers_alone_and_batched(arch, policy):
    model, prompts, refs = arch
    with LSAEngine(model, LSAConfig(budget=1.0)) as engine:
        batch = engine.generate(prompts, policy, max_new_tokens=NEW, stop_at_eos=False)
        alone = engine.generate(prompts[0], policy, max_new_tokens=NEW, stop_at_eos=False)
    assert [r.token_ids for r in batch] == refs
    assert alone.token_ids == refs[0]
    assert all(r.report.cycles >= 2 and r.report.resident_fraction_max == pytest.approx(1.0) for r in batch)


@pytest.mark.parametrize("policy", ["quest", "random"])  # a scored policy and a drawn one
def test_small_budget_batch_equals_alone(arch, policy):
    model, prompts, _ = arch
    with LSAEngine(model, LSAConfig(budget=0.3)) as engine:
        alone = [engine.generate(p, policy, max_new_tokens=NEW, stop_at_eos=False).token_ids for p in prompts]
        batch = [r.token_ids for r in engine.generate(prompts, policy, max_new_tokens=NEW, stop_at_eos=False)]
        assert batch == alone
        assert engine.memory().device_used_bytes == 0
