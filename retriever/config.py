"""Typed job configs: a dataclass per job, filled from a YAML/JSON file and/or flags.

``parse(EvalConfig, argv)`` builds an argparse parser from the dataclass fields (``--field-name``
flags, types from annotations, help from ``field(metadata={"help": ...})``) and accepts
``--config FILE`` whose keys are the same field names; flags override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _base_type(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    return origin or annotation


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def load_file(path: str) -> dict:
    from retriever.io import store

    text = store.read_text(path)
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of option names to values")
    return data


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or ""))
    parser.add_argument("--config", help="YAML or JSON file with these options (flags win)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        base = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f.metadata.get("help", "")}
        if base is bool:
            kwargs["type"] = _parse_bool
            kwargs["nargs"] = "?"
            kwargs["const"] = True
        elif base in (list, tuple):
            kwargs["nargs"] = "+"
        elif base in (int, float, str):
            kwargs["type"] = base
        else:
            kwargs["type"] = json.loads  # dicts and nested values as JSON
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kwargs["help"] += " (required)" if required else f" (default: {default})"
        parser.add_argument(flag, **kwargs)
    return parser


def parse(cls: type[T], argv: list[str] | None, prog: str) -> T:
    parser = build_parser(cls, prog)
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    values = load_file(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        parser.error(f"unknown option(s) in the config file: {', '.join(unknown)}")
    values.update(args)
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in values]
    if missing:
        parser.error("missing required option(s): " +
                     ", ".join("--" + m.replace("_", "-") for m in missing))
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
