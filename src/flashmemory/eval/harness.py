"""Running an evaluation: one prefill per sample, every policy (and budget) decoded from it.

Prefill dominates on a CPU, so each sample is prefilled once and `LSAEngine.decode` replays
it for every (policy, budget) pair. Each finished pair is appended to a JSON Lines results
file at once; a later run with the same settings skips what is already there, so an
interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from ..config import ConfigError, LSAConfig
from ..policies import BudgetError, SelectionPolicy, make_policy, policy_names
from ..runtime.cache import ContextLengthError
from ..runtime.engine import LSAEngine, PromptError
from .datasets import DataPaths, dataset_tasks, load_dataset_task
from .multi import MULTI_TASKS, MultiSample, generate_multi
from .ruler import RULER_TASKS, generate_samples
from .samples import EvalDataError, PromptBuilder, Sample
from .scoring import score
from .turns import converse, prefill_document

#: Named groups accepted by --tasks.
TASK_GROUPS = {
    "ruler": list(RULER_TASKS),
    "niah": [t for t in RULER_TASKS if t.startswith("niah_")],
    "single": ["niah_single_1", "niah_single_2", "niah_single_3"],
    "multi": list(MULTI_TASKS),   # many questions on one context, asked in turn
}

#: Failures that belong to one (policy, budget) and are reported instead of stopping the run.
RUN_ERRORS = (BudgetError, ConfigError, ContextLengthError, PromptError)


def expand_tasks(spec: str | Iterable[str]) -> list[str]:
    """Task names from a comma list that may contain group names; unknown names raise."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    known = set(RULER_TASKS) | set(MULTI_TASKS) | set(dataset_tasks())
    out: list[str] = []
    for name in names:
        for task in TASK_GROUPS.get(name, [name]):
            if task not in known:
                raise EvalDataError(f"unknown task {task!r}; choose from: {', '.join(TASK_GROUPS)} (groups), "
                                    f"{', '.join(RULER_TASKS)}, {', '.join(MULTI_TASKS)}, "
                                    f"{', '.join(dataset_tasks())}")
            if task not in out:
                out.append(task)
    if not out:
        raise EvalDataError("no tasks given")
    return out


@dataclass
class EvalSettings:
    """What to evaluate. `budgets` with several values is the budget-sweep mode."""

    tasks: list[str]
    length: int = 4096
    samples: int = 4
    policies: list[str] = field(default_factory=lambda: ["full", "recency", "random", "quest"])
    budgets: list[float] = field(default_factory=lambda: [0.12])
    seed: int = 0
    chat: bool = True
    config: LSAConfig = field(default_factory=lambda: LSAConfig(page_size=32, sink_tokens=32, tail_tokens=128))
    policy_kwargs: dict = field(default_factory=dict)   # e.g. {"lsa": {"checkpoint": "..."}}
    data: DataPaths = field(default_factory=DataPaths)
    max_new_tokens: int | None = None                   # overrides every task's own

    def __post_init__(self) -> None:
        self.tasks = expand_tasks(self.tasks)
        if not isinstance(self.length, int) or self.length < 256:
            raise EvalDataError(f"--length must be an integer of at least 256 tokens, got {self.length!r}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise EvalDataError(f"--samples must be a positive integer, got {self.samples!r}")
        if not self.policies:
            raise EvalDataError("no policies given")
        if len(set(self.policies)) != len(self.policies):
            raise EvalDataError(f"a policy is listed twice: {','.join(self.policies)}")
        if not self.budgets:
            raise EvalDataError("no budget given")
        for b in self.budgets:
            self.config.with_(budget=b, max_pages=None)  # raises ConfigError for a bad fraction
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise EvalDataError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")

    def to_dict(self) -> dict:
        return {"tasks": self.tasks, "length": self.length, "samples": self.samples, "policies": self.policies,
                "budgets": self.budgets, "seed": self.seed, "chat": self.chat, "config": self.config.to_dict(),
                "policy_kwargs": {k: {a: str(v) for a, v in kw.items()} for k, kw in self.policy_kwargs.items()},
                "max_new_tokens": self.max_new_tokens,
                "data": {k: (str(v) if v is not None else None) for k, v in vars(self.data).items()}}


def make_policies(settings: EvalSettings, model=None) -> dict[str, SelectionPolicy]:
    """Instantiate every requested policy up front, so a missing one fails before any prefill.

    With `model`, each policy is also bound to it: a learned policy loads (or fails to find)
    its indexer for this backbone here, not in the middle of the run.
    """
    out = {}
    for name in settings.policies:
        if name == "lsa" and "lsa" not in policy_names():
            raise EvalDataError("policy 'lsa' is not available: the learned policy (flashmemory.policies.lsa) is "
                                "not installed in this build; drop it from --policies")
        try:
            policy = make_policy(name, **settings.policy_kwargs.get(name, {}))
            if model is not None:
                policy.bind(model)
        except (ValueError, OSError, RuntimeError) as exc:  # CheckpointError is a ValueError
            raise EvalDataError(f"policy {name!r} could not be set up: {exc}") from None
        out[name] = policy
    return out


def build_samples(settings: EvalSettings, builder: PromptBuilder) -> list[Sample | MultiSample]:
    """Every sample of every task, synthetic ones generated from the seed."""
    samples: list[Sample | MultiSample] = []
    for task in settings.tasks:
        if task in RULER_TASKS:
            got = generate_samples(task, builder, settings.samples, settings.length, settings.seed)
        elif task in MULTI_TASKS:
            got = generate_multi(task, builder, settings.samples, settings.length, settings.seed)
        else:
            got = load_dataset_task(task, settings.data, builder, settings.samples, settings.length)
        if settings.max_new_tokens is not None:
            for s in got:
                s.max_new_tokens = settings.max_new_tokens
        samples.extend(got)
    return samples


def check_room(samples: list[Sample | MultiSample], builder: PromptBuilder) -> None:
    """Refuse, before any prefill, a sample whose prompt leaves no room for its answer in the context."""
    if not builder.max_context:
        return
    for sample in samples:
        if isinstance(sample, MultiSample):
            continue  # sized with its questions and answers reserved (eval/multi.py)
        n = len(builder.sample_ids(sample))
        if n + sample.max_new_tokens > builder.max_context:
            raise EvalDataError(f"sample {sample.id}: {n} prompt tokens leave no room for {sample.max_new_tokens} "
                                f"new tokens in a {builder.max_context}-token context (a shorter --length or a "
                                f"smaller --max-new-tokens fits)")


def _runs(settings: EvalSettings, policies: dict[str, SelectionPolicy]) -> list[tuple[str, float]]:
    """(policy, budget) pairs; a keep-everything policy runs once, at budget 1.0."""
    out = []
    for name, policy in policies.items():
        if policy.mode == "all":
            out.append((name, 1.0))
        else:
            out.extend((name, b) for b in settings.budgets)
    return out


def _record_key(fingerprint: str, sample: Sample, policy: str, identity: dict, config: LSAConfig,
                chat: bool) -> str:
    blob = json.dumps([fingerprint, sample.id, sample.digest(), policy, identity, config.to_dict(), chat],
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def policy_identity(policy, kwargs: dict) -> dict:
    """What a cached result depends on besides the sample and config: the policy's options and,
    for a learned policy, a digest of its weights and of its configuration (a retrained checkpoint
    at the same path, a new shipped default, or the same weights scoring another key resolution
    must not reuse old results)."""
    ident = {k: str(v) for k, v in kwargs.items()}
    model = getattr(policy, "indexer", None)
    if isinstance(model, torch.nn.Module):
        h = hashlib.sha1()
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().float().numpy().tobytes())
        ident["weights"] = h.hexdigest()[:16]
        cfg = getattr(model, "cfg", None)
        if cfg is not None:  # provenance ("extra") does not change what the indexer computes
            settings = {k: v for k, v in cfg.to_dict().items() if k != "extra"}
            settings["run_time"] = policy.run_settings() if hasattr(policy, "run_settings") else {}
            ident["indexer_config"] = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return ident


class ResultStore:
    """Per-(sample, policy, budget) results in a JSON Lines file, appended as they finish."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self.records: dict[str, dict] = {}
        if self.path and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interruption: that run is simply redone
                if isinstance(rec, dict) and "key" in rec:
                    self.records[rec["key"]] = rec

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, record: dict) -> None:
        """Keep `record` and append it to the file at once (flushed: survives an interruption)."""
        self.records[record["key"]] = record
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()


_REPORT_FIELDS = ("prompt_tokens", "new_tokens", "cycles", "resident_fraction_mean", "resident_fraction_max",
                  "resident_fraction_per_cycle", "device_kv_bytes_peak", "device_kv_bytes_reserved",
                  "host_kv_bytes_peak", "full_kv_bytes", "transfers", "prefill_seconds", "decode_seconds",
                  "decode_ms_per_token", "index_bytes")


@dataclass
class EvalRun:
    """The outcome of `evaluate`: settings, samples and one record per (sample, policy, budget)."""

    settings: EvalSettings
    samples: list[Sample | MultiSample]
    records: list[dict]
    model: str
    reused: int = 0   # results taken from the results file instead of recomputed


def evaluate(engine: LSAEngine, settings: EvalSettings, results_path: Path | None = None,
             progress: bool = True) -> EvalRun:
    """Run every sample through every (policy, budget); returns all records (cached or new)."""
    from tqdm.auto import tqdm

    policies = make_policies(settings, engine.model)
    max_context = engine.backbone.max_context
    builder = PromptBuilder(engine.tokenizer, chat=settings.chat, max_context=max_context)
    samples = build_samples(settings, builder)
    check_room(samples, builder)
    store = ResultStore(results_path)
    runs = _runs(settings, policies)
    fp = engine.backbone.fingerprint
    identity = {name: policy_identity(policies[name], settings.policy_kwargs.get(name, {})) for name in policies}
    tau = settings.config.tau
    records: list[dict] = []
    reused = 0
    bar = tqdm(samples, desc="eval", unit="sample", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for sample in bar:
        keyed = [(p, b, settings.config.with_(budget=b, max_pages=None)) for p, b in runs]
        keyed = [(p, b, cfg, _record_key(fp, sample, p, identity[p], cfg, settings.chat)) for p, b, cfg in keyed]
        todo = [k for k in keyed if k[3] not in store]
        reused += len(keyed) - len(todo)
        if todo and isinstance(sample, MultiSample):
            bar.set_postfix_str(f"{sample.task} prefill")
            ids, pre = prefill_document(engine, sample, settings.chat, tau)
            for name, budget, cfg, key in todo:
                bar.set_postfix_str(f"{sample.task} {name}@{budget:g}")
                rec = {"key": key, "sample_id": sample.id, "task": sample.task, "policy": name, "budget": budget,
                       "depth": None, "answers": sample.answers, "metric": sample.metric,
                       "prompt_tokens": len(ids), "prefill_seconds": pre.seconds}
                try:
                    turns, mean = converse(engine, pre, sample, policies[name], cfg, settings.chat)
                except RUN_ERRORS as exc:
                    rec.update(prediction=None, score=None, turns=[], error=f"{type(exc).__name__}: {exc}")
                else:
                    extra = sum(t["report"]["scoring_forward_seconds"] for t in turns)
                    rec.update(prediction=" | ".join(t["prediction"] for t in turns), score=mean, turns=turns,
                               error=None, report=turns[0]["report"], scoring_forward_seconds=extra,
                               scoring_prefill_ratio=extra / pre.seconds if pre.seconds else None)
                store.add(rec)
        elif todo:
            bar.set_postfix_str(f"{sample.task} prefill")
            ids = engine.encode(sample.input, chat=settings.chat) + builder.prefix_ids(sample.answer_prefix)
            # room for the answer, plus one cycle of lookahead (the oracle decodes tau steps ahead)
            room = sample.max_new_tokens + tau
            if max_context:
                room = min(room, max_context - len(ids))
            if room < sample.max_new_tokens:
                raise EvalDataError(f"sample {sample.id}: {len(ids)} prompt tokens leave no room for "
                                    f"{sample.max_new_tokens} new tokens in a {max_context}-token context")
            pre = engine.prefill(ids, max_new_tokens=room)
            for name, budget, cfg, key in todo:
                bar.set_postfix_str(f"{sample.task} {name}@{budget:g}")
                rec = {"key": key, "sample_id": sample.id, "task": sample.task, "policy": name, "budget": budget,
                       "depth": sample.depth, "answers": sample.answers, "metric": sample.metric,
                       "prompt_tokens": len(ids), "prefill_seconds": pre.seconds}
                try:
                    res = engine.decode(pre, policies[name], max_new_tokens=sample.max_new_tokens, config=cfg)
                except RUN_ERRORS as exc:
                    rec.update(prediction=None, score=None, error=f"{type(exc).__name__}: {exc}")
                else:
                    report = res.report.to_dict()
                    rec.update(prediction=res.text, score=score(res.text, sample), error=None,
                               report={k: report[k] for k in _REPORT_FIELDS if k in report})
                store.add(rec)
    bar.close()
    for sample in samples:
        for name, budget in runs:
            cfg = settings.config.with_(budget=budget, max_pages=None)
            records.append(store.records[_record_key(fp, sample, name, identity[name], cfg, settings.chat)])
    return EvalRun(settings, samples, records, model=str(engine.backbone.path), reused=reused)
