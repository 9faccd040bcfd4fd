"""The stock path is sacred: with every chunk resident, tokens equal transformers' greedy output."""

from __future__ import annotations

import pytest
import torch

from flashmemory import LSACache, LSAConfig, LSAEngine

NEW_TOKENS = 80  # more than one cycle of tau=64


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


@pytest.mark.parametrize("policy", ["full", "recency", "quest", "random"])
def test_every_chunk_resident_matches_generate(backbone, prefill, reference, policy):
    engine = LSAEngine(backbone, LSAConfig(budget=1.0))
    result = engine.decode(prefill, policy, NEW_TOKENS, stop_at_eos=False)
    assert result.report.cycles >= 2
    assert result.report.resident_fraction_max == pytest.approx(1.0)
    assert result.token_ids == reference


def test_lsa_cache_inside_model_generate(backbone, prompt_ids, reference):
    ids = torch.tensor([prompt_ids])
    cache = LSACache(backbone.model, LSAConfig(budget=1.0), policy="streaming", max_length=len(prompt_ids) + NEW_TOKENS)
    out = backbone.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, min_new_tokens=NEW_TOKENS, past_key_values=cache)
    assert out[0, len(prompt_ids):].tolist() == reference
    assert len(cache.stats.cycles) >= 2


def test_sparse_cache_inside_model_generate_respects_budget(backbone, prompt_ids):
    ids = torch.tensor([prompt_ids])
    cache = LSACache(backbone.model, LSAConfig(budget=0.3), policy="quest", max_length=len(prompt_ids) + NEW_TOKENS)
    backbone.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                            min_new_tokens=NEW_TOKENS, past_key_values=cache)
    cache.close()
    assert cache.stats.cycles and all(c.resident_fraction <= 0.3 for c in cache.stats.cycles)
    assert all(c.pages < len(prompt_ids) // 32 for c in cache.stats.cycles)
