"""LSA over DeepSeek-V4's CSA entries inside transformers' own generate, on a tiny random DeepseekV4.

The prompt (1400 tokens) gives 350 CSA entries (21 pages of 16) and 10 HCA entries per layer.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from flashmemory.config import ConfigError
from flashmemory.policies.deepseek_lsa import DeepseekLSAPolicy, default_target_layers, native_lightning_indexer
from flashmemory.runtime.deepseek import DeepseekLSACache, DeepseekLSAConfig
from flashmemory.traces.deepseek import dump_deepseek, train_deepseek
from tiny import tiny_model

PROMPT = 1400
SMALL = DeepseekLSAConfig(page_entries=16, tau=8, tail_entries=32, max_pages=8)


def tiny_deepseek_config() -> DeepseekV4Config:
    """The tiny random DeepSeek-V4 of docs/environment (CSA layers 1 and 4, HCA layers 2 and 5)."""
    return DeepseekV4Config(
        vocab_size=512, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, q_lora_rank=32, num_experts_per_tok=2, n_routed_experts=4,
        n_shared_experts=1, o_groups=2, o_lora_rank=16, index_n_heads=4, index_head_dim=16, index_topk=16,
        sliding_window=16, num_nextn_predict_layers=0,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"] * 2)


@pytest.fixture(scope="module")
def model():
    """The tiny model; one torch thread while it runs (its ops are too small to gain from more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield DeepseekV4ForCausalLM(tiny_deepseek_config()).eval()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 512, (1, PROMPT), generator=torch.Generator().manual_seed(1))


def generate(model, prompt: torch.Tensor, n: int, cache=None) -> list[int]:
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, past_key_values=cache)
    return out[0, prompt.shape[1]:].tolist()


def hooks_on(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def reference(model, prompt) -> list[int]:
    return generate(model, prompt, 16)


def test_lsa_off_equals_hf_generate(model, prompt, reference):
    with DeepseekLSACache(model, DeepseekLSAConfig(enabled=False)) as cache:
        assert generate(model, prompt, 16, cache) == reference
    assert hooks_on(model) == 0


def test_every_entry_resident_equals_hf_generate(model, prompt, reference):
    config = DeepseekLSAConfig(page_entries=16, tau=8, tail_entries=32, max_pages=8)
    with DeepseekLSACache(model, config, policy="full", record_picks=True) as cache:
        assert generate(model, prompt, 16, cache) == reference
    assert hooks_on(model) == 0
    assert [c.step for c in cache.cycles] == [0, 8]          # the tiered path ran: two cycles
    assert cache.mirror.length == cache.cycles[-1].entries   # everything up to the last start is mirrored
    assert all(s.resident == s.entries for s in cache.steps)


def test_small_budget_invariants(model, prompt):
    P, kmax = SMALL.page_entries, SMALL.max_pages
    with DeepseekLSACache(model, SMALL, record_picks=True) as cache:
        generate(model, prompt, 24, cache)
    assert hooks_on(model) == 0
    starts = [c.step for c in cache.cycles]
    assert starts == [0, 8, 16]
    # nothing moves inside a cycle: every copy between the tiers happens at a cycle start
    assert cache.transfers.steps and set(cache.transfers.steps) <= set(starts)
    assert sum(c.recalled_pages for c in cache.cycles[1:]) > 0      # the resident set did change
    layers = [1, 4]
    entry_bytes = 2 * (32 + 16) * 4                                 # 2 CSA layers x (entry + indexer key) fp32
    assert cache.entry_bytes == entry_bytes
    for s in cache.steps:
        cycle = cache.cycles[s.cycle]
        # device bytes of the CSA tier = the resident entries' bytes
        assert s.device_bytes == s.resident * entry_bytes
        # budget and KMAX at every step
        assert s.resident <= kmax * P and s.pages <= kmax
        assert len(cycle.pages) <= cycle.allowed <= kmax
        assert s.resident < s.entries
        # the resident set of this step: the cycle's pages, then the open region up to now
        open_start = cycle.entries // P * P
        resident = {e for p in cycle.pages for e in range(p * P, p * P + P)} | set(range(open_start, s.entries))
        assert len(resident) == s.resident
        assert {p for p in cycle.pages} >= set(range(cycle.entries // P - 2, cycle.entries // P))  # tail pages
        for layer in layers:
            used = cache.picks[s.step][layer].tolist()
            assert len(used) == 16                                   # the native top-16 ran over resident entries
            assert set(used) <= resident                             # and never picked a non-resident one
    # the scoring overhead: indexer scoring and page choice against the decode time
    overhead = sum(c.select_seconds for c in cache.cycles) / sum(s.seconds for s in cache.steps)
    print(f"scoring overhead {overhead:.4f} of decode time")
    assert overhead <= 0.05
    final = cache.layers[1]
    assert final.compressed_kv["compressor"].shape[1] == cache.steps[-1].resident
    assert cache.host_bytes == cache.mirror.length * entry_bytes


def test_native_initialised_indexer_scores_like_the_model(model, prompt):
    """The release-form indexer built from the backbone's native indexer gives the model's own index scores."""
    layers = (1, 4)
    seen: dict[int, torch.Tensor] = {}
    handles = [model.model.layers[L].self_attn.compressor.indexer.scorer.register_forward_hook(
        lambda m, a, out, L=L: seen.__setitem__(L, out[0, -1])) for L in layers]
    try:
        policy = DeepseekLSAPolicy(layers=layers)
        with DeepseekLSACache(model, SMALL, policy="full") as cache:
            generate(model, prompt[:, :600], 2, cache)
    finally:
        for h in handles:
            h.remove()
    policy.bind(model)
    ix = policy.indexer
    hidden = torch.stack([cache.activations.hidden(L) for L in layers])[None]
    keys = torch.stack([ix.rotate_keys(cache.layers[L].compressed_kv["indexer"][0]) for L in layers])
    logits = ix.layer_logits(hidden, keys, torch.tensor([cache.activations.position]))[:, 0]
    for i, L in enumerate(layers):
        assert torch.allclose(logits[i], seen[L].float(), rtol=1e-3, atol=1e-4)


def test_default_layers_are_clamped_to_the_config():
    assert default_target_layers(tiny_deepseek_config()) == (4,)


def test_native_indexer_is_the_release_layout(model):
    ix = native_lightning_indexer(model, (1, 4))
    assert sorted(ix.state_dict()) == sorted(f"retrievers.l{L}.{p}" for L in (1, 4) for p in
                                             ("wq_a.weight", "wq_b.weight", "q_norm_weight", "weights_proj.weight"))
    assert torch.equal(ix.retrievers["l4"].wq_b.weight, model.model.layers[4].self_attn.compressor.indexer.q_b_proj.weight)


def test_clear_errors(model, prompt):
    with pytest.raises(ConfigError, match="exactly one"):
        DeepseekLSAConfig(max_pages=None)
    with pytest.raises(ConfigError, match="max_pages"):
        DeepseekLSACache(model, DeepseekLSAConfig(page_entries=16, tail_entries=64, max_pages=3))
    with pytest.raises(ValueError, match="DeepSeek-V4"):
        DeepseekLSACache(tiny_model("llama"))
    with DeepseekLSACache(model, SMALL) as cache, pytest.raises(ValueError, match="one sequence"):
        generate(model, prompt[:, :64].repeat(2, 1), 1, cache)
    assert hooks_on(model) == 0


def test_dump_train_load(model, tmp_path):
    prompts = torch.randint(0, 512, (2, 400), generator=torch.Generator().manual_seed(2)).tolist()
    dump = dump_deepseek(model, prompts, tmp_path / "dump", steps=16, layers=(1, 4), tau=8)
    doc = torch.load(dump / "doc00000.pt", weights_only=True)
    assert doc["hidden"].shape == (16, 2, 64) and doc["keys"].shape == (2, 104, 16)
    assert 0 < doc["labels"].float().mean() < 1
    result = train_deepseek(dump, tmp_path / "indexer", epochs=2, lr=1e-3)   # reads the dump folder only
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    print(f"focal loss per epoch {result.losses}")
    policy = DeepseekLSAPolicy(checkpoint=result.folder)
    with DeepseekLSACache(model, SMALL, policy=policy) as cache:
        generate(model, prompt_ids(600), 10, cache)
    native = native_lightning_indexer(model, (1, 4))
    assert policy.indexer.layers == [1, 4]
    assert not torch.equal(policy.indexer.retrievers["l4"].wq_b.weight, native.retrievers["l4"].wq_b.weight)
    assert len(cache.cycles) == 2 and cache.index.nbytes == 2 * cache.cycles[-1].entries * (16 + 4)   # 20-byte fp8 keys, 2 layers


def prompt_ids(n: int) -> torch.Tensor:
    return torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(3))


def test_generate_cli_runs_a_deepseek_folder(tmp_path, capsys, backbone):
    """`flashmemory generate --model DIR` on a DeepSeek-V4 folder (tiny random weights, the default
    model's tokenizer): with every entry resident its tokens equal transformers' greedy generate."""
    import json as json_

    from transformers import DeepseekV4ForCausalLM

    from flashmemory.cli.main import main

    cfg = tiny_deepseek_config()
    cfg.vocab_size = len(backbone.tokenizer)
    cfg.architectures = ["DeepseekV4ForCausalLM"]
    torch.manual_seed(0)
    DeepseekV4ForCausalLM(cfg).save_pretrained(tmp_path / "ds")
    backbone.tokenizer.save_pretrained(tmp_path / "ds")
    prompt = tmp_path / "p.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    code = main(["generate", "--model", str(tmp_path / "ds"), "--prompt-file", str(prompt), "--policy", "full",
                 "--max-new-tokens", "8", "--json"])
    data = json_.loads(capsys.readouterr().out)
    assert code == 0 and data["report"]["cycles"] >= 1 and data["report"]["csa_entries"] > 0
    model = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "ds", attn_implementation="eager").eval()
    ids = torch.tensor([backbone.tokenizer(prompt.read_text())["input_ids"]])
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert data["token_ids"] == want[0, ids.shape[1]:].tolist()
    code = main(["generate", "--model", str(tmp_path / "ds"), "--prompt-file", str(prompt), "--stop", "x"])
    assert code == 2 and "greedy decoding of a prompt file only" in capsys.readouterr().err
