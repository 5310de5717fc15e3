"""The `safeunits` command line: a thin Typer shell over the sub-CLIs' module-level commands.

A user-caused error (`safeunits.errors.UserError`) ends the command with one short message and what to do,
exit status 2 and no traceback; `--debug` or `SAFEUNITS_DEBUG=1` shows the traceback instead. A command that
fails gives back the output folder it claimed while it is still empty (safeunits.outdir).

The command table is lazy: `safeunits --help`, `--version` and a mistyped command name import no command module
(those pull torch and transformers, 10 s and more); a command's module loads when that command runs.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from safeunits import __version__
from safeunits.errors import UserError
from safeunits.runtime import TRUST_REMOTE_CODE_ENV, set_threads, set_verbosity

DEBUG_ENV = "SAFEUNITS_DEBUG"
USER_ERROR_EXIT = 2  # as click's usage errors

# command -> (module defining it in its `app`, the first paragraph of its help, shown by `safeunits --help`);
# tests/test_cli.py checks that this copy matches the commands' own help
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("safeunits.commands.models", "List the named models (built on first use and cached), or build some now."),
    "datasets": ("safeunits.commands.data", "List the registered datasets with their row counts, or show a few records of one."),
    "eval": ("safeunits.commands.eval", "Evaluate a model on the three axes (safety: harmful rate = ASR and refusal rate; "
             "XSTest over-refusal; utility NLL) into a run directory."),
    "rejudge": ("safeunits.commands.eval", "Recompute a finished run's metrics from its saved answers with other judges (no "
                "model, no generation)."),
    "judge-train": ("safeunits.commands.eval", "Train the `harm` judge on every human-labelled harm source; on the same "
                    "machine and software it reproduces the shipped parameters bit for bit (`cmp` the two "
                    "weights.safetensors)."),
    "eval-compare": ("safeunits.commands.eval", "Print the three-axis table of earlier runs side by side, and whether each "
                     "difference from the first run is significant (paired tests on the same prompts: McNemar exact "
                     "for rates, bootstrap for NLL)."),
    "judge-check": ("safeunits.commands.eval", "Agreement of each judge with humans: on refusal (XSTest's human labels of 5 "
                    "models' completions: accuracy, binary, per-class F1; the learned judge leave-one-file-out), or "
                    "with --harm on harm."),
    "train": ("safeunits.commands.train", "Run a training recipe: `align` (optionally --budget ru) or `finetune` "
              "(optionally --freeze ...)."),
    "attack": ("safeunits.commands.train", "Fine-tuning attack: train a model on n examples, a share p of them harmful; "
               "optionally under frozen units."),
    "ssah-budget": ("safeunits.commands.train", "SSAH experiment (a): full align vs align on a unit budget; safety gained "
                    "and alignment tax of each."),
    "ssah-freeze": ("safeunits.commands.train", "SSAH experiment (b): fine-tune full vs frozen (i) scu+cu:top0.06 and (ii) "
                    "scu+cu; ASR before/after."),
    "attribute": ("safeunits.commands.units", "Score every MLP channel and head on safety and utility data, classify them "
                  "(SCU/UCU/CU/RU), save the unit map."),
    "prune": ("safeunits.commands.units", "Zero the units of chosen classes (or equally large random controls) and "
              "evaluate: the SSAH Table-1 check."),
    "transfer": ("safeunits.commands.units", "Role transfer: the 4x4 class transition matrix between two unit maps "
                 "(units and parameters)."),
    "probe": ("safeunits.commands.units", "Reasoning-direction probe: is the clean prompt's state closer to a refusal or a "
              "compliance continuation?"),
    "run": ("safeunits.commands.experiments", "Run a declarative experiment: cached steps (eval, align, attribute, "
            "prune, attack, patch, ...; docs/experiments.md) and a report."),
    "demo": ("safeunits.commands.experiments", "The SPEC §6 story on the default model: `safeunits run demo-quick` "
             "(see docs/experiments.md)."),
    "patch": ("safeunits.commands.patch", "SafePatching: safety / over-safety patches, controllable merge, sparse "
              "patch files, sweep, continual alignment, baselines."),
}
THREADS_HELP = ("torch CPU threads (default: $OMP_NUM_THREADS, else the CPUs this process may use: its affinity "
                "mask and cgroup quota). 1 is much faster when other jobs share the cores.")


class _NotLoaded(TyperCommand):
    """A command whose module is not imported yet: its name and help, for `safeunits --help` and suggestions."""


def _threads_callback(ctx: typer.Context, value: Optional[int]) -> Optional[int]:
    if not ctx.resilient_parsing:
        set_threads(value)
    return value


@functools.cache
def _threads_option() -> Any:
    """The one `--threads` option every command gets (built by typer from a declaration, as all other options)."""
    holder = typer.Typer()

    @holder.command()
    def _declaration(threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP,
                                                           callback=_threads_callback)) -> None:
        """Only declares the option."""

    option = typer.main.get_command(holder).params[0]
    option.expose_value = False  # the commands themselves never see it
    return option


def _with_threads(cmd: Any) -> Any:
    """Give a command (every command of a group) the shared `--threads` option; torch threads are set as it parses."""
    subcommands = getattr(cmd, "commands", None)  # a group (typer's click may be vendored: no isinstance)
    if subcommands is not None:
        for sub in subcommands.values():
            _with_threads(sub)
    elif not any("--threads" in p.opts for p in cmd.params):
        cmd.params.append(_threads_option())
    return cmd


def load_command(name: str) -> Any:
    """Import the module of command `name` and build its click command (a group for `patch`)."""
    built = typer.main.get_command(importlib.import_module(COMMANDS[name][0]).app)
    if name in getattr(built, "commands", {}):
        built = built.commands[name]
    return _with_threads(built)


class SafeunitsGroup(TyperGroup):
    """The root command group: loads a command on first use; turns a UserError raised anywhere below into a short
    message and exit status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._listing = False
        for name, (_, help_text) in COMMANDS.items():
            self.commands.setdefault(name, _NotLoaded(name, help=help_text))

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any:
        cmd = self.commands.get(cmd_name)
        if isinstance(cmd, _NotLoaded) and not self._listing:
            cmd = self.commands[cmd_name] = load_command(cmd_name)
        return cmd

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        self._listing = True  # the command list shows the table's help: no module is imported for it
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def invoke(self, ctx: typer.Context) -> Any:
        from safeunits.outdir import forget_fresh_claims, undo_fresh_claims

        forget_fresh_claims()
        try:
            return super().invoke(ctx)
        except BaseException as err:
            if not (isinstance(err, typer.Exit) and err.exit_code == 0):
                undo_fresh_claims()
            if not isinstance(err, UserError):
                raise
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


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"safeunits {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also log debugging details."),
    debug: bool = typer.Option(False, "--debug", help=f"Show the full traceback of any error (also: {DEBUG_ENV}=1)."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow models whose code lives in their repository (runs that code; off by default)."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version_callback,
                                 help="Print the version and exit."),
) -> None:
    ctx.meta["safeunits.debug"] = debug
    if trust_remote_code:
        os.environ[TRUST_REMOTE_CODE_ENV] = "1"
    set_verbosity(logging.DEBUG if verbose else logging.INFO)


def main() -> None:
    """Entry point of `python -m safeunits` and `python -m safeunits.cli` (launchers start modules)."""
    app(prog_name="safeunits")


if __name__ == "__main__":
    main()
