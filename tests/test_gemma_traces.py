"""Dumping and training on a hybrid (sliding-window / global) model: a tiny random-weight Gemma 3.

Only the global layers keep the whole history, so only they vote and only they are candidates;
the indexer's queries rotate with the global layers' rotary table; the per-head query norm's gain
is stored beside the query projections, and the backbone-initialised indexer reproduces the
backbone's own (normalised) query scale.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from flashmemory.models.loader import Backbone, fingerprint
from flashmemory.runtime.capture import attention_modules
from flashmemory.traces.corpus import synthetic_corpus
from flashmemory.traces.dataset import TraceSet
from flashmemory.traces.dump import QUERY_WEIGHTS, DumpConfig, DumpError, run_dump
from flashmemory.traces.train import TrainConfig, train_indexer

GLOBAL = [1, 3]


@pytest.fixture(scope="module")
def hybrid(backbone):
    """A tiny Gemma 3 (layers 1 and 3 global, a 64-token window elsewhere) over SmolLM2's tokenizer."""
    config = Gemma3TextConfig(vocab_size=len(backbone.tokenizer), hidden_size=64, intermediate_size=128,
                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                              max_position_embeddings=4096, sliding_window=64, query_pre_attn_scalar=16,
                              layer_types=["sliding_attention", "full_attention"] * 2,
                              architectures=["Gemma3ForCausalLM"], attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for attn in attention_modules(model):  # a non-trivial norm gain, so folding it in is tested
            attn.q_norm.weight.uniform_(-0.5, 0.5)
    return Backbone(model=model, tokenizer=backbone.tokenizer, path=backbone.path, fingerprint=fingerprint(config))


@pytest.fixture(scope="module")
def hybrid_dump(hybrid, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hybrid") / "dump"
    cfg = DumpConfig(label_stride=2, region_tokens=128, max_answer_tokens=4, min_layers=1, quest_baseline=True)
    summary = run_dump(hybrid, synthetic_corpus(4, seed=5, min_tokens=400, max_tokens=600), folder, cfg,
                       corpus_spec={"test": 4}, progress=False)
    assert summary.documents == 4 and summary.anchors > 0
    return folder


def test_dump_of_a_hybrid_model_keeps_the_global_layers(hybrid, hybrid_dump):
    manifest = json.loads((hybrid_dump / "manifest.json").read_text())
    assert manifest["candidate_layers"] == GLOBAL
    rotary = hybrid.model.model.rotary_emb
    assert manifest["backbone"]["inv_freq"] == pytest.approx(rotary.full_attention_inv_freq.tolist())
    assert manifest["backbone"]["inv_freq"] != pytest.approx(rotary.sliding_attention_inv_freq.tolist())
    traces = TraceSet([str(hybrid_dump)])
    assert traces.layers == GLOBAL
    for layer in GLOBAL:
        gain = 1.0 + attention_modules(hybrid.model)[layer].q_norm.weight  # Gemma's RMSNorm scales by 1 + w
        assert torch.allclose(traces.query_norms[layer], gain, atol=1e-3)
    doc = traces.docs[0]
    assert doc.keys.shape[0] == len(GLOBAL) and doc.votes.max() <= len(GLOBAL)
    assert (hybrid_dump / QUERY_WEIGHTS).is_file()


@pytest.mark.parametrize("field", ["label_layers", "candidate_layers"])
def test_sliding_window_layers_are_refused(hybrid, tmp_path, field):
    with pytest.raises(DumpError, match=r"\[0\] are sliding-window layers; .* whole history at layers \[1, 3\]"):
        run_dump(hybrid, synthetic_corpus(1, seed=5, min_tokens=400, max_tokens=600), tmp_path / "d",
                 DumpConfig(**{field: [0, 1]}), progress=False)


def test_backbone_init_matches_the_normalised_query_scale(hybrid, hybrid_dump):
    """Trained zero epochs, the indexer's queries have the backbone's query scale (the norm's gain over
    each head's RMS), not the raw projection's."""
    result = train_indexer(str(hybrid_dump), TrainConfig(layers=GLOBAL, epochs=1, patience=1, val_fraction=0.25,
                                                         q_rank=64))
    traces = TraceSet([str(hybrid_dump)])
    doc = traces.docs[0]
    for i, layer in enumerate(GLOBAL):
        attn = attention_modules(hybrid.model)[layer]
        h = doc.hidden[:, i]
        with torch.no_grad():
            real = attn.q_norm(attn.q_proj(h).view(len(h), 4, 16))
            ours, _ = result.indexer.retrievers[f"l{layer}"].queries(h, torch.zeros(len(h), dtype=torch.long))
        real_rms, our_rms = real.pow(2).mean(-1).sqrt().mean(0), ours.pow(2).mean(-1).sqrt().mean(0)
        assert torch.allclose(our_rms, real_rms, rtol=0.25)
