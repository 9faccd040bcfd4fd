"""Command-line options derived from the config dataclasses, so each default lives once.

`add_options(parser, LSAConfig, [...])` adds `--chunk-size` etc. with the dataclass's default and
the help text in its field metadata; `build(LSAConfig, args, [...])` makes the config back from the
parsed arguments (validation, and its error messages, stay in the dataclass). Optional field
metadata: "choices" (the allowed values) and "flag" (the option's name where it differs from the
field's, e.g. "heads" for `n_heads`; the parsed value is still stored under the field's name).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing


#: `EngineConfig` fields of the disk tier, offered by every command that runs the engine
DISK_TIER_OPTIONS = ["host_memory", "spill_dir", "prefetch_multiple"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type(cls, f: dataclasses.Field):
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0]


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls, names: list[str]) -> None:
    """Add one option per named field of dataclass `cls` (default and help from the field)."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f = by_name[name]
        default = f.default
        help_text = f.metadata.get("help", "")
        if default is not None and default is not False:
            help_text += f" (default: {default})"
        flag = f.metadata.get("flag", name)
        kind = _type(cls, f)
        if kind is bool:
            parser.add_argument(_flag(flag), dest=name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(_flag(flag), dest=name, type=kind, default=default, choices=choices, help=help_text,
                                metavar=None if choices else flag.replace("-", "_").upper())


def add_model_option(parser: argparse.ArgumentParser, single_sequence: bool = False) -> None:
    """`--model`: a local folder of a supported architecture or an embedded model's name (None: the default)."""
    from ..models.loader import DEFAULT_MODEL, EMBEDDED_MODELS, SINGLE_SEQUENCE_ARCHITECTURES, SUPPORTED_ARCHITECTURES

    kinds = list(SUPPORTED_ARCHITECTURES.values())
    if single_sequence:
        kinds += list(SINGLE_SEQUENCE_ARCHITECTURES.values())
    parser.add_argument("--model", default=None,
                        help=f"a local Hugging Face model folder ({', '.join(kinds)}) or an embedded model "
                             f"({', '.join(EMBEDDED_MODELS)}); default: {DEFAULT_MODEL}")


def add_policy_option(parser: argparse.ArgumentParser, what: str = "selection policy") -> None:
    """`--policy`: one of the registered policies (default: `DEFAULT_POLICY`)."""
    from ..policies import DEFAULT_POLICY, policy_names

    parser.add_argument("--policy", default=DEFAULT_POLICY,
                        help=f"{what}: {', '.join(policy_names())} (lsa: the learned indexer, shipped for the embedded "
                             f"models, --indexer for others; default: {DEFAULT_POLICY})")


def build(cls, args: argparse.Namespace, names: list[str], **overrides):
    """An instance of `cls` from parsed options (fields not named keep their defaults)."""
    values = {name: getattr(args, name) for name in names}
    values.update(overrides)
    return cls(**values)
