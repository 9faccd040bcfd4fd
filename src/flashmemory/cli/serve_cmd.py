"""`flashmemory serve`: an OpenAI-compatible HTTP server with memory-aware admission."""

from __future__ import annotations

from pathlib import Path

from ..config import EngineConfig, LSAConfig
from .errors import HelpFormatter, USER_ERRORS, fail
from .options import DISK_TIER_OPTIONS, add_model_option, add_options, add_policy_option, build

_LSA_OPTIONS = ["chunk_size", "page_size", "tau", "sink_tokens", "tail_tokens", "threshold", "prefill_chunk"]
_ENGINE_OPTIONS = ["device_memory", "max_batch", "decode_token_weight"] + DISK_TIER_OPTIONS
#: Seconds uvicorn waits for open requests after Ctrl-C before cancelling them (their pages are freed).
_GRACEFUL_SHUTDOWN_SECONDS = 5


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="OpenAI-compatible /v1/completions and /v1/chat/completions (streaming or not), /v1/models, "
                    "/health and Prometheus /metrics. Requests decode together; one is admitted when its device "
                    "KV pages fit --device-memory, otherwise it waits in a queue of at most --max-queue requests "
                    "(beyond that: HTTP 429). A request may pick its policy with the extra body field `policy`.",
        formatter_class=HelpFormatter)
    add_model_option(p)
    add_policy_option(p, what="default selection policy")
    p.add_argument("--indexer", type=Path, default=None, help="indexer checkpoint folder for policy lsa (default: shipped)")
    budget = p.add_mutually_exclusive_group()
    add_options(budget, LSAConfig, ["budget", "max_pages"])
    add_options(p, LSAConfig, _LSA_OPTIONS)
    add_options(p, EngineConfig, _ENGINE_OPTIONS)
    p.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for device memory; one more is answered 429")
    p.add_argument("--device", default="cpu", help="compute device, e.g. cpu or cuda")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from ..models.loader import DEFAULT_MODEL, load_backbone
    from ..runtime.engine import LSAEngine
    from ..serving.app import create_app
    from ..serving.metrics import Metrics
    from ..serving.worker import EngineWorker

    try:
        config = build(LSAConfig, args, ["budget", "max_pages"] + _LSA_OPTIONS,
                       budget=None if args.max_pages is not None else args.budget)
        engine_config = build(EngineConfig, args, _ENGINE_OPTIONS)
        policy_options = {"lsa": {"checkpoint": args.indexer}} if args.indexer else {}
        backbone = load_backbone(args.model, device=args.device)
        engine = LSAEngine(backbone, config, engine_config=engine_config)
        worker = EngineWorker(engine, args.policy, args.max_queue, Metrics(), policy_options)
        worker.policy(args.policy)  # an unknown policy or a bad indexer fails here, not on the first request
    except USER_ERRORS as exc:
        return fail(str(exc))
    model_id = Path(args.model).name if args.model else DEFAULT_MODEL
    app = create_app(worker, model_id)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_SECONDS)
    return 0
