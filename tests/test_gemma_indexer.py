"""Gemma-3-270m with its shipped indexer: a 12K-token needle at a 10% budget, and bad input.

The needle and question follow the evaluation harness (RULER's "special magic number" in Paul
Graham essays), which the indexer never saw in training (its corpus is stdlib-docstring prose
with other templates). Gemma-3-270m is a base model, so the prompt is raw text ending in an
answer prefix. Only the global layers (5, 11, 17) are tiered; the budget and the resident fraction
refer to their history. One shared prefill (~12.5K tokens): the module took 9.5 min on the shared
2-core CPU (536 s of it the prefill).

Needs the Gemma part packages (README, "Hybrid models"); skipped without them.
"""

from __future__ import annotations

import pytest

from flashmemory import LSAConfig, LSAEngine, load_backbone
from flashmemory.cli.main import main
from flashmemory.indexer.checkpoint import DEFAULT_DIR, CheckpointError, read_meta, shipped_dir
from flashmemory.policies import make_policy
from flashmemory.runtime.engine import PromptError
from gemma_parts import GEMMA, needs_gemma

BUDGET = 0.10
KEY, VALUE = "velvet-orchard", "7394052"
TEMPLATE = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the numbers afterwards.\n{context}\n"
            "Question: What is the special magic number for {key} mentioned in the provided text?\n"
            "Answer: The special magic number for {key} is:")



@pytest.fixture(scope="module")
def gemma():
    return load_backbone(GEMMA)


def needle_prompt(tokenizer, essays: str, depth: float, n_tokens: int) -> str:
    hay = tokenizer.decode(tokenizer(essays, add_special_tokens=False)["input_ids"][:n_tokens])
    cut = hay.index(". ", int(len(hay) * depth)) + 2  # at a sentence boundary
    context = hay[:cut] + f"One of the special magic numbers for {KEY} is: {VALUE}. " + hay[cut:]
    return TEMPLATE.format(context=context, key=KEY)


@pytest.fixture(scope="module")
def prefilled(gemma, essays):
    engine = LSAEngine(gemma, LSAConfig(budget=BUDGET))
    ids = engine.encode(needle_prompt(gemma.tokenizer, essays, 0.4, 12400))
    assert len(ids) > 12 * 1024
    return engine, engine.prefill(ids, max_new_tokens=12)


@needs_gemma
def test_shipped_gemma_indexer_answers_a_12k_needle_at_10_percent(prefilled):
    engine, pre = prefilled
    policy = make_policy("lsa")  # the shipped indexer, found by the backbone's fingerprint
    result = engine.decode(pre, policy, 12)
    assert policy.indexer.cfg.layers == [5, 11, 17]
    assert VALUE in result.text
    report = result.report
    assert report.tiered_layers == [5, 11, 17]
    assert 0 < report.resident_fraction_max <= BUDGET
    assert report.device_kv_bytes_peak <= BUDGET * report.full_kv_bytes


@needs_gemma
@pytest.mark.parametrize("policy", ["recency", "random"])
def test_training_free_policies_at_the_same_budget_fail(prefilled, policy):
    engine, pre = prefilled
    result = engine.decode(pre, policy, 12)
    assert result.report.resident_fraction_max <= BUDGET
    assert VALUE not in result.text


@needs_gemma
def test_prompt_over_the_32k_context_is_refused(gemma):
    engine = LSAEngine(gemma, LSAConfig(budget=BUDGET))
    ids = [gemma.tokenizer.bos_token_id] + [236764] * 32768  # 32,769 tokens
    with pytest.raises(PromptError, match="the prompt has 32769 tokens; .* the model.s context of 32768 tokens"):
        engine.prefill(ids, max_new_tokens=1)


@needs_gemma
def test_indexer_of_the_other_backbone_is_refused_by_name(tmp_path, capsys):
    smol = read_meta(DEFAULT_DIR)["config"]["fingerprint"]
    gemma_fp = read_meta(shipped_dir(GEMMA))["config"]["fingerprint"]
    prompt = tmp_path / "p.txt"
    prompt.write_text("The capital of France is")
    code = main(["generate", "--model", GEMMA, "--prompt-file", str(prompt), "--indexer", str(DEFAULT_DIR),
                 "--max-new-tokens", "2"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # beside load progress bars
    assert code == 2 and len(errors) == 1 and errors[0].startswith("flashmemory: error:")
    assert smol in errors[0] and gemma_fp in errors[0]


def test_gemma_indexer_on_the_default_backbone_names_both(backbone):
    """Runs without Gemma: the shipped Gemma indexer bound to SmolLM2-135M is refused, naming both."""
    gemma_fp = read_meta(shipped_dir(GEMMA))["config"]["fingerprint"]
    with pytest.raises(CheckpointError) as err:
        make_policy("lsa", checkpoint=shipped_dir(GEMMA)).bind(backbone.model)
    assert gemma_fp in str(err.value) and backbone.fingerprint in str(err.value)
