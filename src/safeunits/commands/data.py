"""`safeunits datasets`: list the registered datasets and where they resolve."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from safeunits.cli_options import DATA_DIR
from safeunits.data.registry import DatasetNotFoundError, load_dataset, registered_datasets

app = typer.Typer()


@app.command("datasets")
def datasets_command(
    data_dir: Optional[Path] = DATA_DIR,
    show: Optional[str] = typer.Option(None, "--show", help="Print the first records of this dataset name or file."),
    limit: int = typer.Option(3, "--limit", min=1, help="How many records --show prints."),
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
        except DatasetNotFoundError:
            rows = "unavailable"
        table.add_row(name, rows, entry.description)
    Console().print(table)
