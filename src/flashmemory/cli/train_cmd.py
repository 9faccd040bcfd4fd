"""`flashmemory train`: train an indexer on a dump (stage 2; the backbone is never loaded).

Multi-process: `torchrun --nproc_per_node 2 -m flashmemory.cli.main train --dump D --out O` (DDP, gloo on CPU).
The shipped default: `flashmemory train --build-default` (dump + train with the recorded recipe).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..models.loader import DEFAULT_MODEL
from ..traces.recipe import RECIPES
from ..traces.train import TrainConfig
from .errors import HelpFormatter, USER_ERRORS, fail
from .options import add_options, build

#: TrainConfig fields derived as options (--layers is a layer spec and --train-queries clears freeze_queries).
TRAIN_OPTIONS = ["n_heads", "init", "q_rank", "ensemble", "score", "min_layers", "neg_ratio", "vote_weighting", "gamma",
                 "lr", "batch_size", "epochs", "patience", "val_fraction", "fine_key_block", "time_limit", "seed"]


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train a Neural Memory Indexer on a dump (stage 2, backbone-free)",
        description="Train the indexer on the tensors of one or more dumps; the backbone is never loaded. Writes "
                    "OUT/indexer.safetensors and OUT/indexer.json, bound to the dump's backbone fingerprint. Under "
                    "torchrun the processes train one model with DDP. --build-default reproduces the shipped indexer.",
        formatter_class=HelpFormatter)
    p.add_argument("--dump", nargs="+", default=None, help="dump folder(s) from `flashmemory dump`")
    p.add_argument("--out", default=None, help="checkpoint folder to write")
    p.add_argument("--layers", default=None, help="target layers, e.g. 10,15,20 (default: the dump's recommendation)")
    add_options(p, TrainConfig, TRAIN_OPTIONS)
    p.add_argument("--train-queries", dest="freeze_queries", action="store_false", default=TrainConfig.freeze_queries,
                   help="also train wq_a/wq_b after the backbone init (default: keep them, train the rest)")
    p.add_argument("--fp32", action="store_true", help="store fp32 weights (default fp16: half the size)")
    p.add_argument("--build-default", action="store_true",
                   help="dump the built-in corpus with the shipped recipe (resumable) and train the shipped indexer "
                        "of --model")
    p.add_argument("--model", default=None,
                   help="--build-default: the embedded model whose shipped indexer to rebuild: "
                        f"{', '.join(RECIPES)} (default: {DEFAULT_MODEL})")
    p.add_argument("--work", default=None,
                   help="--build-default: where the dump goes (default: the recipe's, e.g. runs/default-indexer)")
    p.add_argument("--json", action="store_true", help="print the training summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no per-epoch log")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..indexer.checkpoint import CheckpointError, save_indexer, shipped_dir
    from ..traces.dataset import TraceError
    from ..traces.dump import DumpError, parse_layers
    from ..traces.train import TrainError, init_distributed, train_indexer

    try:
        distributed = init_distributed()
        rank = torch.distributed.get_rank() if distributed else 0
        dump_seconds = None
        if args.build_default:
            name = args.model or DEFAULT_MODEL
            if name not in RECIPES:
                raise TrainError(f"no shipped recipe for model {name!r}; choose one of: {', '.join(RECIPES)}")
            recipe = RECIPES[name]
            dumps = [str(Path(args.work or recipe.work) / "dump")]
            out = args.out or str(shipped_dir(name))
            dump_seconds = _build_default_dump(recipe, dumps[0], quiet=args.quiet) if rank == 0 else None
            if distributed:
                torch.distributed.barrier()
            cfg = recipe.train
        else:
            if args.model is not None:
                raise TrainError("--model only names the recipe of --build-default; training reads only the dump")
            if not args.dump or not args.out:
                raise TrainError("give --dump DIR and --out DIR (or --build-default)")
            dumps, out = args.dump, args.out
            cfg = build(TrainConfig, args, TRAIN_OPTIONS + ["freeze_queries"], layers=parse_layers(args.layers))
        result = train_indexer(dumps, cfg, progress=not args.quiet and rank == 0)
        if rank == 0:
            dtype = torch.float32 if args.fp32 else torch.float16
            extra = {"dump_seconds": dump_seconds} if dump_seconds is not None else None
            folder = save_indexer(result.indexer, out, dtype=dtype, extra=extra)
    except (TrainError, TraceError, DumpError, CheckpointError, *USER_ERRORS) as exc:
        return fail(str(exc))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank != 0:
        return 0
    summary = result.summary()
    summary["checkpoint"] = str(folder)
    summary["weights_bytes"] = (Path(folder) / "indexer.safetensors").stat().st_size
    if dump_seconds is not None:
        summary["dump_seconds"] = round(dump_seconds, 1)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        v, q = summary["val"] or {}, summary["val_quest"] or {}
        print(f"trained {summary['parameters']:,} parameters on layers {summary['layers']} in {summary['seconds']:.1f} s "
              f"({summary['epochs_run']} epochs, {summary['world_size']} process(es)); train loss "
              f"{summary['train_loss_first']:.4f} -> {summary['train_loss_last']:.4f}")
        if v:
            quest = f"quest {q['recall_at_budget']:.3f}" if q else "no quest scores in the dump"
            print(f"validation: recall@budget {v['recall_at_budget']:.3f} ({quest}), "
                  f"F1@0.5 {v['f1']:.3f}, resident fraction {v['resident_fraction']:.3f}, "
                  f"positive rate {v['positive_rate']:.3f}")
        print(f"wrote {folder} ({summary['weights_bytes'] / 1024:.0f} KiB of weights)")
    return 0


def _build_default_dump(recipe, folder: str, quiet: bool = False) -> float:
    """Dump (or finish dumping) a shipped indexer's corpus with its recorded recipe; returns the
    backbone seconds spent on the whole dump (all runs of it, resumes included)."""
    from ..models.loader import load_backbone
    from ..traces.dump import dump_seconds, run_dump

    backbone = load_backbone(recipe.model)
    summary = run_dump(backbone, recipe.documents(), folder, recipe.dump, corpus_spec=recipe.corpus,
                       progress=not quiet)
    total = dump_seconds(folder)
    if not quiet:
        print(f"dump: {summary.documents} new documents ({summary.skipped} resumed) in {summary.seconds:.1f} s; "
              f"{total:.0f} s of backbone time in all; {summary.disk_bytes / 2**20:.1f} MiB on disk")
    return total
