"""Measured accounting: device bytes are the bytes really held, the budget holds, transfers only at cycle starts."""

from __future__ import annotations

import pytest
import torch

from flashmemory import LSACache, LSAConfig
from flashmemory.memory.page_table import PageTable

NEW = 150


@pytest.fixture(scope="module")
def run(backbone, essays):
    """Decode 150 tokens with quest at a 25% budget, checking the cache after every step."""
    ids = backbone.tokenizer(essays)["input_ids"][:2000]
    config = LSAConfig(budget=0.25)
    cache = LSACache(backbone.model, config, policy="quest", max_length=len(ids) + NEW)
    steps = []
    with torch.no_grad():
        out = backbone.model(input_ids=torch.tensor([ids]), past_key_values=cache, logits_to_keep=1)
        token = out.logits[0, -1].argmax()
        for _ in range(NEW):
            out = backbone.model(input_ids=token.view(1, 1), past_key_values=cache)
            token = out.logits[0, -1].argmax()
            device_tensors = [cache.reserve.k, cache.reserve.v]
            steps.append({
                "storage_bytes": sum(t.untyped_storage().nbytes() for t in device_tensors),
                "active_bytes": sum(t[:, :, : cache._active].nbytes for t in device_tensors),
                "reported_active": cache.device_kv_bytes,
                "active_tokens": cache._active,
                "length": cache.length,
                "budget_tokens": config.budget_tokens(cache.stats.cycles[-1].length),
                "pages": len(cache.table),
                "recalls": cache.stats.transfers.recalls + cache.stats.transfers.offloads,
                "cycle_step": cache._cycle_step,
            })
    cache.close()
    return cache, steps, config


def test_reported_device_bytes_are_the_bytes_held(run):
    cache, steps, _ = run
    assert all(s["reported_active"] == s["active_bytes"] for s in steps)
    assert cache.stats.memory.device_kv_bytes_peak == max(s["active_bytes"] for s in steps)
    assert cache.stats.memory.device_reserved_bytes == steps[-1]["storage_bytes"]
    # the host mirror holds every token up to the last cycle start; newer ones wait in the open region
    assert cache.full_kv_bytes == cache.length * cache.shape.bytes_per_token
    assert cache.host.length == cache.stats.cycles[-1].length
    assert cache.host_kv_bytes == cache.host.length * cache.shape.bytes_per_token


def test_budget_is_never_exceeded(run):
    cache, steps, config = run
    assert len(cache.stats.cycles) >= 3
    for s in steps:
        assert s["active_tokens"] <= s["budget_tokens"]
        assert s["active_tokens"] / s["length"] <= config.budget
        assert s["storage_bytes"] < 0.5 * cache.full_kv_bytes  # the reserve itself is budget-sized


def test_no_transfer_inside_a_cycle(run):
    cache, steps, _ = run
    cycle_starts = {c.step for c in cache.stats.cycles}
    assert set(cache.stats.transfers.steps) <= cycle_starts
    for before, after in zip(steps, steps[1:]):
        if after["cycle_step"] > 1:  # same cycle: nothing moved between the tiers
            assert after["recalls"] == before["recalls"]


def test_page_table_stays_compact_and_keeps_order_when_growing():
    table = PageTable(8)
    moves = table.plan([0, 1, 2])
    assert [m.slot for m in moves] == [0, 1, 2] and all(m.source == "host" for m in moves)
    moves = table.plan([0, 2, 5, 6])  # evict 1, recall 5 into its slot, 6 appended
    assert table.slot_of == {0: 0, 5: 1, 2: 2, 6: 3}
    moves = table.plan([6])  # holes closed by moving the last page down
    assert table.slot_of == {6: 0} and moves[-1].source == "device"
    with pytest.raises(ValueError, match="reserve holds"):
        table.plan(list(range(9)))
