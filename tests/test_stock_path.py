"""The stock path is sacred: on the real default model, with every chunk resident, tokens equal
transformers' greedy output, alone and in a batch; a batch at a small budget equals each sequence alone."""

from __future__ import annotations

import pytest
import torch

from flashmemory import LSACache, LSAConfig, LSAEngine

NEW_TOKENS = 80  # more than one cycle of tau=64
BATCH_NEW = 40
LENGTHS = (1900, 2200, 2500)  # 0.15 of 1900 tokens still holds sink + tail + one cycle


@pytest.fixture(scope="module")
def prompt_ids(backbone, essays):
    return backbone.tokenizer(essays)["input_ids"][:1200]


@pytest.fixture(scope="module")
def reference(backbone, prompt_ids):
    ids = torch.tensor([prompt_ids])
    out = backbone.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, min_new_tokens=NEW_TOKENS)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def prefill(backbone, prompt_ids):
    # prefill_chunk larger than the prompt: one dense forward, exactly as `generate` does it
    return LSAEngine(backbone, LSAConfig(budget=1.0)).prefill(prompt_ids, max_new_tokens=NEW_TOKENS)


@pytest.mark.parametrize("policy", ["full", "recency", "quest", "random", "lsa"])
def test_every_chunk_resident_matches_generate(backbone, prefill, reference, policy):
    engine = LSAEngine(backbone, LSAConfig(budget=1.0))
    result = engine.decode(prefill, policy, NEW_TOKENS, stop_at_eos=False)
    engine.close()
    assert result.report.cycles >= 2
    assert result.report.resident_fraction_max == pytest.approx(1.0)
    assert result.token_ids == reference


def test_lsa_cache_inside_model_generate(backbone, prompt_ids, reference):
    ids = torch.tensor([prompt_ids])
    with LSACache(backbone.model, LSAConfig(budget=1.0), policy="streaming",
                  max_length=len(prompt_ids) + NEW_TOKENS) as cache:
        out = backbone.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                      do_sample=False, min_new_tokens=NEW_TOKENS, past_key_values=cache)
    assert out[0, len(prompt_ids):].tolist() == reference
    assert len(cache.cycles) >= 2


def test_sparse_cache_inside_model_generate_respects_budget(backbone, prompt_ids):
    ids = torch.tensor([prompt_ids])
    with LSACache(backbone.model, LSAConfig(budget=0.3), policy="quest",
                  max_length=len(prompt_ids) + NEW_TOKENS) as cache:
        backbone.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                do_sample=False, min_new_tokens=NEW_TOKENS, past_key_values=cache)
    assert cache.cycles and all(c.resident_fraction <= 0.3 for c in cache.cycles)
    assert all(c.pages < len(prompt_ids) // 32 for c in cache.cycles)


@pytest.fixture(scope="module")
def batch_prompts(backbone, essays):
    ids = backbone.tokenizer(essays)["input_ids"]
    return [ids[i * 3000: i * 3000 + n] for i, n in enumerate(LENGTHS)]


def _near_tie_or_equal(backbone, prompt, got, want):
    """Equal, or the first difference is a float near-tie: the two tokens' logits differ by < 1e-4."""
    if got == want:
        return True
    k = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    with torch.no_grad():
        logits = backbone.model(torch.tensor([prompt + want[:k]])).logits[0, -1]
    return abs(float(logits[got[k]] - logits[want[k]])) < 1e-4


def test_full_in_a_batch_equals_transformers(backbone, batch_prompts):
    with LSAEngine(backbone, LSAConfig(budget=1.0)) as engine:
        batch = engine.generate(batch_prompts, "full", max_new_tokens=BATCH_NEW, stop_at_eos=False)
    for prompt, result in zip(batch_prompts, batch):
        ids = torch.tensor([prompt])
        want = backbone.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=BATCH_NEW,
                                       min_new_tokens=BATCH_NEW, do_sample=False)[0, len(prompt):].tolist()
        assert _near_tie_or_equal(backbone, prompt, result.token_ids, want)


@pytest.mark.parametrize("budget", [1.0, 0.15])
def test_lsa_batched_equals_alone(backbone, batch_prompts, budget):
    with LSAEngine(backbone, LSAConfig(budget=budget)) as engine:
        batch = engine.generate(batch_prompts, "lsa", max_new_tokens=BATCH_NEW, stop_at_eos=False)
        for prompt, result in zip(batch_prompts, batch):
            alone = engine.generate(prompt, "lsa", max_new_tokens=BATCH_NEW, stop_at_eos=False)
            assert _near_tie_or_equal(backbone, prompt, result.token_ids, alone.token_ids)
            assert result.report.resident_fraction_max <= budget + 1e-9
