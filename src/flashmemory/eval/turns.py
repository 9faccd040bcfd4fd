"""Running a multi-question sample: one prefill of the document, then every question in turn per policy.

Each (policy, budget) holds one conversation: question 1 is appended to the prefilled document,
question 2 after answer 1, and so on (`LSAEngine.ask`). The record keeps every turn's prediction,
score and report; its `score` is the mean over the turns, and `positions` in the report gives
accuracy by question position. kvzip's reconstruction is timed (`scoring_forward_seconds`) and
set beside the document's prefill time.
"""

from __future__ import annotations

from ..config import LSAConfig
from ..policies import SelectionPolicy
from ..runtime.engine import LSAEngine
from ..runtime.saved import context_ids
from .multi import MultiSample
from .scoring import string_match_all

TURN_REPORT_FIELDS = ("prompt_tokens", "new_tokens", "cycles", "resident_fraction_mean", "resident_fraction_max",
                      "device_kv_bytes_peak", "full_kv_bytes", "transfers", "prefill_seconds",
                      "scoring_forward_seconds", "decode_ms_per_token", "evicted_pages")


def prefill_document(engine: LSAEngine, sample: MultiSample, chat: bool, tau: int):
    """The document's prefill, with room for one answer and a cycle of lookahead."""
    ids = context_ids(engine, sample.document, chat=chat)
    return ids, engine.prefill(ids, max_new_tokens=sample.max_new_tokens + tau)


def converse(engine: LSAEngine, prefill, sample: MultiSample, policy: SelectionPolicy, config: LSAConfig,
             chat: bool) -> tuple[list[dict], float]:
    """Ask every question of `sample` in turn; returns each turn's outcome and the record's score."""
    turns, result = [], None
    for position, q in enumerate(sample.questions, start=1):
        result = engine.ask(prefill if result is None else result, q.question, policy, chat=chat,
                            answer_prefix=q.answer_prefix, config=config, max_new_tokens=sample.max_new_tokens)
        report = result.report.to_dict()
        turns.append({"position": position, "question": q.question, "answers": q.answers, "depth": q.depth,
                      "prediction": result.text, "score": string_match_all(result.text.strip(), q.answers),
                      "report": {k: report[k] for k in TURN_REPORT_FIELDS}})
    return turns, sum(t["score"] for t in turns) / len(turns)
