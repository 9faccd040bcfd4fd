"""`flashmemory prefill`: prefill a document once and save it, to answer questions later (`generate --context`)."""

from __future__ import annotations

from pathlib import Path

from ..config import LSAConfig
from ..runtime.sampling import SamplingParams
from .errors import HelpFormatter, USER_ERRORS, fail
from .generate_cmd import _human, _read_prompt
from .options import add_model_option, add_options, build

LSA_OPTIONS = ["chunk_size", "page_size", "prefill_chunk"]


def register(sub) -> None:
    p = sub.add_parser(
        "prefill", help="prefill a document once and save it to a .fmkv file",
        description="Prefill a document and save its KV, token ids, last hidden states and next-token logits, bound "
                    "to the backbone and the chunk/page sizes. `flashmemory generate --context FILE --prompt-file "
                    "QUESTION` then appends a question after a blank line and answers without prefilling the "
                    "document again.",
        formatter_class=HelpFormatter)
    p.add_argument("--prompt-file", required=True, type=Path, help="UTF-8 text file with the document ('-' for stdin)")
    p.add_argument("--save", required=True, type=Path, help="the file to write (name ending with .fmkv)")
    p.add_argument("--force", action="store_true", help="overwrite the file if it exists")
    add_model_option(p)
    p.add_argument("--chat", action="store_true",
                   help="the document opens a chat user turn; questions must then be asked with --chat")
    add_options(p, SamplingParams, ["max_new_tokens"])
    add_options(p, LSAConfig, LSA_OPTIONS)
    p.add_argument("--device", default="cpu", help="compute device, e.g. cpu or cuda")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..models.loader import load_backbone
    from ..runtime.engine import LSAEngine
    from ..runtime.saved import check_destination, context_ids

    try:
        config = build(LSAConfig, args, LSA_OPTIONS)
        SamplingParams(max_new_tokens=args.max_new_tokens)
        check_destination(args.save, args.force)  # before minutes of prefill
        document = _read_prompt(args.prompt_file)
        backbone = load_backbone(args.model, device=args.device)
        with LSAEngine(backbone, config) as engine:
            prefill = engine.prefill(context_ids(engine, document, chat=args.chat), args.max_new_tokens)
            path = engine.save(prefill, args.save, force=args.force)
    except USER_ERRORS as exc:
        return fail(str(exc))
    print(f"saved {len(prefill.prompt_ids)} tokens ({_human(path.stat().st_size)}) to {path}; "
          f"prefill {prefill.seconds:.1f} s")
    return 0
