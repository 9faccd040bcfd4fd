"""The indexer model and its key store: shapes, the lightning-indexer score, RoPE, fp8 storage."""

from __future__ import annotations

import math

import pytest
import torch

from flashmemory.indexer import ChunkKeyStore, IndexerConfig, IndexerConfigError, NeuralIndexer, compress_keys
from flashmemory.indexer.model import rotate

INV_FREQ = (1.0 / (1e5 ** (torch.arange(0, 64, 2).float() / 64))).tolist()


def small_config(**kw) -> IndexerConfig:
    base = dict(d_model=32, key_dim=16, rope_dim=8, layers=[1, 3], n_heads=4, q_rank=8,
                inv_freq=INV_FREQ[::8][:4], fingerprint="test-backbone", chunk_size=32, key_block=32, spill=None)
    base.update(kw)
    return IndexerConfig(**base)


def test_config_is_validated():
    with pytest.raises(IndexerConfigError, match="key_dim"):
        small_config(key_dim=15)
    with pytest.raises(IndexerConfigError, match="layers"):
        small_config(layers=[])
    with pytest.raises(IndexerConfigError, match="repeat"):
        small_config(layers=[2, 2])
    with pytest.raises(IndexerConfigError, match="ensemble"):
        small_config(ensemble="min")
    with pytest.raises(IndexerConfigError, match="inv_freq"):
        small_config(inv_freq=[1.0])
    with pytest.raises(IndexerConfigError, match="key_block"):
        small_config(key_block=12)


def test_score_is_the_lightning_indexer_formula():
    torch.manual_seed(0)
    cfg = small_config(layers=[0], inv_freq=None, distance_buckets=0)
    ix = NeuralIndexer(cfg)
    r = ix.retrievers["l0"]
    with torch.no_grad():
        r.bias.fill_(0.3)
    h, keys = torch.randn(2, 1, 32), torch.randn(2, 1, 5, 16)
    pos = torch.tensor([10, 20])
    got = ix.layer_logits(h, keys, pos)[0]
    a = r.wq_a(h[:, 0])
    a = a / torch.sqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6) * r.q_norm_weight
    q = r.wq_b(a).view(2, 4, 16)
    w = r.weights_proj(h[:, 0]) / math.sqrt(16) / math.sqrt(4)
    want = (w[:, :, None] * torch.relu(torch.einsum("bhd,bnd->bhn", q, keys[:, 0]))).sum(1) + 0.3
    torch.testing.assert_close(got, want)
    probs = ix(h, keys, pos)
    assert probs.shape == (2, 5) and bool(((probs > 0) & (probs < 1)).all())


def test_a_chunk_takes_the_best_of_its_block_keys():
    torch.manual_seed(4)
    ix = NeuralIndexer(small_config(layers=[0], key_block=8, distance_buckets=0))  # 4 keys per chunk
    h, pos = torch.randn(2, 1, 32), torch.tensor([300, 400])
    keys = torch.randn(2, 1, 3 * 4, 16)
    per_block = NeuralIndexer(small_config(layers=[0], key_block=32, distance_buckets=0))
    per_block.load_state_dict(ix.state_dict())
    blocks = per_block.layer_logits(h, keys, pos)[0]            # every block scored as its own "chunk"
    torch.testing.assert_close(ix.layer_logits(h, keys, pos)[0], blocks.reshape(2, 3, 4).amax(-1))


def test_spill_keeps_the_chunk_after_a_strong_one():
    torch.manual_seed(5)
    plain = NeuralIndexer(small_config(layers=[0], distance_buckets=0))
    spill = NeuralIndexer(small_config(layers=[0], distance_buckets=0, spill=-1.0))
    spill.load_state_dict(plain.state_dict())
    h, keys, pos = torch.randn(1, 1, 32), torch.randn(1, 1, 6, 16), torch.tensor([400])
    a, b = plain.layer_logits(h, keys, pos)[0, 0], spill.layer_logits(h, keys, pos)[0, 0]
    want = torch.maximum(a, torch.cat([torch.tensor([-30.0]), a[:-1] - 1.0]))
    torch.testing.assert_close(b, want)


def test_softmax_score_is_a_log_attention_mass_over_visible_chunks():
    torch.manual_seed(6)
    ix = NeuralIndexer(small_config(layers=[0], distance_buckets=0, score="softmax", key_block=8))
    r = ix.retrievers["l0"]
    h, keys = torch.randn(1, 1, 32), torch.randn(1, 1, 5 * 4, 16)
    pos = torch.tensor([3 * 32 + 7])   # 3 complete chunks visible; chunks 3 and 4 are not
    logits = ix.layer_logits(h, keys, pos)[0, 0]
    q, w = r.queries(h[:, 0], pos)
    dots = torch.einsum("hd,nd->hn", q[0], keys[0, 0] * ix.cfg.key_scale).reshape(4, 5, 4).amax(-1)[:, :3]
    p = torch.softmax(dots * r.log_temperature.exp(), -1)                   # per-head distribution over chunks
    mass = (torch.softmax(w[0], -1)[:, None] * p).sum(0)                   # head mixture
    torch.testing.assert_close(logits[:3], torch.log(mass * 3) + r.bias)   # 0 = uniform attention
    assert bool((logits[3:] < -20).all())


def test_distance_bias_is_a_recency_prior():
    ix = NeuralIndexer(small_config(layers=[0], distance_buckets=4))
    r = ix.retrievers["l0"]
    # query in chunk 10: bucket = floor(log2(distance in chunks)), distances 10 .. 1
    assert r.buckets(torch.tensor([10 * 32 + 5]), 10).tolist() == [[3, 3, 3, 2, 2, 2, 2, 1, 1, 0]]


def test_shared_keys_match_batched_keys():
    torch.manual_seed(1)
    ix = NeuralIndexer(small_config())
    h, keys, pos = torch.randn(3, 2, 32), torch.randn(2, 7, 16), torch.tensor([5, 6, 7])
    batched = keys[None].expand(3, -1, -1, -1)
    torch.testing.assert_close(ix(h, keys, pos), ix(h, batched, pos))


def test_ensemble_max_and_mean():
    ix = NeuralIndexer(small_config())
    logits = torch.tensor([[[0.0, 2.0]], [[-2.0, 0.0]]])  # [L=2, B=1, n=2]
    torch.testing.assert_close(ix.ensemble(logits), torch.sigmoid(torch.tensor([[0.0, 2.0]])))
    ix.cfg.ensemble = "mean"
    torch.testing.assert_close(ix.ensemble(logits), torch.sigmoid(logits).mean(0))


def test_query_rope_makes_scores_depend_on_distance_only():
    # keys rotated at their positions, query rotated at its own: q.k depends on the offset alone
    torch.manual_seed(2)
    inv = torch.tensor(INV_FREQ[:4])
    q, k = torch.randn(1, 16), torch.randn(1, 16)
    def dot(tq, tk):
        return float((rotate(q, torch.tensor([tq]), inv, 8) * rotate(k, torch.tensor([tk]), inv, 8)).sum())
    assert dot(100, 40) == pytest.approx(dot(1100, 1040), rel=1e-4, abs=1e-4)
    assert dot(100, 40) != pytest.approx(dot(100, 90), rel=1e-3)


def test_compress_keys_is_the_mean_per_kv_head_concatenated():
    keys = torch.randn(3, 70, 4)  # kv_heads=3, T=70, head_dim=4
    out = compress_keys(keys, 32)
    assert out.shape == (2, 12)  # only complete chunks
    torch.testing.assert_close(out[1, 4:8], keys[1, 32:64].mean(0))


@pytest.mark.parametrize("fp8", [False, True])
def test_key_store_grows_incrementally(fp8):
    torch.manual_seed(3)
    host = torch.randn(5, 3, 300, 4)  # [layers, kv, T, D]
    store = ChunkKeyStore([1, 4], key_dim=12, chunk_size=32, fp8=fp8, key_block=8)
    for length in (40, 64, 65, 200, 300):
        store.extend_from_host(host, length)
        assert store.n_chunks == length // 32
    want = compress_keys(host[[1, 4], :, :288], 8)  # 9 complete chunks of 4 blocks
    got = store.keys()
    assert got.shape == (2, 36, 12) and store.keys(2).shape == (2, 8, 12)
    if fp8:  # e4m3 keeps ~2 significant digits; the per-key scale keeps the range
        assert float((got - want).abs().max() / want.abs().max()) < 0.07
        assert store.nbytes == 2 * 36 * (12 + 4)
    else:  # fp16, as the trace dump stores keys for training
        torch.testing.assert_close(got, want.half().float())
        assert store.nbytes == 2 * 36 * 12 * 2
    store.reset()
    assert store.n_chunks == 0


def test_parameter_count_of_the_default_shape():
    # SmolLM2-135M: d_model 576, 3 KV heads x 64 dims
    cfg = IndexerConfig(d_model=576, key_dim=192, rope_dim=64, layers=[10, 15, 20], n_heads=8, q_rank=64,
                        chunk_size=32, key_block=8, inv_freq=INV_FREQ)
    per_layer = 576 * 64 + 64 + 64 * 8 * 192 + 576 * 8 + 1 + cfg.distance_buckets
    assert NeuralIndexer(cfg).parameter_count() == 3 * per_layer


def test_fine_keys_are_checked_and_scored_with_their_coarse_means():
    from flashmemory.indexer.checkpoint import CheckpointError
    from flashmemory.policies.lsa import LSAPolicy

    with pytest.raises(IndexerConfigError, match="fine_key_block must be a positive divisor of key_block"):
        small_config(key_block=8, fine_key_block=3)
    with pytest.raises(ValueError, match="fine_key_block must be a positive integer"):
        LSAPolicy(fine_key_block=0)
    ix = NeuralIndexer(small_config(key_block=8))     # trained on 4 keys of 8 tokens per chunk
    with pytest.raises(CheckpointError, match="does not divide"):
        LSAPolicy(checkpoint=ix, fine_key_block=5)
    torch.manual_seed(5)
    h, pos = torch.randn(1, 2, 32), torch.tensor([200])
    fine = torch.randn(2, 3 * 16, 16)                 # 3 chunks x 16 keys of 2 tokens
    coarse = fine.reshape(2, 12, 4, 16).mean(2)       # the same chunks at the trained 8 tokens
    policy = LSAPolicy(checkpoint=ix, fine_key_block=2)
    assert policy.key_block == 2 and ix.cfg.fine_key_block is None  # the policy never writes into shared weights
    both = ix(h, fine, pos, key_block=2)
    assert torch.all(both >= ix(h, coarse, pos)) and both.shape == (1, 3)
    with pytest.raises(ValueError, match="cannot be averaged"):
        ix(h, fine[:, :36], pos, key_block=3)
