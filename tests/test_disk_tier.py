"""The disk tier (EngineConfig.host_memory): a history beyond the host cap spills to a file per sequence.

Tiny random-weight models; the cap is a few pages, so most of a 1100-token history lives on disk.
"""

from __future__ import annotations

import os

import pytest
import torch

from flashmemory import EngineConfig, LSAConfig, LSAEngine
from flashmemory.config import ConfigError
from flashmemory.indexer.model import IndexerConfig, NeuralIndexer
from flashmemory.memory.spill import SpillError
from flashmemory.policies.lsa import LSAPolicy

from tiny import hf_greedy, random_prompts, tiny_model

NEW = 150        # more than two cycles of tau=64
PAGES = 20       # host cap in pages (the prompt has 34)
CHUNK = 256      # prefill piece, so the working set fits the cap


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama")
    prompt = random_prompts([1100])[0]
    with LSAEngine(model, LSAConfig()) as engine:
        cap = PAGES * engine.pool.page_bytes
    return model, prompt, cap


def random_lsa(model) -> LSAPolicy:
    """lsa with a random indexer of the tiny model's shape (its scores are arbitrary but deterministic)."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    torch.manual_seed(0)
    indexer = NeuralIndexer(IndexerConfig(d_model=cfg.hidden_size, key_dim=cfg.num_key_value_heads * head_dim,
                                          rope_dim=head_dim, layers=[1, 2], n_heads=2, q_rank=8, chunk_size=32,
                                          key_block=8))
    return LSAPolicy(checkpoint=indexer)


def run(model, prompt, config, policy, engine_config=None, watch=None):
    """Generate one sequence step by step; `watch(engine, seq)` is called after every step."""
    with LSAEngine(model, config, engine_config=engine_config) as engine:
        seq = engine.submit(prompt, policy, max_new_tokens=NEW, stop_at_eos=False)
        while not seq.finished:
            engine.step()
            if watch is not None:
                watch(engine, seq)
        return engine.result(seq), seq


def test_every_chunk_resident_under_a_small_cap_equals_ram_and_transformers(setup):
    model, prompt, cap = setup
    config = LSAConfig(budget=1.0, prefill_chunk=CHUNK)
    ref = hf_greedy(model, prompt, NEW)
    in_ram, _ = run(model, prompt, config, "full")
    host, disk = [], []

    def watch(engine, seq):
        usage = engine.memory()
        host.append(usage.host_bytes)
        disk.append(usage.disk_bytes)

    capped, _ = run(model, prompt, config, "full", EngineConfig(host_memory=cap), watch)
    assert in_ram.token_ids == ref
    assert capped.token_ids == ref
    r = capped.report
    assert max(host) <= cap and r.host_kv_bytes_peak <= cap and r.host_kv_bytes_reserved <= cap
    assert max(disk) > 0 and r.disk_bytes_peak > 0 and r.disk_reads > 0
    assert r.full_kv_bytes > cap  # the history did not fit the cap


@pytest.mark.parametrize("policy", ["lsa", "quest"])
def test_small_cap_keeps_a_sparse_policys_tokens(setup, policy):
    model, prompt, cap = setup
    config = LSAConfig(budget=0.3, prefill_chunk=CHUNK)
    make = (lambda: random_lsa(model)) if policy == "lsa" else (lambda: policy)
    in_ram, _ = run(model, prompt, config, make())
    capped, _ = run(model, prompt, config, make(), EngineConfig(host_memory=cap))
    assert capped.token_ids == in_ram.token_ids
    assert capped.report.resident_fraction_max < 0.5
    assert capped.report.prefetch_hits + capped.report.prefetch_misses > 0
    assert capped.report.host_kv_bytes_peak <= cap


def prefilled_hosts(model, prompt, cap):
    """The prompt's prefilled host mirror all in RAM, and under the host cap `cap`."""
    config = LSAConfig(prefill_chunk=CHUNK)
    with LSAEngine(model, config) as engine:
        ref = engine.prefill(prompt, max_new_tokens=8).host
    with LSAEngine(model, config, engine_config=EngineConfig(host_memory=cap)) as capped:
        host = capped.prefill(prompt, max_new_tokens=8).host
    return ref, host


def test_the_file_holds_exactly_the_spilled_pages(setup):
    model, prompt, cap = setup
    ref, host = prefilled_hosts(model, prompt, cap)
    P, n = host.page_size, len(prompt)
    spilled = host.spilled_pages
    assert spilled and host.allocated_bytes <= cap
    assert len(spilled) * P + host.nbytes // host.shape.bytes_per_token >= n  # every page is somewhere
    assert host.disk_bytes == len(spilled) * host.record_stride  # no other record takes room
    with open(host.path, "rb") as f:
        for page in spilled:
            f.seek(page * host.record_stride)
            raw = bytearray(f.read(host.page_bytes))
            record = torch.frombuffer(raw, dtype=host.shape.dtype).view(2, *ref.k.shape[:2], P, -1)
            hi = min(P, n - page * P)
            assert torch.equal(record[0, :, :, :hi], ref.k[:, :, page * P: page * P + hi])
            assert torch.equal(record[1, :, :, :hi], ref.v[:, :, page * P: page * P + hi])
    path = host.path
    host.close()
    assert not path.exists()


def test_a_boundary_fetches_its_missing_pages_at_once_and_exactly(setup):
    model, prompt, cap = setup
    ref, host = prefilled_hosts(model, prompt, cap)
    P = host.page_size
    cold = [p for p in host.spilled_pages if (p + 1) * P <= len(prompt)][:6]
    before = host.nbytes
    host.fetch(cold + cold[:2])  # repeated pages are read once
    assert host.log.prefetch_misses == len(cold) and host.allocated_bytes <= cap and host.nbytes >= before
    reads = host.log.disk_reads
    for page in cold:  # now served from the host, with the content the in-RAM mirror holds
        k, v = host.span(page * P, P, recall=True)
        assert torch.equal(k, ref.k[:, :, page * P: (page + 1) * P])
        assert torch.equal(v, ref.v[:, :, page * P: (page + 1) * P])
    assert host.log.disk_reads == reads
    host.close()


def test_prefetch_never_blocks_a_step_inside_a_cycle(setup):
    model, prompt, cap = setup
    config = LSAConfig(budget=0.3, prefill_chunk=CHUNK)
    result, seq = run(model, prompt, config, "quest", EngineConfig(host_memory=cap, prefetch_multiple=3.0))
    starts = [c.step for c in seq.cycles]
    events = seq.transfers.disk_events
    # synchronous reads (misses, index and write faults) happen at cycle boundaries only
    assert all(step in starts for step, kind, _ in events if kind in ("miss", "read"))
    # a recall whose page the prefetch read during the previous cycle is served from the host
    for i in range(1, len(starts)):
        fetched = {page for step, kind, page in events if kind == "prefetch" and step == starts[i - 1]}
        missed = {page for step, kind, page in events if kind == "miss" and step == starts[i]}
        assert fetched and not fetched & missed
        assert set(seq.cycles[i - 1].predicted) >= fetched
    assert result.report.prefetch_hits > 0
    assert result.report.prefetch_misses == sum(kind == "miss" for _, kind, _ in events)


def test_the_spill_file_goes_when_the_sequence_ends_or_is_cancelled(setup, tmp_path):
    model, prompt, cap = setup
    config = LSAConfig(budget=0.3, prefill_chunk=CHUNK)
    with LSAEngine(model, config, engine_config=EngineConfig(host_memory=cap, spill_dir=str(tmp_path))) as engine:
        for cancel in (False, True):
            seq = engine.submit(prompt, "quest", max_new_tokens=NEW, stop_at_eos=False)
            while seq.host is None or not seq.host.spilled_pages:
                engine.step()
            path = seq.host.path
            assert path.parent == tmp_path and path.exists()
            if cancel:
                engine.cancel(seq)
            else:
                engine.run([seq])
            assert seq.finished and not path.exists()
    assert os.listdir(tmp_path) == []


def test_bad_disk_tier_settings_give_clear_errors(setup, tmp_path):
    model, _, cap = setup
    with pytest.raises(ConfigError, match="host_memory must be a positive number"):
        EngineConfig(host_memory=0)
    with pytest.raises(ConfigError, match="prefetch_multiple"):
        EngineConfig(host_memory=cap, prefetch_multiple=0.5)
    with pytest.raises(SpillError, match="below the working set"):  # the default prefill piece is 64 pages
        LSAEngine(model, LSAConfig(), engine_config=EngineConfig(host_memory=cap))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SpillError, match="is not writable"):
        LSAEngine(model, LSAConfig(prefill_chunk=CHUNK),
                  engine_config=EngineConfig(host_memory=cap, spill_dir=str(blocker / "spill")))
    with LSAEngine(model, LSAConfig(prefill_chunk=CHUNK), engine_config=EngineConfig(host_memory=cap)) as engine:
        with pytest.raises(SpillError, match="below the working set"):
            engine.submit([1, 2, 3], "quest", config=LSAConfig(prefill_chunk=4096))


def test_a_follow_up_on_a_spilled_context_equals_the_in_ram_one(setup):
    model, prompt, cap = setup
    config = LSAConfig(budget=0.3, prefill_chunk=CHUNK)
    answers = []
    for engine_config in (None, EngineConfig(host_memory=cap)):
        with LSAEngine(model, config, engine_config=engine_config) as engine:
            extended = engine.extend(engine.prefill(prompt, max_new_tokens=NEW), [5, 6, 7])
            answers.append(engine.decode(extended, "quest", stop_at_eos=False).token_ids)
            assert extended.host.spills == (engine_config is not None)
            assert engine_config is None or extended.host.allocated_bytes <= cap
    assert answers[0] == answers[1]


def test_the_command_line_names_a_bad_host_cap(tmp_path, capsys):
    from flashmemory.cli.main import main

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The capital of France is")
    code = main(["generate", "--prompt-file", str(prompt), "--host-memory", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "flashmemory: error: host_memory must be a positive number of bytes" in err
