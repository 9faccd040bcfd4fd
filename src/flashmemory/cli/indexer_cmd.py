"""`flashmemory indexer convert`: the DeepSeek-V4 lightning indexer between the published layout and ours."""

from __future__ import annotations

from pathlib import Path

from .errors import HelpFormatter, USER_ERRORS, fail


def register(sub) -> None:
    p = sub.add_parser(
        "indexer", help="manage DeepSeek-V4 lightning indexer checkpoints",
        description="Tools for the release-form (FlashMemory DeepSeek-V4) Neural Memory Indexer.",
        formatter_class=HelpFormatter)
    actions = p.add_subparsers(dest="indexer_command", metavar="ACTION")
    c = actions.add_parser(
        "convert", help="convert between the published .pt layout and our safetensors folder",
        description="Convert a lightning indexer checkpoint. The published layout is one torch file with "
                    "retrievers.l{L}.{wq_a.weight, wq_b.weight, q_norm_weight, weights_proj.weight} (read with "
                    "weights_only); ours is a folder with indexer.safetensors and indexer.json (config, backbone "
                    "fingerprint, sha256). Weights are kept in fp32 under the same names, so the conversion is lossless.",
        formatter_class=HelpFormatter)
    c.add_argument("src", type=Path, metavar="SRC", help="a release .pt file, or one of our checkpoint folders")
    c.add_argument("dst", type=Path, metavar="DST", help="where to write (a .pt file for release, a folder for safetensors)")
    c.add_argument("--to", choices=("safetensors", "release"), default=None,
                   help="output format; default: the format SRC is not in")
    c.add_argument("--model", default=None,
                   help="the DeepSeek-V4 model folder (config.json) the indexer is for: its RoPE parameters and "
                        "fingerprint are recorded, its hidden size checked; default: the release's constants, unbound")
    c.add_argument("--force", action="store_true", help="overwrite an existing DST")
    c.set_defaults(func=run_convert)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(parser) -> int:
    parser.print_help()
    return 2


def _backbone_config(model: str):
    from transformers import AutoConfig

    from ..indexer.lightning import LightningConfig
    from ..models.loader import BackboneError, resolve_model_path

    path = resolve_model_path(model)
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers raises many types for a bad config
        raise BackboneError(f"cannot read the model config in {path}: {str(exc).splitlines()[0]}") from None
    return LightningConfig.from_hf_config(hf_config)


def run_convert(args) -> int:
    from ..indexer.checkpoint import convert_checkpoint

    try:
        config = _backbone_config(args.model) if args.model else None
        indexer = convert_checkpoint(args.src, args.dst, to=args.to, config=config, force=args.force)
    except USER_ERRORS as exc:
        return fail(str(exc))
    c = indexer.cfg
    bound = f"bound to {c.fingerprint}" if c.fingerprint else "not bound to a backbone"
    print(f"wrote {args.dst}: layers {', '.join(map(str, c.layers))}; {c.n_heads} heads x {c.head_dim} dims, q rank "
          f"{c.q_rank}, hidden size {c.d_model}; {indexer.parameter_count():,} parameters; {bound}")
    return 0
