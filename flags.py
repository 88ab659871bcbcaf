"""The one way this project's scripts declare their flags: a dataclass whose fields carry a default and a
--help text, turned into an argparse parser with one --dashed-flag per field.

    @dataclass
    class Args:
        lr: float = option(2e-6, "AdamW learning rate (paper: 2e-6)")

    parser = build_parser(Args, __doc__)
    args = Args(**vars(parser.parse_args(argv)))

It sits below every script (train.py, evaluate.py, toyworld.py, tools/bench.py) and imports none of them, so
that no script imports another only for its flags.
"""

import argparse
import dataclasses
import types
import typing


def option(default, help: str, **argparse_kwargs):
    """A config field: its default, the --help text (with the paper's value where it has one) and any
    further argparse keywords (action="append", nargs="+", choices=[...])."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kwargs})


def value_type(annotation):
    """The type argparse converts each value with: str for `str | None` and `list[str]`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) in (typing.Union, list):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def build_parser(config, description: str) -> argparse.ArgumentParser:
    """One --dashed-flag per field of the config dataclass, with its help string and default."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(config):
        flag = "--" + f.name.replace("_", "-")
        kwargs = dict(f.metadata)
        help_text = kwargs.pop("help")
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
            continue
        if kwargs.get("action") != "append" and f.default is not None:
            help_text += " [%(default)s]"
        parser.add_argument(flag, type=value_type(f.type), default=f.default, help=help_text, **kwargs)
    return parser
