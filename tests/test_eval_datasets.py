"""Benchmark loaders on small files in the official formats (tests/fixtures), and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flashmemory.eval.datasets import (DataPaths, load_dataset_task, load_infinitebench, load_longbench_v2,
                                       load_longmemeval, middle_truncate)
from flashmemory.eval.samples import EvalDataError, PromptBuilder

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def builder(backbone):
    return PromptBuilder(backbone.tokenizer, chat=True, max_context=backbone.max_context)


def test_longbench_v2_loads_and_truncates_in_the_middle(builder):
    samples = load_longbench_v2(FIX / "longbench_v2", builder, 10, 1024)
    assert [s.answers for s in samples] == [["B"], ["C"], ["A"]]
    long = samples[2]
    assert long.meta["truncated"] and not samples[0].meta["truncated"]
    n = len(builder.sample_ids(long))
    assert n <= long.target_length and n >= long.target_length - 16
    # the cut keeps the start (instruction) and the end (question, choices, format line)
    assert long.input.startswith("Please read the following text")
    assert "(D) 1750" in long.input and long.input.rstrip().endswith('"The correct answer is (insert answer here)".')
    assert long.answer_prefix == "The correct answer is ("
    assert [s.id for s in load_longbench_v2(FIX / "longbench_v2" / "data.json", builder, 5, 1024, "medium")] == [
        "longbench_v2_medium-66f36490821e116aacb2cc23"]


def test_infinitebench_tasks(builder):
    paths = DataPaths(infinitebench=FIX / "infinitebench")
    pk = load_dataset_task("infinitebench_passkey", paths, builder, 5, 1024)
    assert [s.answers for s in pk] == [["71432"], ["58206"]]
    assert pk[1].meta["truncated"] and len(builder.sample_ids(pk[1])) <= pk[1].target_length
    assert "What is the pass key?" in pk[1].input  # the question survives the middle cut
    kv = load_dataset_task("infinitebench_kv_retrieval", paths, builder, 1, 2048)
    assert len(kv) == 1 and kv[0].answers[0] in kv[0].input and kv[0].metric == "kv_words"
    ns = load_infinitebench("number_string", FIX / "infinitebench", builder, 2, 2048)
    assert ns[0].answers == ["4819305527"] and ns[0].metric == "int_match"


def test_longmemeval(builder):
    samples = load_longmemeval(FIX / "longmemeval" / "longmemeval_s.json", builder, 5, 2048)
    assert [s.meta["abstention"] for s in samples] == [False, True]
    first = samples[0]
    assert "Business Administration" in first.input and first.input.rstrip().endswith("Answer:")
    assert "Current Date: 2023/05/30 (Tue) 23:40" in first.input
    cut = load_longmemeval(FIX / "longmemeval", builder, 1, 300)[0]
    assert cut.meta["truncated"] and len(builder.sample_ids(cut)) <= cut.target_length + 8
    assert "Question: What degree did I graduate with?" in cut.input


def test_middle_truncate(builder):
    text = " ".join(f"w{i}" for i in range(2000))
    cut, truncated = middle_truncate(builder, text, 100)
    assert truncated and cut.startswith("w0 w1") and cut.endswith("w1999")
    assert abs(len(builder.tokenizer(cut, add_special_tokens=False)["input_ids"]) - 100) <= 4
    assert middle_truncate(builder, "short", 100) == ("short", False)


def test_missing_and_malformed_files_give_clear_errors(builder, tmp_path):
    with pytest.raises(EvalDataError, match="pass --longbench-v2"):
        load_dataset_task("longbench_v2", DataPaths(), builder, 1, 1024)
    with pytest.raises(EvalDataError, match="file not found"):
        load_longbench_v2(tmp_path / "nope.json", builder, 1, 1024)
    with pytest.raises(EvalDataError, match="none of passkey.jsonl"):
        load_infinitebench("passkey", tmp_path, builder, 1, 1024)
    bad = tmp_path / "data.json"
    bad.write_text('[{"_id": "a", "question": "q"', encoding="utf-8")
    with pytest.raises(EvalDataError, match="not valid JSON"):
        load_longbench_v2(bad, builder, 1, 1024)
    bad.write_text(json.dumps([{"_id": "a", "question": "q", "answer": "A", "context": "c"}]), encoding="utf-8")
    with pytest.raises(EvalDataError, match="lacks field"):
        load_longbench_v2(bad, builder, 1, 1024)
    lines = tmp_path / "passkey.jsonl"
    lines.write_text('{"id": 0, "context": "c", "input": "i", "answer": ["1"]}\n{oops\n', encoding="utf-8")
    with pytest.raises(EvalDataError, match="line 2 is not valid JSON"):
        load_infinitebench("passkey", tmp_path, builder, 1, 1024)
    with pytest.raises(EvalDataError, match="not supported"):
        load_infinitebench("math_calc", tmp_path, builder, 1, 1024)
    lme = tmp_path / "longmemeval_s.json"
    lme.write_text(json.dumps([{"question_id": "q", "question": "?", "answer": "a", "haystack_sessions": [[]],
                                "haystack_dates": []}]), encoding="utf-8")
    with pytest.raises(EvalDataError, match="differ in length"):
        load_longmemeval(lme, builder, 1, 1024)
