"""`safeunits models`: list and build the named models."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from safeunits.errors import ModelNotFoundError
from safeunits.models.loading import named_model_dir, named_models, resolve_model

app = typer.Typer()


@app.command("models")
def models_command(
    build: list[str] = typer.Option([], "--build", help="Build (or rebuild with --rebuild) this named model into the cache."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Delete the cached copy first and build it again."),
) -> None:
    """List the named models (built on first use and cached), or build some now."""
    for name in build:
        if name not in named_models():
            raise ModelNotFoundError(f"unknown named model {name!r}", hint=f"known: {', '.join(named_models())}")
        typer.echo(f"{name}: {resolve_model(name, rebuild=rebuild)}")
    table = Table("name", "cached", "description")
    for name, entry in named_models().items():
        table.add_row(name, "yes" if (named_model_dir(name) / "config.json").is_file() else "no", entry.description)
    Console().print(table)
