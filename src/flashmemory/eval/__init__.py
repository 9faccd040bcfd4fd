"""The evaluation harness: RULER-style synthetic tasks, benchmark loaders, scoring and the Table-1 report.

    from flashmemory.eval import EvalSettings, evaluate, write_report
    run = evaluate(engine, EvalSettings(tasks=["single"], length=4096, samples=4,
                                        policies=["full", "quest", "recency"]), results_path="runs/eval/results.jsonl")
    write_report(run, "runs/eval")
"""

from .datasets import DataPaths, dataset_tasks, load_dataset_task
from .harness import EvalRun, EvalSettings, evaluate, expand_tasks
from .report import summarize, to_markdown, write_report
from .ruler import RULER_TASKS, generate_samples
from .samples import EvalDataError, PromptBuilder, Sample
from .scoring import SCORERS, score

__all__ = ["DataPaths", "dataset_tasks", "load_dataset_task", "EvalRun", "EvalSettings", "evaluate", "expand_tasks",
           "summarize", "to_markdown", "write_report", "RULER_TASKS", "generate_samples", "EvalDataError",
           "PromptBuilder", "Sample", "SCORERS", "score"]
