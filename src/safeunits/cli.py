"""The `safeunits` command line: a thin Typer shell over the sub-CLIs' module-level commands.

A user-caused error (`safeunits.errors.UserError`) ends the command with one short message and what to do,
exit status 2 and no traceback; `--debug` or `SAFEUNITS_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

import click
import typer
from typer.core import TyperGroup

from safeunits.cli_options import set_verbosity
from safeunits.errors import UserError
from safeunits.models.loading import TRUST_REMOTE_CODE_ENV

DEBUG_ENV = "SAFEUNITS_DEBUG"
USER_ERROR_EXIT = 2  # as click's usage errors


class SafeunitsGroup(TyperGroup):
    """The root command group: turns a UserError raised anywhere below into a short message and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as err:
            if ctx.meta.get("safeunits.debug") or os.environ.get(DEBUG_ENV) == "1":
                raise
            typer.echo(f"error: {err}", err=True)
            if err.hint:
                typer.echo(f"hint: {err.hint}", err=True)
            raise typer.Exit(USER_ERROR_EXIT) from None


app = typer.Typer(
    name="safeunits",
    cls=SafeunitsGroup,
    help="Post-safety alignment of LLMs at the level of single units (SSAH, SafePatching) with a three-axis evaluation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# module -> sub-command group name (None: its commands sit at the top level); each module defines `app`
COMMAND_MODULES: dict[str, str | None] = {
    "safeunits.models.cli": None,
    "safeunits.data.cli": None,
    "safeunits.eval.cli": None,
    "safeunits.train.cli": None,
    "safeunits.patching.cli": "patch",
    "safeunits.units.cli": None,
    "safeunits.experiments.cli": None,
}


@app.callback()
def _main(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also log debugging details."),
    debug: bool = typer.Option(False, "--debug", help=f"Show the full traceback of any error (also: {DEBUG_ENV}=1)."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow models whose code lives in their repository (runs that code; off by default)."),
) -> None:
    ctx.meta["safeunits.debug"] = debug
    if trust_remote_code:
        os.environ[TRUST_REMOTE_CODE_ENV] = "1"
    set_verbosity(logging.DEBUG if verbose else logging.INFO)


for _module, _group in COMMAND_MODULES.items():
    _sub = importlib.import_module(_module).app
    if _group:
        app.add_typer(_sub, name=_group)
    else:
        app.registered_commands.extend(_sub.registered_commands)


def main() -> None:
    """Entry point of `python -m safeunits` and `python -m safeunits.cli` (launchers start modules)."""
    app(prog_name="safeunits")


if __name__ == "__main__":
    main()
