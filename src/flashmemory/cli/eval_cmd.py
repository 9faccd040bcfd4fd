"""`flashmemory eval`: several policies side by side on RULER-style tasks and local benchmarks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import EngineConfig, LSAConfig
from .errors import HelpFormatter, USER_ERRORS, fail
from .options import DISK_TIER_OPTIONS, add_model_option, add_options, build

LSA_OPTIONS = ["chunk_size", "page_size", "tau", "sink_tokens", "tail_tokens"]

DEFAULT_POLICIES = "full,lsa,recency,random,quest"
DEFAULT_SWEEP = "0.06,0.09,0.12,0.18,0.25"
# --quick: two single-needle tasks at 4K tokens (a 12% budget needs >= 4K), two samples each: ~2-4 min on 2 cores
QUICK = {"tasks": "niah_single_1,niah_single_2", "length": 4096, "samples": 2}


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="compare selection policies on long-context tasks (accuracy, resident KV, transfers)",
        description="Evaluate policies side by side. Each sample is prefilled once and decoded by every policy; "
                    "results are appended to OUT/results.jsonl as they finish, so an interrupted run resumes. "
                    "Writes OUT/report.md (Table 1), OUT/report.json and OUT/accuracy_vs_resident.png.",
        formatter_class=HelpFormatter)
    p.add_argument("--tasks", default=None,
                   help="comma list of tasks or groups: ruler, niah, single, niah_single_1..3, niah_multikey_1..3, "
                        "niah_multivalue, niah_multiquery, vt, cwe, fwe, multi (questions asked in turn on one "
                        "context: mq_niah_2..4, mq_niah_noise_3), longbench_v2[_short|_medium|_long], "
                        "infinitebench_{passkey,number_string,kv_retrieval,longbook_qa_eng}, longmemeval "
                        "(default: single)")
    p.add_argument("--length", type=int, default=None, help="tokens per sample, prompt + answer (default 4096)")
    p.add_argument("--samples", type=int, default=None, help="samples per task (default 4)")
    p.add_argument("--policies", default=None,
                   help=f"comma list of policies (default {DEFAULT_POLICIES}; lsa is left out of the default "
                        "when no indexer fits the backbone, and is an error when named explicitly)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget", type=float, default=0.12,
                        help="resident share of the history's KV for every sparse policy")
    budget.add_argument("--sweep", nargs="?", const=DEFAULT_SWEEP, default=None, metavar="B1,B2,...",
                        help=f"budget-sweep mode: run every sparse policy at each budget (default {DEFAULT_SWEEP})")
    p.add_argument("--quick", action="store_true",
                   help=f"preset: tasks {QUICK['tasks']}, length {QUICK['length']}, {QUICK['samples']} samples "
                        "(explicit --tasks/--length/--samples still win)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic samples")
    add_model_option(p)
    p.add_argument("--device", default="cpu", help="compute device, e.g. cpu or cuda")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts in the model's chat template (default: when the model has one, as the "
                        "instruct default model does; a base model such as gemma3-270m gets raw text)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override every task's answer length")
    add_options(p, LSAConfig, LSA_OPTIONS)
    add_options(p, EngineConfig, DISK_TIER_OPTIONS)
    p.add_argument("--indexer", type=Path, default=None,
                   help="indexer checkpoint for --policies lsa (default: shipped)")
    p.add_argument("--longbench-v2", type=Path, default=None, help="LongBench-v2 data.json (or its folder)")
    p.add_argument("--infinitebench", type=Path, default=None, help="folder of InfiniteBench *.jsonl files")
    p.add_argument("--longmemeval", type=Path, default=None, help="LongMemEval longmemeval_s.json (or its folder)")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="output folder (report, plot, results cache)")
    p.add_argument("--json-out", type=Path, default=None, help="write the JSON report here instead of OUT/report.json")
    p.add_argument("--fresh", action="store_true", help="ignore results cached in OUT/results.jsonl")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be a comma list of fractions, got {text!r}") from None


def _policies(text: str | None) -> tuple[list[str], bool]:
    """The requested policy names, and whether the user named them."""
    if text is not None:
        return [x.strip() for x in text.split(",") if x.strip()], True
    return DEFAULT_POLICIES.split(","), False


def _drop_unusable_lsa(names: list[str], model, kwargs: dict) -> list[str]:
    """The default list names `lsa`; leave it out (with a note) when no indexer fits this backbone."""
    from ..policies import make_policy, policy_names

    if "lsa" not in names:
        return names
    try:
        if "lsa" not in policy_names():
            raise ValueError("the learned policy is not installed")
        make_policy("lsa", **kwargs).bind(model)
        return names
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"flashmemory: note: evaluating without `lsa` ({exc})", file=sys.stderr)
        return [n for n in names if n != "lsa"]


def run(args) -> int:
    from ..eval.datasets import DataPaths
    from ..eval.harness import EvalSettings, evaluate, make_policies
    from ..eval.report import summarize, to_markdown, write_report
    from ..models.loader import load_backbone
    from ..runtime.engine import LSAEngine

    preset = QUICK if args.quick else {"tasks": "single", "length": 4096, "samples": 4}
    try:
        budgets = _floats(args.sweep, "--sweep") if args.sweep else [args.budget]
        config = build(LSAConfig, args, LSA_OPTIONS, budget=budgets[0])
        engine_config = build(EngineConfig, args, DISK_TIER_OPTIONS)
        policies, explicit = _policies(args.policies)
        policy_kwargs = {"lsa": {"checkpoint": args.indexer}} if args.indexer else {}

        def settings_for(names: list[str], chat: bool = True) -> EvalSettings:
            return EvalSettings(
                tasks=args.tasks or preset["tasks"], length=args.length or preset["length"],
                samples=args.samples or preset["samples"], policies=names, budgets=budgets, seed=args.seed,
                chat=chat, config=config, max_new_tokens=args.max_new_tokens, policy_kwargs=policy_kwargs,
                data=DataPaths(args.longbench_v2, args.infinitebench, args.longmemeval))

        make_policies(settings_for(policies))  # an unknown policy fails here, before the model loads
        backbone = load_backbone(args.model, device=args.device)
        if not explicit:
            policies = _drop_unusable_lsa(policies, backbone.model, policy_kwargs.get("lsa", {}))
        chat = args.chat if args.chat is not None else bool(getattr(backbone.tokenizer, "chat_template", None))
        settings = settings_for(policies, chat)
        engine = LSAEngine(backbone, config, engine_config=engine_config)
        results = args.out / "results.jsonl"
        if args.fresh and results.exists():
            results.unlink()  # start over: the cache would otherwise answer every sample
        run_ = evaluate(engine, settings, results_path=results, progress=not args.quiet)
        paths = write_report(run_, args.out, args.json_out)
    except USER_ERRORS as exc:
        return fail(str(exc))
    print(to_markdown(run_, summarize(run_.records)))
    if run_.reused:
        print(f"({run_.reused} result(s) reused from {args.out / 'results.jsonl'})")
    print(f"wrote {paths['markdown']}, {paths['json']}, {paths['plot']}")
    return 0
