"""``bpo teams ...`` and ``bpo tokens ...``: the operator's commands, straight against the platform's database.

They need the database (``BPO_PLATFORM__DATABASE_URL``, or the running local platform's), which is what makes
them the operator's: no RPC creates teams or tokens. A token is printed once, when it is created.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from bpo.cli.pairs_cmd import database_url
from bpo.errors import InvalidConfigurationError
from bpo.settings import BpoSettings
from bpo.store.db import migrate, open_pool
from bpo.store.repository import PipelineStore
from bpo.store.teams import USAGE_ROLES, TeamQuotas

teams_app = typer.Typer(help="Teams: the callers of the platform (operator only).", no_args_is_help=True)
tokens_app = typer.Typer(help="Bearer tokens of teams (operator only).", no_args_is_help=True)


@contextmanager
def _store() -> Iterator[PipelineStore]:
    pool = open_pool(database_url(BpoSettings()), min_size=1, max_size=2)
    try:
        migrate(pool)
        yield PipelineStore(pool)
    finally:
        pool.close()


@teams_app.command("create")
def create_team(
    name: str,
    admin: Annotated[bool, typer.Option("--admin", help="Sees and manages every team's jobs.")] = False,
) -> None:
    """Create a team."""
    with _store() as store:
        team = store.create_team(name, admin=admin)
    typer.echo(f"team {team.name} created{' (admin)' if team.admin else ''}")


@teams_app.command("list")
def list_teams(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every team with its state and quotas."""
    with _store() as store:
        teams = store.teams()
    rows = [
        {"name": t.name, "admin": t.admin, "disabled": t.disabled, "quotas": t.quotas.model_dump(exclude_defaults=True)}
        for t in teams
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        flags = ", ".join(f for f, on in (("admin", row["admin"]), ("disabled", row["disabled"])) if on)
        typer.echo(f"{row['name']:<24} {flags or '-':<16} quotas {json.dumps(row['quotas']) or '{}'}")


@teams_app.command("disable")
def disable_team(name: str) -> None:
    """Refuse every call of the team (PERMISSION_DENIED) until it is enabled again; its jobs stay."""
    with _store() as store:
        store.set_team_disabled(name, True)
    typer.echo(f"team {name} disabled")


@teams_app.command("enable")
def enable_team(name: str) -> None:
    """Let a disabled team call again."""
    with _store() as store:
        store.set_team_disabled(name, False)
    typer.echo(f"team {name} enabled")


@teams_app.command("quota")
def set_quota(
    name: str,
    running_jobs: Annotated[int | None, typer.Option(min=0, help="Jobs submitting or running at once.")] = None,
    items_per_day: Annotated[int | None, typer.Option(min=0, help="Items submitted per UTC day.")] = None,
    tokens_per_day: Annotated[
        list[str] | None,
        typer.Option(help="ROLE=N tokens (in + out) per UTC day; ROLE is optimizer, target or judge. Repeatable."),
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove every quota first.")] = False,
) -> None:
    """Set a team's quotas (unset ones stay as they are; --clear starts from none)."""
    with _store() as store:
        current = TeamQuotas() if clear else store.team(name).quotas
        tokens = dict(current.tokens_per_day)
        for entry in tokens_per_day or ():
            role, _, number = entry.partition("=")
            if role not in USAGE_ROLES or not number.isdigit():
                raise InvalidConfigurationError(
                    f"--tokens-per-day {entry!r}: expected ROLE=N, ROLE one of {USAGE_ROLES}"
                )
            tokens[role] = int(number)
        quotas = TeamQuotas(
            running_jobs=running_jobs if running_jobs is not None else current.running_jobs,
            items_per_day=items_per_day if items_per_day is not None else current.items_per_day,
            tokens_per_day=tokens,
        )
        team = store.set_quotas(name, quotas)
    typer.echo(f"team {team.name} quotas: {json.dumps(team.quotas.model_dump(exclude_defaults=True))}")


@tokens_app.command("create")
def create_token(
    team: Annotated[str, typer.Option(help="The team the token belongs to.")],
    description: Annotated[str, typer.Option(help="What the token is for.")] = "",
) -> None:
    """Issue a token; it is printed this once and stored only as a hash."""
    with _store() as store:
        info, token = store.create_token(team, description)
    typer.secho(f"token {info.token_id} for team {info.team} (shown once; keep it secret):", err=True)
    typer.echo(token)


@tokens_app.command("list")
def list_tokens(
    team: Annotated[str | None, typer.Option(help="Only this team's.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Tokens by id, team and the first characters of the token (never the token)."""
    with _store() as store:
        tokens = store.tokens(team)
    rows = [
        {
            "token_id": t.token_id,
            "team": t.team,
            "prefix": t.prefix,
            "description": t.description,
            "created_at": t.created_at.isoformat(),
            "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
            "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
        }
        for t in tokens
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = "revoked" if row["revoked_at"] else "active"
        typer.echo(f"{row['token_id']}  {row['team']:<20} {row['prefix']}...  {state:<8} {row['description']}")


@tokens_app.command("revoke")
def revoke_token(token_id: str) -> None:
    """Revoke a token (calls with it are refused within the services' auth cache time, 5 s by default)."""
    with _store() as store:
        if not store.revoke_token(token_id):
            raise InvalidConfigurationError(f"no active token {token_id!r}")
    typer.echo(f"token {token_id} revoked")
