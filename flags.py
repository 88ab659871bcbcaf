"""The one way this project's scripts declare their flags: a dataclass whose fields carry a default and a
--help text, turned into an argparse parser with one --dashed-flag per field.

    @dataclass
    class Args:
        lr: float = option(2e-6, "AdamW learning rate (paper: 2e-6)")

    args, parser = parse(Args, __doc__, argv)  # bounds such as option(..., at_least=1) checked here

It sits below every script (train.py, evaluate.py, toyworld.py, tools/bench.py, tools/figures.py) and imports
none of them, so that no script imports another only for its flags.
"""

import argparse
import dataclasses
import typing

BOUNDS = {"at_least": (">=", lambda value, bound: value >= bound),
          "above": (">", lambda value, bound: value > bound),
          "at_most": ("<=", lambda value, bound: value <= bound)}  # fmt: skip


def option(default, help: str, **kwargs):
    """A config field: its default, the --help text (with the paper's value where it has one), bounds that
    parse() enforces (at_least=1, above=0, at_most=1) and any further argparse keywords (action="append",
    nargs="+", choices=[...]). A `bool` field is a --flag; a `bool | None` one (default None) is --flag and
    --no-flag."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def value_type(annotation):
    """The type argparse converts each value with: str for `str | None`, `list[str]`, `list[str] | None`."""
    while typing.get_args(annotation):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def build_parser(config, description: str) -> argparse.ArgumentParser:
    """One --dashed-flag per field of the config dataclass, with its help string and default."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(config):
        flag = "--" + f.name.replace("_", "-")
        kwargs = {key: value for key, value in f.metadata.items() if key not in BOUNDS}
        help_text = kwargs.pop("help")
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
            continue
        if f.type == bool | None:  # --flag / --no-flag, None when neither is given (the script decides)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        if kwargs.get("action") != "append" and f.default is not None:
            help_text += " [%(default)s]"
        parser.add_argument(flag, type=value_type(f.type), default=f.default, help=help_text, **kwargs)
    return parser


def parse(config, description: str, argv=None):
    """(config instance, parser) from argv; a value outside its field's bounds is a one-line usage error
    (exit 2) before any work, as argparse's own errors are."""
    parser = build_parser(config, description)
    args = config(**vars(parser.parse_args(argv)))
    for f in dataclasses.fields(config):
        value = getattr(args, f.name)
        for name, (sign, holds) in BOUNDS.items():
            if name in f.metadata and not holds(value, f.metadata[name]):  # NaN holds no bound
                parser.error(f"--{f.name.replace('_', '-')} must be {sign} {f.metadata[name]}, not {value}")
    return args, parser
