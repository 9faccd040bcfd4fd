"""Loaders for LongBench-v2, InfiniteBench and LongMemEval from local files in their official formats.

Nothing is downloaded: point the harness at files you already have.
  - LongBench-v2: `data.json` (a JSON list; JSON Lines also accepted) with fields _id, question,
    choice_A..choice_D, answer (a letter), context, and optionally domain, difficulty, length.
  - InfiniteBench: one JSON Lines file per task, named as released (passkey.jsonl,
    number_string.jsonl, kv_retrieval.jsonl, longbook_qa_eng.jsonl); fields id, context, input, answer.
  - LongMemEval: longmemeval_s.json / longmemeval_m.json / longmemeval_oracle.json (a JSON list)
    with question_id, question_type, question, answer, question_date, haystack_dates, haystack_sessions.
Prompts that do not fit are cut in the middle (first half + last half of the tokens), as the
original evaluation scripts do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .ruler import prompt_target
from .samples import EvalDataError, PromptBuilder, Sample

LONGBENCH_V2_TEMPLATE = (
    "Please read the following text and answer the question below.\n\n<text>\n{context}\n</text>\n\n"
    "What is the correct answer to this question: {question}\nChoices:\n(A) {A}\n(B) {B}\n(C) {C}\n(D) {D}\n\n"
    'Format your response as follows: "The correct answer is (insert answer here)".')

INFINITEBENCH = {  # task -> (template, answer prefix, metric, max new tokens)
    "passkey": ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information there.\n\n{context}\n\n{input}",
                "The pass key is", "int_match", 12),
    "number_string": ("There is an important info hidden inside a lot of irrelevant text. Find it. "
                      "I will quiz you about the important information there.\n\n{context}\n\n{input}",
                      "The sequence of digits is", "int_match", 16),
    "kv_retrieval": ("Extract the value corresponding to the specified key in the JSON object below.\n\n"
                     "{context}\n\n{input}", "The value associated with the specified key is:", "kv_words", 56),
    "longbook_qa_eng": ("Read the book below and answer a question.\n\n{context}\n\nQuestion: {input}\n\n"
                        "Be very concise.", "Answer:", "qa_f1", 32),
}

LONGMEMEVAL_TEMPLATE = ("I will give you several history chats between you and a user. Please answer the question "
                        "based on the relevant chat history.\n\n\nHistory Chats:\n\n{history}\n\nCurrent Date: {date}\n"
                        "Question: {question}\nAnswer:")


def middle_truncate(builder: PromptBuilder, text: str, max_tokens: int) -> tuple[str, bool]:
    """Keep the first and last max_tokens/2 tokens of `text` (the LongBench / InfiniteBench rule)."""
    ids = builder.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text, False
    half = max_tokens // 2
    kept = ids[:half] + ids[len(ids) - (max_tokens - half):]
    return builder.tokenizer.decode(kept, skip_special_tokens=True), True


def _fit_prompt(builder: PromptBuilder, text: str, prefix: str, limit: int) -> tuple[str, bool]:
    """Middle-truncate the user text so text + chat template + prefix fit in `limit` tokens."""
    overhead = builder.count(text, prefix) - len(builder.tokenizer(text, add_special_tokens=False)["input_ids"])
    budget = limit - overhead
    for _ in range(4):  # decode/re-encode can shift a few tokens: shrink until it fits
        cut, truncated = middle_truncate(builder, text, budget)
        if builder.count(cut, prefix) <= limit:
            return cut, truncated
        budget -= max(8, builder.count(cut, prefix) - limit)
    return cut, truncated


def _read_json_records(path: Path, what: str) -> list[dict]:
    """A JSON list, or JSON Lines; errors name the file and the line."""
    if not path.is_file():
        raise EvalDataError(f"{what}: file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{what}: {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise EvalDataError(f"{what}: {path} line {n} is not valid JSON ({exc.msg})") from None
    if not records or not all(isinstance(r, dict) for r in records):
        raise EvalDataError(f"{what}: {path} must hold a non-empty list of JSON objects")
    return records


def _require(record: dict, fields: tuple[str, ...], what: str, path: Path, index: int) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        raise EvalDataError(f"{what}: entry {index} of {path} lacks field(s) {', '.join(missing)} "
                            "(is this the official format?)")


def _resolve(path: Path | None, names: tuple[str, ...], what: str, flag: str) -> Path:
    if path is None:
        raise EvalDataError(f"{what} needs its data file: pass {flag} PATH")
    path = Path(path).expanduser()
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise EvalDataError(f"{what}: none of {', '.join(names)} found in {path}")
    if not path.exists():
        raise EvalDataError(f"{what}: file not found: {path}")
    return path


def load_longbench_v2(path: Path | None, builder: PromptBuilder, n_samples: int, length: int,
                      subset: str | None = None) -> list[Sample]:
    """LongBench-v2 multiple choice; `subset` filters by the `length` field (short/medium/long)."""
    what = "LongBench-v2"
    path = _resolve(path, ("data.json", "data.jsonl"), what, "--longbench-v2")
    records = _read_json_records(path, what)
    max_new = 8
    limit = prompt_target(length, max_new, builder.max_context)
    out = []
    for i, r in enumerate(records):
        _require(r, ("_id", "question", "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context"),
                 what, path, i)
        if subset and r.get("length") != subset:
            continue
        if str(r["answer"]).strip() not in ("A", "B", "C", "D"):
            raise EvalDataError(f"{what}: entry {i} of {path} has answer {r['answer']!r}; expected A, B, C or D")
        text = LONGBENCH_V2_TEMPLATE.format(context=r["context"], question=r["question"], A=r["choice_A"],
                                            B=r["choice_B"], C=r["choice_C"], D=r["choice_D"])
        # the response format is primed so that small models answer with the letter at once
        prefix = "The correct answer is ("
        text, cut = _fit_prompt(builder, text, prefix, limit)
        task = "longbench_v2" + (f"_{subset}" if subset else "")
        out.append(Sample(id=f"{task}-{r['_id']}", task=task, input=text, answers=[str(r["answer"]).strip()],
                          metric="choice", max_new_tokens=max_new, question=r["question"], answer_prefix=prefix,
                          target_length=limit, meta={"truncated": cut, "domain": r.get("domain"),
                                                     "difficulty": r.get("difficulty"), "length": r.get("length")}))
        if len(out) == n_samples:
            break
    if not out:
        raise EvalDataError(f"{what}: no entries{f' with length={subset}' if subset else ''} in {path}")
    return out


def load_infinitebench(task: str, path: Path | None, builder: PromptBuilder, n_samples: int,
                       length: int) -> list[Sample]:
    """One InfiniteBench task from its official JSON Lines file."""
    what = f"InfiniteBench {task}"
    if task not in INFINITEBENCH:
        raise EvalDataError(f"InfiniteBench task {task!r} is not supported here; choose from: "
                            f"{', '.join(INFINITEBENCH)}")
    path = _resolve(path, (f"{task}.jsonl",), what, "--infinitebench")
    if path.name != f"{task}.jsonl":
        raise EvalDataError(f"{what}: expected a file named {task}.jsonl, got {path.name}")
    template, prefix, metric, max_new = INFINITEBENCH[task]
    limit = prompt_target(length, max_new, builder.max_context)
    out = []
    for i, r in enumerate(_read_json_records(path, what)[:n_samples]):
        _require(r, ("context", "input", "answer"), what, path, i)
        answers = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
        if not answers:
            raise EvalDataError(f"{what}: entry {i} of {path} has an empty answer")
        text, cut = _fit_prompt(builder, template.format(context=r["context"], input=r["input"]), prefix, limit)
        out.append(Sample(id=f"infinitebench_{task}-{r.get('id', i)}", task=f"infinitebench_{task}", input=text,
                          answers=[str(a) for a in answers], metric=metric, max_new_tokens=max_new,
                          question=r["input"], answer_prefix=prefix, target_length=limit,
                          meta={"truncated": cut}))
    return out


def _format_session(session: list, date: str, index: int) -> str:
    turns = "\n".join(f"{t.get('role', '?')}: {t.get('content', '')}" for t in session if isinstance(t, dict))
    return f"### Session {index}:\nSession Date: {date}\nSession Content:\n{turns}\n"


def load_longmemeval(path: Path | None, builder: PromptBuilder, n_samples: int, length: int) -> list[Sample]:
    """LongMemEval questions over their chat-history haystacks (history cut in the middle to fit)."""
    what = "LongMemEval"
    path = _resolve(path, ("longmemeval_s.json", "longmemeval_oracle.json", "longmemeval_m.json"), what,
                    "--longmemeval")
    max_new = 32
    limit = prompt_target(length, max_new, builder.max_context)
    out = []
    for i, r in enumerate(_read_json_records(path, what)[:n_samples]):
        _require(r, ("question_id", "question", "answer", "haystack_sessions", "haystack_dates"), what, path, i)
        sessions, dates = r["haystack_sessions"], r["haystack_dates"]
        if not isinstance(sessions, list) or len(sessions) != len(dates):
            raise EvalDataError(f"{what}: entry {i} of {path}: haystack_sessions and haystack_dates differ in length")
        history = "\n".join(_format_session(s, d, k + 1) for k, (s, d) in enumerate(zip(sessions, dates)))
        shell = LONGMEMEVAL_TEMPLATE.format(history="", date=r.get("question_date", ""), question=r["question"])
        room = limit - builder.count(shell)
        history, cut = middle_truncate(builder, history, max(0, room - 4))
        text = LONGMEMEVAL_TEMPLATE.format(history=history, date=r.get("question_date", ""), question=r["question"])
        qid = str(r["question_id"])
        out.append(Sample(id=f"longmemeval-{qid}", task="longmemeval", input=text, answers=[str(r["answer"])],
                          metric="memory_judge", max_new_tokens=max_new, question=r["question"],
                          target_length=limit,
                          meta={"truncated": cut, "question_type": r.get("question_type"),
                                "abstention": qid.endswith("_abs")}))
    return out


@dataclass(frozen=True)
class DataPaths:
    """Where the user keeps each benchmark's files (CLI: --longbench-v2, --infinitebench, --longmemeval)."""

    longbench_v2: Path | None = None
    infinitebench: Path | None = None
    longmemeval: Path | None = None


def dataset_tasks() -> list[str]:
    """Harness names of the benchmark tasks read from local files."""
    return (["longbench_v2", "longbench_v2_short", "longbench_v2_medium", "longbench_v2_long"]
            + [f"infinitebench_{t}" for t in INFINITEBENCH] + ["longmemeval"])


def load_dataset_task(task: str, paths: DataPaths, builder: PromptBuilder, n_samples: int,
                      length: int) -> list[Sample]:
    """Samples of a benchmark task by its harness name (see `dataset_tasks`)."""
    loaders: dict[str, Callable[[], list[Sample]]] = {
        "longbench_v2": lambda: load_longbench_v2(paths.longbench_v2, builder, n_samples, length),
        "longmemeval": lambda: load_longmemeval(paths.longmemeval, builder, n_samples, length),
    }
    for subset in ("short", "medium", "long"):
        loaders[f"longbench_v2_{subset}"] = (
            lambda s=subset: load_longbench_v2(paths.longbench_v2, builder, n_samples, length, subset=s))
    for t in INFINITEBENCH:
        loaders[f"infinitebench_{t}"] = lambda t=t: load_infinitebench(t, paths.infinitebench, builder, n_samples,
                                                                       length)
    if task not in loaders:
        raise EvalDataError(f"unknown benchmark task {task!r}; choose from: {', '.join(loaders)}")
    return loaders[task]()
