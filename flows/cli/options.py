"""Run options as CLI flags, made from `RunConfig`'s fields (tasks/config.py):
the flag, type, bounds, choices, help and environment variable of each come
from its declaration there, so `run` and `serve` take the same options, checked
the same way as a deployment's parameters."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any

import annotated_types
import typer

from flows.cli.common import fail
from models.errors import UserError
from tasks.config import RunConfig, config_fields, config_from_flat, flag_of, flat_name


def _bounds(info: Any) -> dict[str, Any]:
    out = {}
    for meta in info.metadata:
        if isinstance(meta, annotated_types.Ge):
            out["min"] = meta.ge
        elif isinstance(meta, annotated_types.Le):
            out["max"] = meta.le
    return out


def _option_parameter(group: str | None, name: str, info: Any, *, required: bool) -> inspect.Parameter:
    """The typer parameter of one config field."""
    kind = info.annotation
    optional = type(None) in typing.get_args(kind)
    base = next((a for a in typing.get_args(kind) if a is not type(None)), kind) if optional else kind
    flags = flag_of(group, name, info)
    keyword: dict[str, Any] = {"help": info.description, **_bounds(info)}
    if base is bool:
        keyword.pop("min", None), keyword.pop("max", None)
    annotation = Annotated[base | None if optional else base, typer.Option(flags, **keyword)]
    default = inspect.Parameter.empty if required else (None if optional else info.default)
    return inspect.Parameter(flat_name(group, name, info), inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=annotation)


def config_option(group: str | None, name: str) -> Any:
    """The typer annotation of one config field, for a command that takes a few
    run options (`compact` takes the index's)."""
    fields = {(g, n): info for g, n, info in config_fields()}
    return _option_parameter(group, name, fields[(group, name)], required=False).annotation


def run_options() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command --source, --output and one flag per run option; the command is called with `config=` the `RunConfig` they make, plus its own
    parameters. A value out of bounds is refused by the flag (exit 2) and again
    by the config. Options left out are None: the config's defaults (and the
    environment, `RunConfig.with_environment`) fill them."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "config"]
        generated = [_option_parameter(g, n, info, required=g is None and n in ("source", "output"))
                     for g, n, info in config_fields()]
        names = {p.name for p in generated}

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            flat = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            try:
                config = config_from_flat(**flat)
            except UserError as exc:
                raise fail(exc) from None
            return command(config=config, **kwargs)

        wrapper.__signature__ = inspect.Signature(generated + own)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
        del wrapper.__wrapped__  # typer reads the signature above, not the command's own
        return wrapper

    return decorate


def flat_options(config: RunConfig) -> dict[str, Any]:
    """The config as the flat keywords its flags name (for a deployment's description, tests)."""
    out = {}
    for group, name, info in config_fields():
        value = getattr(getattr(config, group), name) if group else getattr(config, name)
        out[flat_name(group, name, info)] = value
    return out
