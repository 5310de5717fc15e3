"""The `safeunits` command line: a thin Typer shell; each subpackage registers its own commands."""

from __future__ import annotations

import importlib
import logging
import os

import typer

from safeunits.models.loading import TRUST_REMOTE_CODE_ENV

app = typer.Typer(
    name="safeunits",
    help="Post-safety alignment of LLMs at the level of single units (SSAH, SafePatching) with a three-axis evaluation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# each module defines `register(app: typer.Typer) -> None`
COMMAND_MODULES = [
    "safeunits.models.cli",
    "safeunits.data.cli",
    "safeunits.eval.cli",
    "safeunits.train.cli",
    "safeunits.patching.cli",
    "safeunits.units.cli",
    "safeunits.demo",
]


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details (INFO level)."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow models whose code lives in their repository (runs that code; off by default)."),
) -> None:
    if trust_remote_code:
        os.environ[TRUST_REMOTE_CODE_ENV] = "1"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main() -> None:
    """Entry point of `python -m safeunits` and `python -m safeunits.cli` (launchers start modules)."""
    app(prog_name="safeunits")


if __name__ == "__main__":
    main()
