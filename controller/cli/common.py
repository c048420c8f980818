"""What every `edgefleet` verb shares: settings from the root options, opening the registry, output, errors.

Errors: a `ControllerError` or `ProtocolError` raised inside a verb decorated with `@guarded` prints
`error: <message>` to stderr and exits with code 1 (no traceback). Usage errors stay typer's (exit code 2).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from edgefleet.controller.config import Settings, load_settings
from edgefleet.controller.data.home import open_database
from edgefleet.controller.data.registry import Registry
from edgefleet.controller.errors import ControllerError
from edgefleet.protocols.errors import ProtocolError

__all__ = [
    "CliState",
    "JsonOpt",
    "emit",
    "fail",
    "guarded",
    "open_database",
    "open_registry",
    "settings_of",
    "to_jsonable",
]

P = ParamSpec("P")
R = TypeVar("R")


@dataclasses.dataclass(slots=True)
class CliState:
    """Root options, kept until a verb asks for the settings."""

    flags: dict[str, Any]
    config_file: Path | None = None
    _settings: Settings | None = None


def settings_of(ctx: typer.Context) -> Settings:
    """Flags > EDGEFLEET_* env > TOML > defaults, loaded once per invocation."""
    state = ctx.find_root().obj
    if not isinstance(state, CliState):
        state = CliState(flags={})
        ctx.find_root().obj = state
    if state._settings is None:
        state._settings = load_settings(flags=state.flags, env=os.environ, config_file=state.config_file)
    return state._settings


def open_registry(ctx: typer.Context, *, create: bool = False) -> Registry:
    settings = settings_of(ctx)
    return Registry(open_database(settings, create=create), actor=os.environ.get("USER", "operator"))


def fail(message: str) -> typer.Exit:
    """Print the message to stderr; `raise fail(...)` exits with code 1."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def guarded(func: Callable[P, R]) -> Callable[P, R]:
    """Turn the errors an operator can cause into `error: ...` and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (ControllerError, ProtocolError) as exc:
            raise fail(str(exc)) from exc

    return wrapper


def to_jsonable(value: Any) -> Any:  # noqa: PLR0911 - one return per kind of value
    """SQLModel rows, pydantic models, dataclasses, paths and datetimes, ready for `json.dumps`."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def emit(
    rows: Sequence[dict[str, Any]],
    *,
    columns: Sequence[str],
    as_json: bool,
    title: str | None = None,
    json_value: Any = None,
) -> None:
    """Print rows as a rich table, or the JSON value (default: the rows) with `--json`."""
    if as_json:
        typer.echo(json.dumps(to_jsonable(rows if json_value is None else json_value), indent=2, sort_keys=True))
        return
    console = Console(soft_wrap=False)
    if not rows:
        console.print(f"(no {title or 'rows'})")
        return
    table = Table(title=title)
    for name in columns:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*[_cell(row.get(name)) for name in columns])
    console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if hasattr(value, "isoformat"):
        return str(value.isoformat(timespec="seconds"))
    return str(value)


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
