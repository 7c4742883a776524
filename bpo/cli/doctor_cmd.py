"""``bpo doctor``: try every installed engine with every prepared model, each in a child process."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from bpo.doctor.checks import CheckResult, Plan, as_json, plan_checks, run_check
from bpo.errors import InvalidConfigurationError
from bpo.models.catalogue import ModelCatalogue
from bpo.models.prepare import ModelPreparer
from bpo.settings import BpoSettings


def doctor(
    engine: Annotated[
        list[str] | None, typer.Option("--engine", help="Engine to check (repeatable; default: every installed one).")
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="Model to check: a catalogue name or a local path (default: every prepared one)."),
    ] = None,
    tokens: Annotated[int, typer.Option(min=1, max=64, help="Tokens each check generates.")] = 4,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds each check may take, loading included.")] = 300,
    as_json_output: Annotated[bool, typer.Option("--json", help="Machine-readable results.")] = False,
) -> None:
    """Load each engine with each model in a child process and generate a few tokens; report OK, or the likely
    cause and fix of each failure (a crash is reported, never propagated). Exits non-zero when any check fails."""
    settings = BpoSettings()
    try:
        plan = plan_checks(
            settings,
            ModelPreparer(settings.models_dir, install_missing=None),
            ModelCatalogue(),
            engine or (),
            model or (),
        )
    except ValueError as exc:
        raise InvalidConfigurationError(str(exc)) from None
    if not plan.checks:
        _print_not_checked(plan)
        typer.secho(
            "nothing to check: no engine is installed or no model is prepared (`make install`, `make models`)",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)
    results: list[CheckResult] = []
    live = not as_json_output and sys.stdout.isatty()
    for check in plan.checks:
        if live:
            typer.echo(f"  {check.engine:<13} {check.model:<30} ...", nl=False)
        result = run_check(check, timeout_s=timeout, tokens=tokens)
        results.append(result)
        if not as_json_output:
            _print_result(result)
    if as_json_output:
        typer.echo(as_json(results, plan))
    else:
        _print_not_checked(plan)
        failed = sum(not r.ok for r in results)
        colour = typer.colors.RED if failed else typer.colors.GREEN
        typer.secho(f"{len(results) - failed} OK, {failed} failed", fg=colour)
    if any(not result.ok for result in results):
        raise typer.Exit(1)


def _print_result(result: CheckResult) -> None:
    # On a terminal the line replaces its "..." placeholder.
    start = "\r" if sys.stdout.isatty() else ""
    if result.ok:
        typer.secho(f"{start}  {result.engine:<13} {result.model:<30} OK      {result.summary}", fg=typer.colors.GREEN)
        return
    typer.secho(f"{start}  {result.engine:<13} {result.model:<30} FAILED  {result.summary}", fg=typer.colors.RED)
    typer.echo(f"      cause: {result.cause}")
    typer.echo(f"      fix:   {result.fix}")
    if result.log_tail:
        typer.echo("      end of the check's log:")
        for line in result.log_tail.splitlines():
            typer.echo(f"        {line}")


def _print_not_checked(plan: Plan) -> None:
    for engine, model, why in plan.not_checked:
        typer.secho(f"  {engine:<13} {model:<30} not checked: {why}", fg=typer.colors.YELLOW)
