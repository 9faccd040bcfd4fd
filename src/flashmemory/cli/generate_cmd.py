"""`flashmemory generate`: answer one prompt with LSA and report memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import EngineConfig, LSAConfig
from ..runtime.sampling import SamplingParams
from .errors import HelpFormatter, USER_ERRORS, fail
from .options import DISK_TIER_OPTIONS, add_model_option, add_options, add_policy_option, build

LSA_OPTIONS = ["chunk_size", "page_size", "tau", "sink_tokens", "tail_tokens"]
SAMPLING_OPTIONS = ["max_new_tokens", "temperature", "top_p", "top_k", "seed"]


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate from a prompt file with a tiered KV cache",
        description="Generation with Lookahead Sparse Attention. The whole KV history lives in host "
                    "memory; every --tau decode steps the policy picks which chunks are resident on the device.",
        formatter_class=HelpFormatter)
    p.add_argument("--prompt-file", required=True, type=Path, help="UTF-8 text file with the prompt ('-' for stdin)")
    add_model_option(p, single_sequence=True)
    add_policy_option(p)
    budget = p.add_mutually_exclusive_group()
    add_options(budget, LSAConfig, ["budget", "max_pages"])
    add_options(p, SamplingParams, SAMPLING_OPTIONS)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable); not part of the output")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (raw text otherwise)")
    p.add_argument("--context", type=Path, default=None,
                   help="a .fmkv file from `flashmemory prefill --save`: the prompt is a question appended to it "
                        "after a blank line, and the saved document is not prefilled again (--chat as when it was saved)")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, report) instead of text")
    add_options(p, LSAConfig, LSA_OPTIONS)
    add_options(p, EngineConfig, DISK_TIER_OPTIONS)
    p.add_argument("--indexer", type=Path, default=None, help="indexer checkpoint folder for --policy lsa (default: shipped)")
    p.add_argument("--device", default="cpu", help="compute device, e.g. cpu or cuda")
    p.set_defaults(func=run)


def _read_prompt(path: Path) -> str:
    if str(path) == "-":
        return sys.stdin.read()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"prompt file is not UTF-8 text: {path}") from None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _run_deepseek(args, backbone, prompt: str) -> int:
    """DeepSeek-V4: one sequence, greedy, with LSA over its compressed entries (runtime/deepseek.py)."""
    from ..policies import make_policy
    from ..runtime.deepseek import DeepseekLSAConfig, generate_one

    if args.context is not None or args.stop or args.temperature:
        raise ValueError("with a DeepSeek-V4 model, generate runs greedy decoding of a prompt file only "
                         "(no --context, --stop or --temperature yet)")
    name = "deepseek-lsa" if args.policy == "lsa" else args.policy
    policy = make_policy(name, **({"checkpoint": args.indexer} if name == "deepseek-lsa" and args.indexer else {}))
    config = DeepseekLSAConfig(tau=args.tau, **({"max_pages": args.max_pages} if args.max_pages else {}))
    tok = backbone.tokenizer
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = tok(prompt)["input_ids"]
    tokens, report = generate_one(backbone.model, ids, args.max_new_tokens, policy, config)
    text = tok.decode(tokens, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"text": text, "token_ids": tokens, "report": report}))
        return 0
    print(text)
    print()
    print(f"--- memory report ({report['policy']}, DeepSeek-V4 CSA entries) ---")
    print(f"prompt {report['prompt_tokens']} tokens, {report['cycles']} cycles; resident entries at most "
          f"{report['resident_entries_max']} of {report['csa_entries']}; CSA device bytes peak "
          f"{_human(report['csa_device_bytes_peak'])} of {_human(report['csa_full_bytes'])}, host mirror "
          f"{_human(report['host_bytes'])}")
    return 0


def run(args) -> int:
    from ..models.loader import check_architecture, load_backbone
    from ..policies import make_policy
    from ..runtime.engine import LSAEngine

    try:
        config = build(LSAConfig, args, LSA_OPTIONS + ["budget", "max_pages"],
                       budget=None if args.max_pages is not None else args.budget)
        options = {name: getattr(args, name) for name in SAMPLING_OPTIONS}
        engine_config = build(EngineConfig, args, DISK_TIER_OPTIONS)
        SamplingParams(**options, stop=tuple(args.stop or ()))  # bad options fail before the model loads
        prompt = _read_prompt(args.prompt_file)
        policy_kwargs = {"checkpoint": args.indexer} if args.policy == "lsa" and args.indexer else {}
        policy = make_policy(args.policy, **policy_kwargs)  # an unknown policy fails before the model loads
        backbone = load_backbone(args.model, device=args.device)
        if check_architecture(backbone.config, single_sequence_ok=True) == "deepseek_v4":
            return _run_deepseek(args, backbone, prompt)
        with LSAEngine(backbone, config, engine_config=engine_config) as engine:
            if args.context is not None:
                result = engine.ask(engine.load(args.context), prompt, policy, chat=args.chat,
                                    stop=tuple(args.stop or ()), **options)
            else:
                result = engine.generate(prompt, policy, chat=args.chat, stop=tuple(args.stop or ()), **options)
    except USER_ERRORS as exc:
        return fail(str(exc))
    r = result.report
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "report": r.to_dict()}))
        return 0
    print(result.text)
    print()
    print(f"--- memory report ({r.policy}) ---")
    print(f"prompt {r.prompt_tokens} tokens, generated {r.new_tokens} ({r.finish_reason}), "
          f"{r.cycles} cycles of {config.tau} steps")
    print(f"resident KV: mean {100 * r.resident_fraction_mean:.1f}% / max {100 * r.resident_fraction_max:.1f}% of the history")
    print(f"device KV peak {_human(r.device_kv_bytes_peak)} (reserved {_human(r.device_kv_bytes_reserved)}), "
          f"host mirror {_human(r.host_kv_bytes_peak)}, full cache {_human(r.full_kv_bytes)}")
    if r.index_bytes:
        print(f"chunk index ({r.policy}): {_human(r.index_bytes)}, {100 * r.index_bytes / r.full_kv_bytes:.2f}% of the full cache")
    t = r.transfers
    print(f"transfers: {t['recalls']} recalls ({_human(t['recall_bytes'])}), {t['offloads']} offloads "
          f"({_human(t['offload_bytes'])})")
    print(f"prefill {r.prefill_seconds:.1f} s, decode {r.decode_ms_per_token:.0f} ms/token")
    return 0
