"""Scorers against hand-made cases."""

from __future__ import annotations

import pytest

from flashmemory.eval.samples import Sample
from flashmemory.eval.scoring import (extract_choice, first_int, kv_words, memory_judge, score, string_match_all,
                                      string_match_part, token_f1)


def _sample(metric: str, answers: list[str], prefix: str = "", **meta) -> Sample:
    return Sample(id="x", task="t", input="...", answers=answers, metric=metric, max_new_tokens=8,
                  answer_prefix=prefix, meta=meta)


def test_ruler_string_match_all_and_part():
    assert string_match_all(" 1234567.", ["1234567"]) == 1.0
    assert string_match_all("The numbers are 111 and 333.", ["111", "222", "333", "444"]) == 0.5
    assert string_match_all("ABC", ["abc"]) == 1.0          # case-insensitive, as RULER
    assert string_match_all("nothing", ["1234567"]) == 0.0
    assert string_match_part("It is 222.", ["111", "222"]) == 1.0
    assert string_match_part("It is 999.", ["111", "222"]) == 0.0


def test_longbench_v2_answer_extraction():
    assert extract_choice("The correct answer is (B)") == "B"
    assert extract_choice("**The correct answer is (C)**.") == "C"
    assert extract_choice("The correct answer is D because ...") == "D"
    assert extract_choice("I think (A)") is None
    assert extract_choice("The correct answer is (E)") is None
    # the prompt primes "The correct answer is (": the continuation "B)" completes it
    assert score("B) Ada Thorne", _sample("choice", ["B"], prefix="The correct answer is (")) == 1.0
    assert score("C)", _sample("choice", ["B"], prefix="The correct answer is (")) == 0.0
    assert score("no idea", _sample("choice", ["B"], prefix="The correct answer is (")) == 0.0


def test_infinitebench_exact_match():
    assert first_int("The pass key is 71432. Remember") == "71432"
    assert first_int("no digits") == ""
    assert score(" 71432.", _sample("int_match", ["71432"])) == 1.0
    assert score(" 714320", _sample("int_match", ["71432"])) == 0.0    # exact, not a substring
    assert score("7 1432", _sample("int_match", ["71432"])) == 0.0
    assert score("is 4819305527 and", _sample("int_match", ["4819305527"])) == 1.0
    assert kv_words('"a1-b2": "c3-d4",') == ["a1-b2", "c3-d4"]
    assert score(' "c3-d4".', _sample("kv_words", ["c3-d4"])) == 1.0
    assert score(' "c3-d4x".', _sample("kv_words", ["c3-d4"])) == 0.0


def test_token_f1():
    assert token_f1("Ada Thorne", "Ada Thorne") == 1.0
    assert token_f1("The mason Ada Thorne built it", "Ada Thorne") == pytest.approx(2 * (2 / 5) * 1 / (2 / 5 + 1))
    assert token_f1("nobody", "Ada Thorne") == 0.0
    assert score("Ada", _sample("qa_f1", ["Ada Thorne", "Ada"])) == 1.0


def test_longmemeval_lexical_judge():
    assert memory_judge("You graduated with a degree in Business Administration.", ["Business Administration"]) == 1.0
    assert memory_judge("business administration", ["Business Administration"]) == 1.0
    assert memory_judge("Computer Science.", ["Business Administration"]) == 0.0
    assert memory_judge("You did not mention a cat.", ["You did not mention a cat."], abstention=True) == 1.0
    assert memory_judge("Your cat is Tom.", ["You did not mention a cat."], abstention=True) == 0.0
    assert score("I don't know your cat's name.", _sample("memory_judge", ["n/a"], abstention=True)) == 1.0


def test_unknown_metric_is_an_error():
    with pytest.raises(ValueError, match="unknown metric"):
        score("x", _sample("bleu", ["x"]))
