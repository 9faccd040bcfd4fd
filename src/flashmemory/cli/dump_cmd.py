"""`flashmemory dump`: record hidden states, compressed keys and golden labels for indexer training."""

from __future__ import annotations

import json

from ..traces.dump import DumpConfig
from .errors import HelpFormatter, USER_ERRORS, fail
from .options import add_options, build

#: DumpConfig fields derived as options (--label-layers/--candidate-layers are layer specs, --no-quest
#: clears quest_baseline).
DUMP_OPTIONS = ["top_p", "min_layers", "region_tokens", "anchor_stride", "label_stride", "max_answer_tokens",
                "max_tokens"]


def register(sub) -> None:
    p = sub.add_parser(
        "dump", help="run the backbone over a corpus and store indexer training data (stage 1)",
        description="Run the backbone once over each document and store, for its decode positions, the attention "
                    "inputs at the candidate layers, the compressed key of every chunk and golden labels from the "
                    "backbone's real attention. Output: OUT/part-*.safetensors plus OUT/manifest.json. Re-running "
                    "the same command resumes; --shard i/N splits the documents across processes or machines.",
        formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="dump folder (created; an existing dump with the same settings resumes)")
    p.add_argument("--model", default=None, help="local Hugging Face model folder; default: embedded SmolLM2-135M-Instruct")
    p.add_argument("--synthetic", type=int, default=None,
                   help="documents from the built-in generator (default: 48, or 0 when --text/--jsonl are given)")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in generator")
    p.add_argument("--min-tokens", dest="synthetic_min_tokens", metavar="MIN_TOKENS", type=int,
                   default=1536,
                   help="built-in documents: shortest length (tokens)")
    p.add_argument("--max-tokens", dest="synthetic_max_tokens", metavar="MAX_TOKENS", type=int,
                   default=4096,
                   help="built-in documents: longest length (tokens)")
    p.add_argument("--text", nargs="*", default=[], help="UTF-8 text files, one teacher-forced document each")
    p.add_argument("--jsonl", nargs="*", default=[],
                   help='JSONL files: {"text": ...} (teacher-forced) or {"context": ..., "question": ...} (answered)')
    p.add_argument("--shard", default="0/1", help="process the documents with index %% N == i")
    add_options(p, DumpConfig, DUMP_OPTIONS)
    p.add_argument("--label-layers", default="all", help="layers whose attention votes: all, 9-29, 3,5,10-12")
    p.add_argument("--candidate-layers", default="all", help="layers whose hidden states and keys are stored")
    p.add_argument("--no-quest", dest="quest_baseline", action="store_false", default=DumpConfig.quest_baseline,
                   help="do not store the quest baseline's scores (default: store them; about 15%% of dump time)")
    p.add_argument("--max-docs", type=int, default=None, help="stop after this many new documents (resume later)")
    p.add_argument("--device", default="cpu", help="compute device for the backbone")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..indexer.checkpoint import CheckpointError
    from ..models.loader import load_backbone
    from ..traces.corpus import file_corpus, synthetic_corpus
    from ..traces.dump import DumpError, parse_layers, parse_shard, run_dump

    try:
        shard = parse_shard(args.shard)
        cfg = build(DumpConfig, args, DUMP_OPTIONS + ["quest_baseline"],
                    label_layers=parse_layers(args.label_layers), candidate_layers=parse_layers(args.candidate_layers))
        files = list(args.text) + list(args.jsonl)
        n_synth = args.synthetic if args.synthetic is not None else (0 if files else 48)
        if n_synth < 0:
            raise DumpError("--synthetic must be >= 0")
        corpus, spec = [], {}
        if n_synth:
            corpus += synthetic_corpus(n_synth, args.seed, args.synthetic_min_tokens, args.synthetic_max_tokens)
            spec["synthetic"] = {"n_docs": n_synth, "seed": args.seed, "min_tokens": args.synthetic_min_tokens,
                                 "max_tokens": args.synthetic_max_tokens}
        if files:
            corpus += file_corpus(files)
            spec["files"] = [str(f) for f in files]
        if not corpus:
            raise DumpError("no documents: give --synthetic N and/or --text/--jsonl files")
        backbone = load_backbone(args.model, device=args.device)
        summary = run_dump(backbone, corpus, args.out, cfg, corpus_spec=spec, shard=shard, progress=not args.quiet,
                           max_docs=args.max_docs)
    except (DumpError, CheckpointError, *USER_ERRORS) as exc:
        return fail(str(exc))
    d = summary.to_dict()
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        print(f"dumped {d['documents']} documents ({d['skipped']} already done) of shard {args.shard} into {args.out}: "
              f"{d['anchors']} anchors, {d['tokens']} tokens in {d['seconds']:.1f} s; "
              f"positive rate {d['positive_rate']:.3f} at min_layers={args.min_layers}; "
              f"disk {d['disk_bytes'] / 2**20:.1f} MiB")
    return 0
