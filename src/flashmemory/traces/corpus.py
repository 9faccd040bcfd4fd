"""Documents to dump: built-in synthetic generators and the user's text or JSONL files.

The built-in corpus is deliberately disjoint from the evaluation harness (Paul Graham essays
with RULER-style "special magic number" needles):
  - haystack text: paragraphs of the Python standard library's own docstrings (read from the
    running interpreter's source files, never imported), i.e. technical prose;
  - facts and questions: our own templates (locker codes, shelf marks, platforms,
    calibration constants, passwords, ...); none mentions a "magic number".
Kinds of documents:
  - `continue`: teacher-forced continuation of plain prose (decode positions = the last tokens);
  - `recall`:   prose with facts early on, then a teacher-forced restatement of those facts at
                the end, so the decode positions must look far back;
  - `qa`:       prose with facts at random depths and one question per fact, asked one after the
                other (a multi-turn conversation); the decode positions are the questions and the
                model's own (greedy) answers. Later questions reuse the cached context, so one
                forward over the document yields several retrieval events.
Every document is generated from (seed, index) alone, so `--shard i/N` processes agree.
"""

from __future__ import annotations

import ast
import functools
import json
import random
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

Kind = Literal["continue", "recall", "qa"]
CHARS_PER_TOKEN = 4.4  # SmolLM2 tokenizer on docstring prose; only used to size haystacks


@dataclass
class TraceDocument:
    """One unit of the dump."""

    doc_id: str
    kind: Kind
    context: str
    continuation: str | None = None   # teacher-forced text after the context (its tokens are decode positions)
    questions: list[str] = field(default_factory=list)  # qa: asked in turn after the context; the model answers
    answers: list[str | None] = field(default_factory=list)  # qa: reference answers (recorded, not used for labels)
    chat: bool = False                # qa: wrap in the backbone's chat template

    def to_meta(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("context", "continuation")}


@functools.lru_cache(maxsize=1)
def stdlib_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs from the docstrings of the standard library's top-level modules."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for para in doc.split("\n\n"):
                para = " ".join(para.split())
                # keep sentences, drop doctest and table-like fragments
                if len(para) >= 120 and ">>>" not in para and para.count(" ") * 8 > len(para):
                    out.append(para)
    if len(out) < 200:
        raise RuntimeError(f"only {len(out)} usable docstring paragraphs found under {root}")
    return tuple(out)


_NAMES = ["Adaeze", "Bruno", "Chiara", "Dmitri", "Elif", "Farhan", "Greta", "Hiroshi", "Ingrid", "Jonas", "Keziah",
          "Lorenzo", "Mireille", "Nikolai", "Oona", "Priya", "Quentin", "Rosalind", "Soren", "Tomasz", "Ulla",
          "Valentin", "Wanjiru", "Xavier", "Yusuf", "Zofia"]
_CITIES = ["Tromso", "Valparaiso", "Windhoek", "Kraków", "Hobart", "Tbilisi", "Cusco", "Bergen", "Da Nang",
           "Timbuktu", "Reykjavik", "Ushuaia", "Nagasaki", "Zanzibar", "Lviv", "Porto", "Quebec", "Leipzig"]
_ADJ = ["copper", "velvet", "crimson", "hollow", "frozen", "amber", "silent", "northern", "woven", "gilded",
        "broken", "lunar", "quiet", "ivory", "rusted", "emerald"]
_NOUNS = ["lantern", "compass", "ledger", "violin", "telescope", "teapot", "anchor", "mirror", "clock", "kettle",
          "atlas", "harp", "satchel", "sextant", "typewriter", "chessboard"]
_WORDS = ["maple", "orbit", "pebble", "quartz", "saffron", "tundra", "walnut", "zephyr", "harbor", "juniper",
          "lagoon", "meadow", "nectar", "obsidian", "prairie", "falcon"]


def _value(rng: random.Random) -> str:
    style = rng.randrange(3)
    if style == 0:
        digits = rng.randint(4, 7)
        return str(rng.randrange(10 ** (digits - 1), 10 ** digits))
    if style == 1:
        letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
        return f"{rng.choice(letters)}{rng.randint(2, 9)}-{rng.randint(100, 999)}{rng.choice(letters)}"
    return f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}"


def _fact(rng: random.Random) -> tuple[str, str, str]:
    """(statement, question, answer) in one of our templates."""
    name, city, value = rng.choice(_NAMES), rng.choice(_CITIES), _value(rng)
    adj, noun = rng.choice(_ADJ), rng.choice(_NOUNS)
    templates = [
        (f"Field log: the storage locker assigned to {name} opens with the code {value}.",
         f"Which code opens the storage locker assigned to {name}?"),
        (f"Archive record: the {adj} {noun} was catalogued under shelf mark {value}.",
         f"Under which shelf mark was the {adj} {noun} catalogued?"),
        (f"Travel memo: {name} will reach {city} on the train with ticket number {value}.",
         f"What is the ticket number of the train {name} takes to {city}?"),
        (f"Station note: the weather station in {city} lists its calibration constant as {value}.",
         f"What calibration constant does the weather station in {city} list?"),
        (f"Account notice: {name} set the password of the {noun} account to {value}.",
         f"What password did {name} set for the {noun} account?"),
        (f"Inventory: crate {adj.upper()}-{rng.randint(10, 99)} in the {city} depot carries the seal {value}.",
         f"Which seal does the crate in the {city} depot carry?"),
    ]
    statement, question = rng.choice(templates)
    return statement, question, value


def _haystack(rng: random.Random, n_tokens: int) -> list[str]:
    paras = stdlib_paragraphs()
    target, out, size = n_tokens * CHARS_PER_TOKEN, [], 0
    while size < target:
        p = paras[rng.randrange(len(paras))]
        out.append(p)
        size += len(p) + 2
    return out


def _insert(paras: list[str], sentence: str, depth: float) -> None:
    paras.insert(max(1, min(len(paras) - 1, round(depth * len(paras)))), sentence)


def synthetic_document(seed: int, index: int, min_tokens: int, max_tokens: int,
                       mix: tuple[float, float, float] = (0.3, 0.3, 0.4)) -> TraceDocument:
    """Document `index` of the built-in corpus (continue / recall / qa in proportions `mix`)."""
    rng = random.Random(f"flashmemory-traces:{seed}:{index}")
    n_tokens = rng.randint(min_tokens, max_tokens)
    kind: Kind = rng.choices(["continue", "recall", "qa"], weights=mix)[0]
    doc_id = f"synthetic-{seed}-{index:06d}"
    if kind == "continue":
        return TraceDocument(doc_id, kind, "\n\n".join(_haystack(rng, n_tokens)))
    facts = [_fact(rng) for _ in range(rng.randint(1, 4))]
    paras = _haystack(rng, n_tokens - 40 * len(facts))
    for statement, _, _ in facts:
        # recall restates facts from the first 70% (they must be far back); qa keeps them out of the recency tail
        _insert(paras, statement, rng.uniform(0.05, 0.7 if kind == "recall" else 0.85))
    context = "\n\n".join(paras)
    if kind == "recall":
        lead = rng.choice(["To summarise the notes recorded above:", "Restating the records mentioned earlier:",
                           "For reference, the entries above were:"])
        return TraceDocument(doc_id, kind, context, continuation="\n\n" + lead + " " + " ".join(s for s, _, _ in facts))
    rng.shuffle(facts)
    return TraceDocument(doc_id, kind, context, questions=[q for _, q, _ in facts], answers=[a for _, _, a in facts],
                         chat=rng.random() < 0.7)


def synthetic_corpus(n_docs: int, seed: int, min_tokens: int, max_tokens: int,
                     mix: tuple[float, float, float] = (0.3, 0.3, 0.4)) -> list[TraceDocument]:
    """The built-in corpus: `n_docs` documents of about min..max tokens (the lengths' defaults live in
    `flashmemory dump`'s options, the shipped corpus's in traces/recipe.py)."""
    if n_docs <= 0:
        raise ValueError(f"n_docs must be positive, got {n_docs}")
    if not (64 <= min_tokens <= max_tokens):
        raise ValueError(f"need 64 <= min_tokens <= max_tokens, got {min_tokens}..{max_tokens}")
    return [synthetic_document(seed, i, min_tokens, max_tokens, mix) for i in range(n_docs)]


def file_corpus(paths: list[str | Path]) -> list[TraceDocument]:
    """Documents from the user's files.

    `.txt` (or any non-JSONL file): one `continue` document per file (UTF-8).
    `.jsonl`: one document per line, an object with either "text" (a `continue` document,
    optionally with "continuation") or "context" and "question" (a string) or "questions" (a
    list, asked in turn) for a `qa` document, optionally with "chat": true and "answer" /
    "answers"; an optional "id" names it.
    """
    docs: list[TraceDocument] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"corpus file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"corpus file is not UTF-8 text: {path}") from None
        if path.suffix != ".jsonl":
            if text.strip():
                docs.append(TraceDocument(f"{path.name}", "continue", text))
            continue
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: each line must be a JSON object")
            doc_id = str(row.get("id", f"{path.name}:{line_no}"))
            if isinstance(row.get("text"), str):
                docs.append(TraceDocument(doc_id, "continue", row["text"], continuation=row.get("continuation")))
            elif isinstance(row.get("context"), str) and (isinstance(row.get("question"), str) or (
                    isinstance(row.get("questions"), list) and row["questions"]
                    and all(isinstance(q, str) for q in row["questions"]))):
                questions = [row["question"]] if isinstance(row.get("question"), str) else row["questions"]
                answers = row.get("answers") if isinstance(row.get("answers"), list) else [row.get("answer")]
                answers = (list(answers) + [None] * len(questions))[: len(questions)]
                docs.append(TraceDocument(doc_id, "qa", row["context"], questions=questions, answers=answers,
                                          chat=bool(row.get("chat", False))))
            else:
                raise ValueError(f'{where}: needs "text", or "context" and "question"/"questions"')
    if not docs:
        raise ValueError("the corpus files hold no documents")
    return docs
