"""Typed job configs: a dataclass per job, filled from flags and/or a YAML/JSON file.

``parse(EvalConfig, argv, prog)`` builds a jsonargparse parser from the dataclass: one
``--field-name`` flag per field, typed by its annotation (YAML values are type-checked too, and
an error names the key), help from ``field(metadata={"help": ...})``, ``choices`` from
``metadata={"choices": [...]}``; ``--config FILE`` (YAML or JSON, a local path or any fsspec URL)
holds the same keys; flags win over the file; unknown keys are an error.

A field declared with :func:`flat` holds a nested config (e.g. the ``EncoderConfig``) whose
fields are the job's own top-level options: ``--model``/``model:``, not ``--encoder.model``.
So an option is declared once, where it belongs, and every job that needs it nests that
config. :func:`to_dict` gives the flat options back; :func:`build` makes a config from them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional, TypeVar

T = TypeVar("T")
FLAT = "flat_options"  # field metadata key: a nested config whose options are top level


def flat(config_class: type, *, only: tuple[str, ...] = (), prefix: str = "",
         **defaults) -> Any:
    """A field holding ``config_class(**defaults)``, its options flattened into the job's.

    ``only`` keeps some of its options (the others stay at their defaults); ``prefix`` names
    them ``<prefix><name>`` (``dense_model``); ``defaults`` are this job's own defaults for
    some of them (e.g. a smaller batch size)."""
    return dataclasses.field(default_factory=lambda: config_class(**defaults),
                             metadata={FLAT: (tuple(only), prefix)})


@dataclass(frozen=True)
class Option:
    """One top-level option: its flat name, where it lives in the config, its declaration."""

    name: str
    path: tuple[str, ...]
    annotation: Any
    default: Any  # dataclasses.MISSING when required
    metadata: Any

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _is_flat(f: dataclasses.Field) -> bool:
    return FLAT in f.metadata


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def options(cls: type) -> list[Option]:
    """The flat options of a config class, nested :func:`flat` configs included."""
    hints = typing.get_type_hints(cls)
    found: list[Option] = []
    for f in dataclasses.fields(cls):
        if not _is_flat(f):
            found.append(Option(f.name, (f.name,), hints[f.name], _default(f), f.metadata))
            continue
        inner = f.default_factory()
        only, prefix = f.metadata[FLAT]
        for option in options(type(inner)):
            if only and option.name not in only:
                continue
            found.append(dataclasses.replace(option, name=prefix + option.name,
                                             path=(f.name, *option.path),
                                             default=_get(inner, option.path)))
    names = [o.name for o in found]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise TypeError(f"{cls.__name__}: option(s) declared twice: {', '.join(clashes)}")
    return found


def _get(config: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        config = getattr(config, name)
    return config


def to_dict(config: Any) -> dict:
    """The flat options of a config instance (what a ``--config`` file would hold)."""
    return {o.name: _get(config, o.path) for o in options(type(config))}


def build(cls: type[T], values: dict[str, Any]) -> T:
    """``cls`` from flat option values (as :func:`to_dict` gives), the rest at defaults."""
    unknown = sorted(set(values) - {o.name for o in options(cls)})
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}")
    return _build(cls, values)


def _build(cls: type[T], values: dict[str, Any], base: Any = None) -> T:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if _is_flat(f):
            inner = getattr(base, f.name) if base is not None else f.default_factory()
            only, prefix = f.metadata[FLAT]
            given = {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}
            given = {k: v for k, v in given.items() if not only or k in only}
            kwargs[f.name] = _build(type(inner), given, inner)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
        elif base is not None:
            kwargs[f.name] = getattr(base, f.name)
    return cls(**kwargs)


def load_file(path: str) -> dict:
    """A YAML or JSON mapping from a local path or fsspec URL."""
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


def _config_action():
    from argparse import ArgumentError

    from jsonargparse import ActionConfigFile

    from retriever.errors import InputError

    class StoreConfigFile(ActionConfigFile):
        """``--config``: a local file as jsonargparse reads it, a URL through the store."""

        def __call__(self, parser, cfg, values, option_string=None):
            from retriever.io import store

            if store.has_scheme(values):  # s3://, memory://, file://, ...
                try:
                    values = store.read_text(values)  # parsed as YAML (JSON is YAML)
                except (OSError, InputError) as err:
                    raise ArgumentError(self, f"cannot read {values}: {err}") from None
            self.apply_config(parser, cfg, self.dest, values)

    return StoreConfigFile


def _argument(option: Option, enforce_required: bool) -> dict[str, Any]:
    """add_argument keywords for one option."""
    annotation = option.annotation
    meta = option.metadata
    required = option.default is dataclasses.MISSING
    kwargs: dict[str, Any] = {"dest": option.name, "help": meta.get("help", "")}
    if "choices" in meta:  # a Literal type checks file values as well as flags
        choices = Literal[tuple(meta["choices"])]  # type: ignore[misc]
        annotation = Optional[choices] if _optional(annotation) else choices
    plain = _strip_optional(annotation)
    base = typing.get_origin(plain) or plain
    if base is bool:
        kwargs.update(nargs="?", const=True)  # --flag, --flag true, --flag false
    if base in (list, tuple):  # --name A B C; the type applies to each item
        kwargs["nargs"] = "+"
        items = typing.get_args(plain)
        annotation = items[0] if items else None  # untyped items: as given
    if annotation is not None:
        kwargs["type"] = annotation
    if required:  # jsonargparse adds "(required, type: ..., default: ...)" to the help
        kwargs["required"] = enforce_required
    else:
        kwargs["default"] = option.default
    return kwargs


def _optional(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _strip_optional(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if _optional(annotation) and len(args) == 1:
        return args[0]
    return annotation


def build_parser(cls: type, prog: str, description: str = "", *, read_config: bool = False):
    """A jsonargparse parser for ``cls``: ``--config`` and one flag per option.

    With ``read_config`` (as :func:`parse` builds it) the ``--config`` file is read while
    parsing and required options must be given; without, ``--config`` is only a URL and the
    flags are checked alone (a command line can be checked without reading its file)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=prog, description=description or (cls.__doc__ or ""),
                            default_env=False)
    parser.add_argument("--config", action=_config_action() if read_config else None,
                        help="YAML or JSON file (path or URL) with these options; flags win")
    for option in options(cls):
        parser.add_argument(option.flag, **_argument(option, enforce_required=read_config))
    return parser


def _config_first(argv: list[str]) -> list[str]:
    """``--config FILE`` moved to the front, so that every flag wins over the file."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return [arg, argv[i + 1], *argv[:i], *argv[i + 2:]]
        if arg.startswith("--config="):
            return [arg, *argv[:i], *argv[i + 1:]]
    return argv


def parse(cls: type[T], argv: list[str] | None, prog: str) -> T:
    """The config given by ``argv`` (default ``sys.argv[1:]``); exits 2 on a usage error."""
    parser = build_parser(cls, prog, read_config=True)
    namespace = parser.parse_args(_config_first(list(sys.argv[1:] if argv is None else argv)))
    values = {o.name: namespace[o.name] for o in options(cls)}
    try:
        return build(cls, values)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits
