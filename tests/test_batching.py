"""Batched, continuous decoding on a tiny random-weight model: budgets, admission, joining, sampling, errors."""

from __future__ import annotations

import pytest
import torch

from flashmemory import (AdmissionError, EngineConfig, GenerationOptionsError, LSAConfig, LSAEngine, PromptError,
                         SamplingParams)

from tiny import hf_greedy, random_prompts, tiny_model

NEW = 70


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def drive(engine, seqs, on_step=None):
    """Step until `seqs` finish, calling on_step(engine) after every step."""
    while any(not s.finished for s in seqs):
        engine.step()
        if on_step:
            on_step(engine)


def test_device_budget_holds_summed_over_sequences_and_returns_to_zero(model):
    config = LSAConfig(budget=0.2)
    prompts = random_prompts((1400, 1700, 2000, 2300))  # long enough for 20% to exceed the working-set floor
    with LSAEngine(model, config, engine_config=EngineConfig(device_memory=30 * 24576)) as engine:  # 30 pages
        capacity = engine.memory().device_capacity_bytes
        seqs = [engine.submit(p, "quest", max_new_tokens=NEW, stop_at_eos=False) for p in prompts]
        seen = []

        def check(e):
            m = e.memory()
            seen.append(m)
            assert m.device_used_bytes <= m.device_reserved_bytes <= capacity
            for s in e.running:
                if s.cycles:  # the sequence's own budget: attended tokens / history
                    assert s.attended / s.length <= config.budget + 1e-9
        drive(engine, seqs, check)
        assert max(m.running for m in seen) >= 2 and max(m.waiting for m in seen) >= 1  # some had to wait
        end = engine.memory()
        assert end.device_used_bytes == 0 and end.device_reserved_bytes == 0 and end.host_bytes == 0
        assert all(engine.result(s).report.resident_fraction_max <= config.budget for s in seqs)


def test_sequence_joining_mid_run_does_not_change_running_tokens(model):
    a, b = random_prompts((1300, 1700))
    with LSAEngine(model, LSAConfig(budget=0.3)) as engine:
        alone = engine.generate(a, "quest", max_new_tokens=NEW, stop_at_eos=False).token_ids
        first = engine.submit(a, "quest", max_new_tokens=NEW, stop_at_eos=False)
        for _ in range(20):
            engine.step()
        assert len(first.output_ids) > 5
        late = engine.submit(b, "quest", max_new_tokens=NEW, stop_at_eos=False)
        engine.run([first, late])
        assert engine.result(first).token_ids == alone
        assert engine.result(late).token_ids == engine.generate(b, "quest", max_new_tokens=NEW,
                                                                stop_at_eos=False).token_ids


def test_long_prefill_is_cut_into_pieces_between_decode_steps(model):
    short, long = random_prompts((300, 3000))
    with LSAEngine(model, LSAConfig(budget=1.0, prefill_chunk=512)) as engine:
        running = engine.submit(short, "full", max_new_tokens=40, stop_at_eos=False)
        engine.step()
        newcomer = engine.submit(long, "full", max_new_tokens=4, stop_at_eos=False)
        decoded_during_prefill = 0
        while newcomer.prefilled < len(long):
            before = len(running.output_ids)
            engine.step()
            decoded_during_prefill += len(running.output_ids) - before
        assert decoded_during_prefill >= 5  # 3000 tokens in 512-token pieces: one decode token per piece
        engine.run([running, newcomer])


def test_cancel_frees_pages_and_host_at_once(model):
    events = []
    with LSAEngine(model, LSAConfig(budget=0.3)) as engine:
        seq = engine.submit(random_prompts((1500,))[0], "quest", max_new_tokens=NEW, on_token=events.append)
        for _ in range(10):
            engine.step()
        assert engine.memory().device_used_bytes > 0 and engine.memory().host_bytes > 0
        engine.cancel(seq)
        m = engine.memory()
        assert (m.device_used_bytes, m.device_reserved_bytes, m.host_bytes, m.running) == (0, 0, 0, 0)
        assert seq.finish_reason == "cancelled" and events[-1].finished


def test_admission_waits_for_pages_and_rejects_what_never_fits(model):
    prompt = random_prompts((1500,))[0]
    page = 32 * 2 * 3 * 2 * 16 * 4  # page tokens * (K, V) * layers * kv heads * head dim * fp32
    full_pages = (1500 + 8) // 32 + LSAConfig().open_pages
    with LSAEngine(model, LSAConfig(budget=1.0), engine_config=EngineConfig(device_memory=full_pages * page)) as engine:
        a = engine.submit(prompt, "full", max_new_tokens=8, stop_at_eos=False)
        b = engine.submit(prompt, "full", max_new_tokens=8, stop_at_eos=False)
        engine.step()
        assert engine.memory().running == 1 and engine.memory().waiting == 1
        engine.run([a, b])
        assert engine.result(a).token_ids == engine.result(b).token_ids
        with pytest.raises(AdmissionError, match="more than the engine's device_memory"):
            engine.submit(random_prompts((3000,))[0], "full", max_new_tokens=8)


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(model):
    prompts = random_prompts((1100, 1200))
    with LSAEngine(model, LSAConfig(budget=0.3)) as engine:
        opts = dict(max_new_tokens=30, temperature=0.9, top_p=0.9, top_k=50, seed=7, stop_at_eos=False)
        one = engine.generate(prompts[0], "quest", **opts).token_ids
        again = engine.generate(prompts[0], "quest", **opts).token_ids
        batch = engine.generate(prompts, "quest", **opts)
        other_seed = engine.generate(prompts[0], "quest", **{**opts, "seed": 8}).token_ids
    assert one == again == batch[0].token_ids
    assert one != other_seed


@pytest.mark.parametrize("options, message", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"stop": [""]}, "stop"), ({"seed": "x"}, "seed"),
    ({"temprature": 0.5}, "unknown generation option"),
])
def test_bad_generation_options_get_clear_errors(model, options, message):
    with LSAEngine(model) as engine:
        with pytest.raises(GenerationOptionsError, match=message):
            engine.generate([1, 2, 3], "full", **options)


def test_bad_prompts_and_engine_settings(model):
    with LSAEngine(model) as engine:
        with pytest.raises(PromptError, match="token ids must be integers"):
            engine.generate([1, 2, 10**6], "full")
        with pytest.raises(PromptError, match="no tokenizer"):
            engine.generate("text needs a tokenizer", "full")
        with pytest.raises(PromptError, match="exceeds the model's context"):
            engine.generate([1] * 4090, "full", max_new_tokens=10)
        with pytest.raises(ValueError, match="page_size 64 differs"):
            engine.generate([1, 2, 3], "full", config=LSAConfig(chunk_size=32, page_size=64))
    with pytest.raises(ValueError, match="device_memory"):
        EngineConfig(device_memory=-5)
    with pytest.raises(ValueError, match="decode_token_weight must be a number >= 0"):
        EngineConfig(decode_token_weight=-1)
    with pytest.raises(AdmissionError, match="holds no page"):
        LSAEngine(model, engine_config=EngineConfig(device_memory=100))
    with pytest.raises(GenerationOptionsError):
        SamplingParams(max_new_tokens=True)


def test_context_manager_removes_hooks(model):
    before = sum(len(layer.self_attn._forward_pre_hooks) for layer in model.model.layers)
    with LSAEngine(model):
        assert sum(len(layer.self_attn._forward_pre_hooks) for layer in model.model.layers) == before + 3
    assert sum(len(layer.self_attn._forward_pre_hooks) for layer in model.model.layers) == before


def test_streaming_callback_sees_every_token(model):
    events = []
    with LSAEngine(model) as engine:
        result = engine.generate(random_prompts((200,))[0], "full", max_new_tokens=12, stop_at_eos=False,
                                 on_token=events.append)
    assert [e.token_id for e in events] == result.token_ids
    assert events[-1].finished and events[-1].finish_reason == "length" and not any(e.finished for e in events[:-1])
    torch.testing.assert_close(torch.tensor(len(events)), torch.tensor(12))


def test_hybrid_model_keeps_only_windows_on_the_device_and_tiers_global_layers():
    from tiny import tiny_gemma3

    model = tiny_gemma3(window=64)
    prompts = random_prompts((1400, 1700))
    with LSAEngine(model, LSAConfig(budget=0.25)) as engine:
        assert engine.layout.sliding == (0, 2) and engine.layout.tiered == (1, 3)
        seqs = [engine.submit(p, "quest", max_new_tokens=NEW, stop_at_eos=False) for p in prompts]

        def check(e):
            window_storage = e.window_pool.k.untyped_storage().nbytes() + e.window_pool.v.untyped_storage().nbytes()
            ring_bytes = window_storage // (e.window_pool.k.shape[2] // 64)  # one 64-token ring per slot
            pages = sum(len(s.table) for s in e.running) * e.pool.page_bytes
            assert e.memory().device_used_bytes == pages + ring_bytes * len(e.running)
            assert e.memory().device_capacity_bytes == window_storage + e.pool.k.untyped_storage().nbytes() * 2
        drive(engine, seqs[:1], check)
        engine.run(seqs)
        report = engine.result(seqs[1]).report
    assert report.tiered_layers == [1, 3]
    assert report.device_window_bytes == 64 * 2 * 2 * 1 * 16 * 4  # window * (K, V) * sliding layers * kv * dim * fp32
    assert report.resident_fraction_max <= 0.25
    assert 0 < report.model_kv_share < 1


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_decode_tokens_share_the_prompt_pieces_forward_and_still_match_transformers(arch):
    model = tiny_model(arch)  # gemma3: a 64-token window, so pieces past the first mask their window explicitly
    short, long = random_prompts((200, 1500))
    forwards = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: forwards.append(tuple(kwargs["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        with LSAEngine(model, LSAConfig(budget=1.0, prefill_chunk=256),
                       engine_config=EngineConfig(decode_token_weight=3.0)) as engine:
            running = engine.submit(short, "full", max_new_tokens=40, stop_at_eos=False)
            engine.step()
            late = engine.submit(long, "full", max_new_tokens=12, stop_at_eos=False)
            sizes = []
            while late.prefilled < len(long):
                before, calls = len(running.output_ids), len(forwards)
                engine.step()
                assert len(forwards) == calls + 1  # one forward per step: the decode token rides with the piece
                assert len(running.output_ids) == before + 1
                sizes.append(forwards[-1][1])
            engine.run([running, late])
    finally:
        hook.remove()
    # the first piece is the chunk less 3 tokens for the decode token beside it; later ones attend over
    # more history and shrink to cost about as much, down to a quarter chunk
    assert sizes[0] == 1 + 256 - 3 and sizes == sorted(sizes, reverse=True) and min(sizes[:-1]) >= 64 + 1
    assert sizes[-2] < sizes[0]
    assert engine.result(running).token_ids == hf_greedy(model, short, 40)
    assert engine.result(late).token_ids == hf_greedy(model, long, 12)
