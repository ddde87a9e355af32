"""Config dataclasses <-> click options, both ways, from the fields' `Flag` metadata.

A process's config dataclass (TrainConfig, SampleConfig, ServeConfig) declares each field once,
with its default, help text and range (odpo.trainer.options.option). `click_options` makes the
command's options from those fields; `config_from` builds the dataclass from the parsed values;
`config_argv` writes a config's non-default values back as a command line, which is how `odpo up`
hands each child its options. Adding a field adds the option everywhere, with nothing to copy.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import click

from odpo.trainer.options import OPTION_KEY, SAME, Flag


@dataclass(frozen=True)
class Spec:
    """One command-line option of a config: the click parameter name, the field path (nested
    configs give two names: ("lora", "r")), its Flag and the field's default."""

    name: str
    path: tuple[str, ...]
    flag: Flag
    default: Any

    @property
    def cli_default(self) -> Any:
        return self.default if self.flag.cli_default is SAME else self.flag.cli_default

    @property
    def names(self) -> tuple[str, ...]:
        return self.flag.names or ("--" + self.name.replace("_", "-"),)


def specs(cls: type, *, skip: Iterable[str] = ()) -> list[Spec]:
    """The options of a config class, in field order (nested configs flattened in place)."""
    skipped = set(skip)
    return [s for s in _walk(cls, ()) if s.name not in skipped]


def _walk(cls: type, prefix: tuple[str, ...]) -> Iterator[Spec]:
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(OPTION_KEY)
        if meta == "nested":
            yield from _walk(f.default_factory, prefix + (f.name,))  # type: ignore[arg-type]
        elif isinstance(meta, Flag):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            names = meta.names or ("--" + f.name.replace("_", "-"),)
            name = names[0].lstrip("-").replace("-", "_") if prefix else f.name
            yield Spec(name=name, path=prefix + (f.name,), flag=meta, default=default)


def click_options(cls: type, *, skip: Iterable[str] = ()) -> list[Callable]:
    """Decorators adding one click option per field of `cls` (see apply_options)."""
    return [_click_option(s) for s in specs(cls, skip=skip)]


def apply_options(options: list[Callable]) -> Callable:
    """Apply a list of click.option decorators in the order listed (first = first in --help)."""
    def decorate(fn: Callable) -> Callable:
        for opt in reversed(options):
            fn = opt(fn)
        return fn
    return decorate


def _click_option(spec: Spec) -> Callable:
    flag, default = spec.flag, spec.cli_default
    kind = flag.kind or (type(spec.default) if spec.default is not None else str)
    decls = [*spec.names, spec.name]
    extra: dict[str, Any] = {}
    if kind is bool and flag.secondary:
        decls = [f"{spec.names[0]}/{flag.secondary}", spec.name]
        extra["default"] = default
    elif kind is bool:
        extra.update(is_flag=True, default=bool(default))
    else:
        extra.update(type=_click_type(flag, kind), default=default, multiple=flag.multiple)
    if flag.metavar:
        extra["metavar"] = flag.metavar
    show = flag.show_default and default is not None and not (kind is bool and not flag.secondary)
    return click.option(*decls, help=flag.help or None, show_default=show, **extra)


def _click_type(flag: Flag, kind: type) -> Any:
    if flag.choices is not None:
        return click.Choice(flag.choices)
    if kind is int and (flag.min is not None or flag.max is not None):
        return click.IntRange(flag.min, flag.max, min_open=flag.min_open, max_open=flag.max_open)
    if kind is float and (flag.min is not None or flag.max is not None):
        return click.FloatRange(flag.min, flag.max, min_open=flag.min_open, max_open=flag.max_open)
    if kind is Path:  # a file the process reads (guidelines, accounts): it must exist
        return click.Path(path_type=Path, dir_okay=False, exists=True)
    return {int: int, float: float}.get(kind, str)


def config_values(cls: type, values: dict[str, Any], *, skip: Iterable[str] = ()) -> dict[str, Any]:
    """Parsed click values -> the keyword arguments of `cls` (nested configs built); options the
    user left out (None where the field's default differs) keep the field's default."""
    out: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for spec in specs(cls, skip=skip):
        if spec.name not in values:
            continue
        value = values[spec.name]
        if value is None and spec.default is not None:
            continue  # "resolved later" defaults (beta, sources): the field's own None/default applies
        if spec.flag.parse is not None and value is not None:
            value = spec.flag.parse(value)
        target = out if len(spec.path) == 1 else nested.setdefault(spec.path[0], {})
        target[spec.path[-1]] = value
    for name, kwargs in nested.items():
        field_type = next(f for f in dataclasses.fields(cls) if f.name == name).default_factory
        out[name] = field_type(**kwargs)  # type: ignore[misc]
    return out


def config_from(cls: type, values: dict[str, Any], *, skip: Iterable[str] = (),
                error: Optional[type] = None, **fixed: Any) -> Any:
    """Build `cls` from parsed click values; its ValueError becomes one click usage line."""
    try:
        return cls(**config_values(cls, values, skip=skip), **fixed)
    except ValueError as exc:
        if error is not None and not isinstance(exc, error):
            raise
        raise click.UsageError(str(exc)) from None


def config_argv(cls: type, values: dict[str, Any], *, only: Optional[Iterable[str]] = None) -> list[str]:
    """The command line that gives a child process the same options: every option of `cls` whose
    value (as parsed by click) differs from its default, generically from the fields' flags."""
    wanted = None if only is None else set(only)
    args: list[str] = []
    for spec in specs(cls):
        if spec.name not in values or (wanted is not None and spec.name not in wanted):
            continue
        args += _flag_args(spec, values[spec.name])
    return args


def _flag_args(spec: Spec, value: Any) -> list[str]:
    default, flag = spec.cli_default, spec.flag
    if value is None or value == default or (flag.multiple and not value):
        return []
    if isinstance(value, bool):
        if value:
            return [spec.names[0]]
        return [flag.secondary] if flag.secondary else []
    render = flag.render or str
    if flag.multiple:
        return [part for item in value for part in (spec.names[0], render(item))]
    return [spec.names[0], render(value)]


def given(ctx: click.Context, names: Iterable[str]) -> list[str]:
    """The options among `names` that the user typed (not left at their default)."""
    source = ctx.get_parameter_source
    default = (None, click.core.ParameterSource.DEFAULT)
    return [n for n in names if source(n) not in default]
