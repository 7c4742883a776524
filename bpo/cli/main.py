"""``bpo``: the command line. Settings are read once here and passed down."""

from __future__ import annotations

import logging
import sys

import typer

from bpo.cli import (
    admin_cmd,
    doctor_cmd,
    eval_cmd,
    jobs_cmd,
    judge_cmd,
    models_cmd,
    optimize_cmd,
    pairs_cmd,
    stack_cmd,
    train_cmd,
)
from bpo.errors import BpoError

app = typer.Typer(
    name="bpo",
    help="Black-Box Prompt Optimization: rewrite prompts so any black-box LLM answers them better.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("optimize")(optimize_cmd.optimize)
app.command("doctor")(doctor_cmd.doctor)
models_cmd.app.command("register")(train_cmd.register)
models_cmd.app.command("alias")(train_cmd.set_alias)
app.add_typer(models_cmd.app, name="models")
app.command("train")(train_cmd.train)
app.command("up")(stack_cmd.up)
app.command("status")(stack_cmd.status)
app.command("down")(stack_cmd.down)
app.command("migrate")(stack_cmd.migrate)
app.command("submit")(jobs_cmd.submit)
app.add_typer(jobs_cmd.app, name="jobs")
app.add_typer(pairs_cmd.app, name="pairs")
app.add_typer(admin_cmd.teams_app, name="teams")
app.add_typer(admin_cmd.tokens_app, name="tokens")
app.add_typer(judge_cmd.app, name="judge")
app.command("eval")(eval_cmd.eval_)
app.command("augment")(eval_cmd.augment)
app.command("serve", hidden=True)(stack_cmd.serve)
app.command("worker", hidden=True)(stack_cmd.worker)
app.command("supervise", hidden=True)(stack_cmd.supervise)


@app.callback()
def _configure(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details.")) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main() -> None:
    try:
        app()
    except BpoError as exc:
        typer.secho(f"error ({exc.status_code}): {exc}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
