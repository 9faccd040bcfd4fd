"""`flashmemory` command line: one subcommand per module named `*_cmd.py` in this folder."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from .. import __version__
from .errors import fail


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashmemory",
        description="Lookahead Sparse Attention: long-context generation with most of the KV cache off the device.")
    parser.add_argument("--version", action="version", version=f"flashmemory {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    package = importlib.import_module(__package__)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.endswith("_cmd"):
            importlib.import_module(f"{__package__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("flashmemory: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.filename is None:  # not about a path the user gave: a bug, keep the traceback
            raise
        # a path given on the command line that cannot be read or written (a file where a
        # folder is needed, no permission, a full disk): one line, whatever the subcommand
        return fail(f"{exc.filename}: {exc.strerror or exc}")


if __name__ == "__main__":
    sys.exit(main())
