"""`flashmemory generate`: answer one prompt with LSA and report memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import HelpFormatter, USER_ERRORS, fail

# The learned indexer ships for the default backbone; other backbones pass --indexer (or pick quest).
DEFAULT_POLICY = "lsa"


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate from a prompt file with a tiered KV cache",
        description="Greedy generation with Lookahead Sparse Attention. The whole KV history lives in host "
                    "memory; every --tau decode steps the policy picks which chunks are resident on the device.",
        formatter_class=HelpFormatter)
    p.add_argument("--prompt-file", required=True, type=Path, help="UTF-8 text file with the prompt ('-' for stdin)")
    p.add_argument("--model", default=None,
                   help="local Hugging Face model folder (Llama, Mistral, Qwen2, Qwen3); default: embedded SmolLM2-135M-Instruct")
    p.add_argument("--policy", default=DEFAULT_POLICY,
                   help="selection policy: lsa (learned indexer; shipped for the default model, --indexer for others), "
                        "quest, full, recency, random, streaming, oracle")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget", type=float, default=None,
                        help="resident share of the history's chunks, sink and tail included (e.g. 0.15); default 0.15")
    budget.add_argument("--max-pages", type=int, default=None, help="KMAX: a fixed cap on resident device pages")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (raw text otherwise)")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, report) instead of text")
    p.add_argument("--chunk-size", type=int, default=32, help="tokens per chunk (scoring unit)")
    p.add_argument("--page-size", type=int, default=32, help="tokens per page (residency/transfer unit, multiple of chunk)")
    p.add_argument("--tau", type=int, default=64, help="decode steps per cycle (the resident set changes only between cycles)")
    p.add_argument("--sink-tokens", type=int, default=32, help="first tokens always resident")
    p.add_argument("--tail-tokens", type=int, default=128, help="most recent tokens always resident")
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


def run(args) -> int:
    from ..config import LSAConfig
    from ..models.loader import load_backbone
    from ..policies import make_policy
    from ..runtime.engine import LSAEngine

    try:
        budget = args.budget if args.max_pages is None else None
        config = LSAConfig(chunk_size=args.chunk_size, page_size=args.page_size, tau=args.tau,
                           sink_tokens=args.sink_tokens, tail_tokens=args.tail_tokens,
                           budget=0.15 if budget is None and args.max_pages is None else budget,
                           max_pages=args.max_pages)
        prompt = _read_prompt(args.prompt_file)
        policy_kwargs = {"checkpoint": args.indexer} if args.policy == "lsa" and args.indexer else {}
        policy = make_policy(args.policy, **policy_kwargs)
        backbone = load_backbone(args.model, device=args.device)
        engine = LSAEngine(backbone, config)
        result = engine.generate(prompt, policy=policy, max_new_tokens=args.max_new_tokens, chat=args.chat)
    except USER_ERRORS as exc:
        return fail(str(exc))
    r = result.report
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "report": r.to_dict()}))
        return 0
    print(result.text)
    print()
    print(f"--- memory report ({r.policy}) ---")
    print(f"prompt {r.prompt_tokens} tokens, generated {r.new_tokens}, {r.cycles} cycles of {config.tau} steps")
    print(f"resident KV: mean {100 * r.resident_fraction_mean:.1f}% / max {100 * r.resident_fraction_max:.1f}% of the history")
    print(f"device KV peak {_human(r.device_kv_bytes_peak)} (reserve {_human(r.device_kv_bytes_reserved)}), "
          f"host mirror {_human(r.host_kv_bytes_peak)}, full cache {_human(r.full_kv_bytes)}")
    if r.index_bytes:
        print(f"chunk index ({r.policy}): {_human(r.index_bytes)}, {100 * r.index_bytes / r.full_kv_bytes:.2f}% of the full cache")
    t = r.transfers
    print(f"transfers: {t['recalls']} recalls ({_human(t['recall_bytes'])}), {t['offloads']} offloads "
          f"({_human(t['offload_bytes'])})")
    print(f"prefill {r.prefill_seconds:.1f} s, decode {r.decode_ms_per_token:.0f} ms/token")
    return 0
