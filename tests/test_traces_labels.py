"""Golden labels, the selectable population, metrics and the focal loss, on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from flashmemory.runtime.attention_mass import chunk_mass, token_attention, top_p_mask
from flashmemory.traces.labels import Population, causal_chunk_mass, layer_votes, window_max
from flashmemory.traces.metrics import score_metrics
from flashmemory.traces.train import focal_bce


def test_causal_chunk_mass_matches_full_attention_on_visible_keys():
    torch.manual_seed(0)
    q, k = torch.randn(3, 6, 8), torch.randn(2, 100, 8)  # 6 query heads share 2 KV heads
    positions = torch.tensor([40, 70, 99])
    got = causal_chunk_mass(q, k, positions, 16)
    assert got.shape == (3, 7)
    torch.testing.assert_close(got.sum(-1), torch.ones(3))
    for i, p in enumerate(positions.tolist()):  # row i = head-mean attention over keys 0..p
        want = chunk_mass(token_attention(q[i: i + 1], k[:, : p + 1]), 16)[0]
        torch.testing.assert_close(got[i, : want.numel()], want)
        assert float(got[i, want.numel():].sum()) == 0.0


def test_layer_votes_count_layers_whose_top_p_set_holds_the_chunk():
    torch.manual_seed(1)
    qs = [torch.randn(4, 4, 8) * 3 for _ in range(3)]
    ks = [torch.randn(2, 96, 8) * 3 for _ in range(3)]
    pos = torch.tensor([60, 70, 80, 95])
    votes = layer_votes(qs, ks, pos, 32, 0.6, block=3)  # blocks smaller than the batch
    want = sum(top_p_mask(causal_chunk_mass(q, k, pos, 32), 0.6).to(torch.uint8) for q, k in zip(qs, ks))
    assert torch.equal(votes, want)
    assert int(votes.max()) <= 3


def test_window_max_is_the_union_of_golden_sets_over_the_next_tau_positions():
    votes = torch.tensor([[1, 0], [0, 3], [2, 0], [0, 0]], dtype=torch.uint8)
    vpos = torch.tensor([10, 11, 12, 20])
    out = window_max(votes, vpos, torch.tensor([9, 10, 12]), tau=2)
    assert out.tolist() == [[1, 3], [2, 3], [0, 0]]  # (9, 11], (10, 12], (12, 14]
    # "golden at some step" == "max votes >= m"
    m = 2
    assert ((out >= m).tolist()) == [[False, True], [True, True], [False, False]]


def test_population_excludes_sink_tail_and_the_unfinished_page():
    pop = Population(chunk_size=32, page_size=64, sink_tokens=64, tail_tokens=128)
    # 1000 tokens: 15 complete pages; sink page 0; tail pages 13, 14 -> chunks 2 .. 25
    assert pop.bounds(999) == (2, 26)
    mask = pop.mask(torch.tensor([999, 100]), 40)
    assert mask[0].nonzero().flatten().tolist() == list(range(2, 26))
    assert not mask[1].any()  # too short: everything is sink or tail


def test_score_metrics_on_a_hand_case():
    pop = torch.ones(20, dtype=torch.bool)
    pop[:2] = pop[-4:] = False                       # forced: 6 of 20 chunks
    labels = torch.zeros(20, dtype=torch.bool)
    labels[[5, 9]] = True
    scores = torch.zeros(20)
    scores[5], scores[7], scores[9] = 0.9, 0.8, 0.3
    m = score_metrics([scores], [labels], [pop], ks=(1, 2), budget=0.4)
    assert m.positives == 2 and m.population == 14
    assert m.recall_at_k == {1: 0.5, 2: 0.5}
    assert m.recall_at_budget == 0.5                 # 40% of 20 = 8 chunks, 6 forced: room for [5, 7]
    assert m.recall_capped == 0.5
    assert score_metrics([scores], [labels], [pop], ks=(1,), budget=0.5).recall_at_budget == 1.0  # room for 4
    assert m.precision == 0.5 and m.recall == 0.5
    assert m.selected_fraction == pytest.approx(2 / 14)
    assert m.resident_fraction == pytest.approx((6 + 2) / 20)


def test_focal_loss_down_weights_easy_examples():
    logits, target = torch.tensor([3.0, -3.0, 0.0]), torch.tensor([1.0, 0.0, 1.0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    fl = focal_bce(logits, target, 2.0)
    p = torch.sigmoid(logits)
    torch.testing.assert_close(fl[0], (1 - p[0]) ** 2 * bce[0])
    assert float(fl[2]) == pytest.approx(0.25 * math.log(2), rel=1e-5)
    torch.testing.assert_close(focal_bce(logits, target, 0.0), bce)
