"""CLI commands generated from step configs: one flag per pydantic field.

:func:`add_step_command` turns a config class and its run function into a typer command.
Each field becomes an option (or, with ``cli(argument=True)``, a positional argument) with
the field's name, type, default and description; ``Literal`` fields are choices, list
fields are repeatable options, ``bool`` fields are on/off switches. Only the values the
user typed are passed on, so the config's own defaults apply, and the config validates
them: a bad value is one sentence naming the flag (``Invalid --seq-len: ...``), exit 2.
"""

from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from slmkit.errors import validated


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _meta(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return dict(extra.get("cli", {})) if isinstance(extra, dict) else {}


def _strip_optional(tp: Any) -> Any:
    """``X | None`` -> ``X``; other unions are kept."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        return Union[tuple(args)]
    return tp


def _cli_type(tp: Any) -> Any:
    """The type typer parses a field's value as (validation is the config's job)."""
    tp = _strip_optional(typing.get_origin(tp) is typing.Annotated and typing.get_args(tp)[0]
                         or tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return tp
    if origin in (list, dict) or (origin in (Union, types.UnionType)
                                  and any(typing.get_origin(a) is list
                                          for a in typing.get_args(tp))):
        return list[str]             # repeatable; dicts come as key=value items
    if tp in (bool, int, float, str):
        return tp
    return str


def _parameter(name: str, info: FieldInfo) -> inspect.Parameter:
    meta = _meta(info)
    tp = _cli_type(info.annotation)
    required = info.is_required()
    help_ = info.description or ""
    default = info.get_default(call_default_factory=True) if not required else ...
    if meta.get("argument"):
        if tp == list[str]:
            spec = typer.Argument(... if required else None, help=help_, show_default=False)
        else:
            spec = typer.Argument(default, help=help_, metavar=meta.get("metavar"),
                                  show_default=not required and default is not None)
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=spec,
                                 annotation=tp if required else typing.Optional[tp])
    decls = [meta.get("flag") or flag_name(name)]
    if tp is bool and "/" not in decls[0] and default is not False:
        decls = [f"{decls[0]}/--no-{decls[0][2:]}"]
    if meta.get("short"):
        decls.append(meta["short"])
    if tp == list[str]:
        shown = default if isinstance(default, list) else ([default] if default else None)
        spec = typer.Option(... if required else None, *decls, help=help_,
                            show_default=", ".join(map(str, shown)) if shown else False,
                            metavar=meta.get("metavar"))
        annotation = tp if required else typing.Optional[tp]
    else:
        spec = typer.Option(default, *decls, help=help_, metavar=meta.get("metavar"),
                            show_default=not required and default not in (None, False))
        annotation = tp if required or default is not None else typing.Optional[tp]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=spec,
                             annotation=annotation)


def cli_fields(config: type[BaseModel]) -> dict[str, FieldInfo]:
    """The fields a command offers (hidden ones are recipe / Python only): positional
    arguments, ``--out``, the step's own options, the calibration block, then the options
    every step has."""
    from slmkit.step import Calibration, StepConfig

    fields = {n: f for n, f in config.model_fields.items() if not _meta(f).get("hidden")}
    calib, base = set(Calibration.model_fields), set(StepConfig.model_fields) - {"out"}

    def rank(name: str) -> int:
        if _meta(fields[name]).get("argument"):
            return 0
        return 1 if name == "out" else 3 if name in calib else 4 if name in base else 2

    return {n: fields[n] for n in sorted(fields, key=rank)}


def config_from_cli(config: type[BaseModel], ctx: Any, values: dict[str, Any]) -> BaseModel:
    """The validated config from what the user typed (defaults stay the config's)."""
    given = {}
    for name, value in values.items():
        source = ctx.get_parameter_source(name)
        if source is not None and source.name == "DEFAULT":
            continue
        if isinstance(value, Path):
            value = str(value)
        given[name] = list(value) if isinstance(value, tuple) else value
    return validated(config, **given)


def add_step_command(app: typer.Typer, name: str, config: type[BaseModel],
                     run: Callable[[Any], Any], help: str, *, json: bool = True) -> None:
    """Register ``name`` on ``app``: flags from ``config``, then ``run(cfg)``.

    Args:
        config: the verb's pydantic config class.
        run: ``run(cfg) -> StepResult`` for a step, shown as its table (or JSON with
            ``--json``); a verb that is not a step (``json=False``) prints for itself.
        help: the command's help text (first line: its summary).
    """
    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY,
                                annotation=typer.Context)]
    params += [_parameter(n, f) for n, f in cli_fields(config).items()]
    if json:
        params.append(inspect.Parameter(
            "as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
            default=typer.Option(False, "--json", help="Print the result as JSON for "
                                 "machines.")))

    def command(ctx: typer.Context, as_json: bool = False, **values: Any) -> None:
        result = run(config_from_cli(config, ctx, values))
        if json:
            result.show(as_json=as_json)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {}
    command.__doc__ = help
    command.__name__ = name.replace("-", "_")
    app.command(name)(command)
