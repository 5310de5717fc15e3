"""`safeunits datasets`: list the registered datasets and where they resolve."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from safeunits.data.registry import load_dataset, registered_datasets


def register(app: typer.Typer) -> None:
    @app.command("datasets")
    def datasets_command(
        data_dir: Path = typer.Option(None, "--data-dir", help="Offline data folder (default: $SAFEUNITS_DATA_DIR)."),
        show: str = typer.Option(None, "--show", help="Print the first records of this dataset name or file."),
        limit: int = typer.Option(3, "--limit", help="How many records --show prints."),
    ) -> None:
        """List the registered datasets with their row counts, or show a few records of one."""
        if show:
            for record in load_dataset(show, data_dir=data_dir, limit=limit):
                typer.echo(record.to_dict())
            return
        table = Table("name", "rows", "description")
        for name, entry in registered_datasets().items():
            try:
                rows = str(len(load_dataset(name, data_dir=data_dir)))
            except FileNotFoundError:
                rows = "unavailable"
            table.add_row(name, rows, entry.description)
        Console().print(table)
