"""The stock path on the real Gemma-3-270m (hybrid sliding-window and global layers), at 2.5K tokens:
with every chunk resident, the engine's tokens equal transformers' own greedy `generate`.

The prompt is longer than the 512-token window, so the window layers' ring has wrapped before the first
decode step. Needs the Gemma part packages (README, "Hybrid models"); skipped without them.
"""

from __future__ import annotations

import pytest

from flashmemory import LSAConfig, LSAEngine, load_backbone
from gemma_parts import GEMMA, needs_gemma
from tiny import hf_greedy

PROMPT_TOKENS = 2500
NEW = 80  # more than one cycle of tau=64

pytestmark = needs_gemma


@pytest.fixture(scope="module")
def gemma_case(essays):
    gemma = load_backbone(GEMMA)
    ids = gemma.tokenizer(essays)["input_ids"][:PROMPT_TOKENS]  # starts with <bos>
    return gemma, ids, hf_greedy(gemma.model, ids, NEW)


@pytest.mark.parametrize("policy", ["full", "lsa"])
def test_every_chunk_resident_equals_transformers_on_gemma(gemma_case, policy):
    gemma, ids, reference = gemma_case
    with LSAEngine(gemma, LSAConfig(budget=1.0)) as engine:
        result = engine.generate(ids, policy, max_new_tokens=NEW, stop_at_eos=False)
    report = result.report
    assert report.tiered_layers == [5, 11, 17]
    assert report.cycles >= 2 and report.resident_fraction_max == pytest.approx(1.0)
    assert result.token_ids == reference
