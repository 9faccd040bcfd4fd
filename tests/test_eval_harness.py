"""End-to-end evaluation on the real default model: shared prefills, failures per policy, resume, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flashmemory.config import LSAConfig
from flashmemory.eval import DataPaths, EvalSettings, evaluate, summarize, write_report
from flashmemory.eval.samples import EvalDataError, PromptBuilder
from flashmemory.policies import BudgetError, SelectionPolicy, make_policy, policy_names, register_policy
from flashmemory.runtime.engine import LSAEngine

FIX = Path(__file__).parent / "fixtures"
CONFIG = LSAConfig(page_size=32, sink_tokens=32, tail_tokens=128, budget=0.4)


def _settings() -> EvalSettings:
    # budget 0.02 is below the working set (sink + tail + one cycle): those runs keep the working set
    return EvalSettings(tasks=["niah_single_1", "infinitebench_passkey"], length=1024, samples=2,
                        policies=["full", "recency", "quest"], budgets=[0.02, 0.4], config=CONFIG,
                        data=DataPaths(infinitebench=FIX / "infinitebench"))


@pytest.fixture(scope="module")
def engine(backbone):
    return LSAEngine(backbone, CONFIG)


@pytest.fixture(scope="module")
def first(engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "results.jsonl"
    calls = []
    original = engine.prefill

    def counting_prefill(ids, max_new_tokens=64):
        calls.append(len(ids))
        return original(ids, max_new_tokens)

    engine.prefill = counting_prefill
    try:
        run = evaluate(engine, _settings(), path, progress=False)
    finally:
        del engine.prefill
    return path, run, calls


def test_every_policy_shares_one_prefill_per_sample(first, backbone):
    path, run, calls = first
    assert len(run.samples) == 4 and len(calls) == 4
    assert len(run.records) == 4 * (1 + 2 * 2)   # full once, the others at each budget
    assert run.reused == 0
    # the harness feeds the engine exactly the prompt the generators measured
    builder = PromptBuilder(backbone.tokenizer, chat=True)
    by_id = {smp.id: smp for smp in run.samples}
    assert sorted(calls) == sorted(len(builder.sample_ids(smp)) for smp in run.samples)
    for r in run.records:
        assert r["prompt_tokens"] == len(builder.sample_ids(by_id[r["sample_id"]]))


def test_a_budget_below_the_working_set_keeps_the_working_set(first):
    _, run, _ = first
    floor = CONFIG.with_(budget=0.02).budget_tokens(0)   # sink + tail + one cycle, in tokens
    for r in run.records:
        assert r["error"] is None and 0.0 <= r["score"] <= 1.0
        if r["budget"] == 0.02:
            assert 0.02 < r["report"]["resident_fraction_max"] <= floor / r["prompt_tokens"]


class FailingPolicy(SelectionPolicy):
    """A policy whose every selection fails, as a policy that cannot hold its budget would."""

    name = "failing-for-test"

    def score(self, ctx):
        raise BudgetError("this policy cannot hold its budget")


def test_policy_failures_are_recorded_not_raised(engine, tmp_path):
    register_policy(FailingPolicy)
    settings = EvalSettings(tasks=["niah_single_1"], length=1024, samples=1, policies=["full", FailingPolicy.name],
                            budgets=[0.2], config=CONFIG)
    run = evaluate(engine, settings, tmp_path / "results.jsonl", progress=False)
    by_policy = {r["policy"]: r for r in run.records}
    assert by_policy["full"]["error"] is None
    failed = by_policy[FailingPolicy.name]
    assert failed["score"] is None and failed["error"] == "BudgetError: this policy cannot hold its budget"
    paths = write_report(run, tmp_path / "report")
    assert "BudgetError" in paths["markdown"].read_text()


def test_full_answers_and_sparse_policies_stay_in_budget(first):
    _, run, _ = first
    rows = {(r["task"], r["policy"], r["budget"]): r for r in summarize(run.records)}
    assert rows[("niah_single_1", "full", 1.0)]["accuracy"] >= 50.0   # the prompt design lets full answer
    assert rows[("niah_single_1", "full", 1.0)]["resident_fraction_max"] == pytest.approx(1.0)
    for policy in ("recency", "quest"):
        row = rows[("average", policy, 0.4)]
        assert 0.0 < row["resident_fraction_max"] <= 0.4 + 1e-9
        assert row["device_kv_bytes_max"] < rows[("average", "full", 1.0)]["device_kv_bytes_max"]
        assert row["recalls"] > 0 and row["decode_ms_per_token"] > 0
        assert rows[("average", policy, 0.02)]["accuracy"] is not None
        assert rows[("average", policy, 0.02)]["errors"] == 0
    # quest's per-chunk key min/max is measured: 2 fp32 keys per 32-token chunk and layer against a
    # key and a value per token (1/32 of the cache in fp32, 1/16 against a 16-bit cache)
    quest = rows[("average", "quest", 0.4)]
    assert 0.02 < quest["index_bytes_mean"] / quest["full_kv_bytes_mean"] < 0.07
    assert rows[("average", "recency", 0.4)]["index_bytes_mean"] == 0
    assert rows[("average", "full", 1.0)]["index_bytes_mean"] == 0


def test_rerun_reuses_every_cached_result(engine, first):
    path, run, _ = first
    again = evaluate(engine, _settings(), path, progress=False)
    assert again.reused == len(run.records)
    assert again.records == run.records


def test_interrupted_run_resumes_where_it_stopped(engine, first, tmp_path):
    path, run, _ = first
    lines = path.read_text().splitlines()
    partial = tmp_path / "results.jsonl"
    # 13 finished results (5 per sample), then a line cut short by the interruption
    partial.write_text("\n".join(lines[:13]) + "\n" + lines[13][:40], encoding="utf-8")
    calls = []
    original = engine.prefill
    engine.prefill = lambda ids, max_new_tokens=64: calls.append(1) or original(ids, max_new_tokens)
    try:
        resumed = evaluate(engine, _settings(), partial, progress=False)
    finally:
        del engine.prefill
    assert resumed.reused == 13
    assert len(calls) == 2   # samples 1-2 were done, sample 3 half done: only samples 3 and 4 are prefilled
    assert [(r["sample_id"], r["policy"], r["budget"], r["prediction"]) for r in resumed.records] == \
           [(r["sample_id"], r["policy"], r["budget"], r["prediction"]) for r in run.records]


def test_report_files(first, tmp_path):
    _, run, _ = first
    paths = write_report(run, tmp_path / "out", json_out=tmp_path / "r.json")
    md = paths["markdown"].read_text()
    assert "Table 1" in md and "| niah_single_1 |" in md
    data = json.loads(paths["json"].read_text())
    assert {"summary", "records", "settings", "samples"} <= set(data)
    assert any(r["task"] == "average" and r["policy"] == "full" for r in data["summary"])
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_settings_are_checked():
    with pytest.raises(EvalDataError, match="unknown task"):
        EvalSettings(tasks=["bogus"])
    with pytest.raises(EvalDataError, match="--samples"):
        EvalSettings(tasks=["single"], samples=0)
    assert EvalSettings(tasks=["single", "niah_single_1"]).tasks == ["niah_single_1", "niah_single_2", "niah_single_3"]


def test_a_prompt_without_room_for_its_answer_is_refused_before_any_prefill(engine, tmp_path):
    settings = EvalSettings(tasks=["niah_single_1", "niah_single_2"], length=4096, samples=1, policies=["full"],
                            max_new_tokens=6000, config=CONFIG)
    path = tmp_path / "results.jsonl"
    with pytest.raises(EvalDataError, match="leave no room for 6000 new tokens in a 8192-token context"):
        evaluate(engine, settings, path, progress=False)
    assert not path.exists()  # nothing ran


def test_cli_eval(tmp_path, capsys):
    from flashmemory.cli.main import main

    out = tmp_path / "cli"
    rc = main(["eval", "--tasks", "niah_single_1", "--length", "1024", "--samples", "1", "--policies",
               "full,recency", "--budget", "0.4", "--out", str(out), "--json-out", str(tmp_path / "x.json"), "--quiet"])
    assert rc == 0
    assert (out / "report.md").is_file() and (out / "accuracy_vs_resident.png").is_file()
    settings = json.loads((tmp_path / "x.json").read_text())["settings"]
    assert settings["policies"] == ["full", "recency"]
    assert settings["chat"] is True  # the default model has a chat template, so it is used unless --no-chat
    assert "Table 1" in capsys.readouterr().out
    assert main(["eval", "--tasks", "nope", "--out", str(out)]) == 2
    assert "flashmemory: error: unknown task" in capsys.readouterr().err
    # a learned policy that cannot be set up is a clear error before any prefill, never a silent stand-in
    args = ["eval", "--tasks", "niah_single_1", "--policies", "full,lsa", "--out", str(out)]
    if "lsa" in policy_names():
        args += ["--indexer", str(tmp_path / "no-such-indexer")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "flashmemory: error:" in err and "lsa" in err


def test_cached_results_are_keyed_by_the_indexer_weights_and_config():
    # a retrained checkpoint at the same path (or a new shipped default) must not reuse old results,
    # nor may the same weights scoring at another key resolution
    import copy

    import torch

    from flashmemory.eval.harness import policy_identity
    from flashmemory.indexer.model import IndexerConfig, NeuralIndexer
    from flashmemory.policies.lsa import LSAPolicy

    torch.manual_seed(0)
    cfg = IndexerConfig(d_model=16, key_dim=8, rope_dim=8, layers=[1], n_heads=2, q_rank=4,
                        chunk_size=32, key_block=8)
    a, b = NeuralIndexer(cfg), NeuralIndexer(cfg)
    ident_a = policy_identity(LSAPolicy(checkpoint=a), {})
    assert ident_a == policy_identity(LSAPolicy(checkpoint=a), {})
    assert ident_a != policy_identity(LSAPolicy(checkpoint=b), {})
    finer = policy_identity(LSAPolicy(checkpoint=copy.deepcopy(a), fine_key_block=2), {})
    assert finer["weights"] == ident_a["weights"] and finer != ident_a
    assert policy_identity(make_policy("quest"), {}) == {}
