"""Measured accounting on the real model: device bytes are the bytes held, the budget holds, transfers
happen only at cycle starts, and stop strings stop."""

from __future__ import annotations

import pytest

from flashmemory import LSAConfig, LSAEngine

NEW = 150


@pytest.fixture(scope="module")
def run(backbone, essays):
    """Decode 150 tokens with quest at a 25% budget, reading the engine after every step."""
    ids = backbone.tokenizer(essays)["input_ids"][:2000]
    config = LSAConfig(budget=0.25)
    engine = LSAEngine(backbone, config)
    seq = engine.submit(ids, "quest", max_new_tokens=NEW, stop_at_eos=False)
    steps = []
    while not seq.finished:
        engine.step()
        if seq.cycles and not seq.finished:
            m = engine.memory()
            steps.append({"used": m.device_used_bytes, "pages": len(seq.table), "attended": seq.attended,
                          "attended_bytes": sum(t[:, :, seq.cycle_index[:seq.attended]].nbytes
                                                for t in (engine.pool.k, engine.pool.v)),
                          "length": seq.length, "budget_tokens": config.budget_tokens(seq.cycles[-1].length),
                          "transfers": seq.transfers.recalls + seq.transfers.offloads, "cycle_step": seq.cycle_step,
                          "capacity": m.device_capacity_bytes})
    report = engine.result(seq).report
    engine.close()
    return engine, report, steps, config


def test_reported_device_bytes_are_the_bytes_held(run):
    engine, report, steps, _ = run
    page_bytes = engine.pool.k[:, :, :32].nbytes + engine.pool.v[:, :, :32].nbytes
    assert all(s["used"] == s["pages"] * page_bytes for s in steps)
    assert report.device_pages_bytes_peak == max(s["used"] for s in steps)
    assert report.device_kv_bytes_peak == max(s["attended_bytes"] for s in steps)
    assert steps[-1]["capacity"] == engine.pool.k.untyped_storage().nbytes() + engine.pool.v.untyped_storage().nbytes()
    assert report.full_kv_bytes == (2000 + NEW - 1) * engine.shape.bytes_per_token
    assert engine.memory().device_used_bytes == 0 and engine.memory().host_bytes == 0


def test_budget_is_never_exceeded(run):
    _, report, steps, config = run
    assert report.cycles >= 3
    for s in steps:
        assert s["attended"] <= s["budget_tokens"]
        assert s["attended"] / s["length"] <= config.budget
    assert report.device_kv_bytes_reserved < 0.5 * report.full_kv_bytes  # the reservation itself is budget-sized


def test_no_transfer_inside_a_cycle(run):
    _, report, steps, _ = run
    cycle_starts = set()
    for s in steps:
        if s["cycle_step"] == 1:
            cycle_starts.add(s["length"])
    assert set(report.transfer_steps) <= {r for r in range(NEW) if r % 64 == 0}
    for before, after in zip(steps, steps[1:]):
        if after["cycle_step"] > 1:  # same cycle: nothing moved between the tiers
            assert after["transfers"] == before["transfers"]


def test_stop_strings_stop_and_are_not_output(backbone, essays):
    prompt = backbone.tokenizer.decode(backbone.tokenizer(essays)["input_ids"][:300])
    with LSAEngine(backbone, LSAConfig(budget=1.0)) as engine:
        free = engine.generate(prompt, "full", max_new_tokens=40, stop_at_eos=False)
        stop = free.text.strip().split()[3]
        cut = engine.generate(prompt, "full", max_new_tokens=40, stop_at_eos=False, stop=[stop])
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and free.text.startswith(cut.text)
    assert len(cut.token_ids) < len(free.token_ids)
