"""Teams, their bearer tokens, quotas and daily usage (tables of migration 0006).

A token is shown once, when it is created, and stored only as its SHA-256 hash: a token is 256 random bits, so a
fast hash is enough (nothing to brute-force), and a leaked table reveals no usable token. Days are UTC days.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from psycopg import Connection
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, Field

from bpo.errors import BpoError, InvalidConfigurationError

TOKEN_PREFIX = "bpo_"
USAGE_ROLES = ("optimizer", "target", "judge")


class TeamNotFoundError(BpoError):
    status_code = "NOT_FOUND"


class TeamQuotas(BaseModel, extra="forbid"):
    """What a team may use; ``None`` is unlimited. Per day means per UTC day."""

    running_jobs: int | None = Field(default=None, ge=0)
    items_per_day: int | None = Field(default=None, ge=0)
    # Tokens (in and out together) per day for each role: optimizer, target, judge.
    tokens_per_day: dict[str, int] = Field(default_factory=dict)

    def token_limit(self, role: str) -> int | None:
        return self.tokens_per_day.get(role)


@dataclass(frozen=True, slots=True)
class Team:
    team_id: str
    name: str
    admin: bool
    disabled: bool
    quotas: TeamQuotas = field(default_factory=TeamQuotas)


@dataclass(frozen=True, slots=True)
class TokenInfo:
    token_id: str
    team: str
    prefix: str
    description: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def next_utc_midnight(now: datetime | None = None) -> datetime:
    current = now or datetime.now(UTC)
    return datetime.combine(current.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)


def _team(row: dict[str, Any]) -> Team:
    return Team(str(row["team_id"]), row["name"], row["admin"], row["disabled"], TeamQuotas(**(row["quotas"] or {})))


class TeamTables:
    _pool: ConnectionPool[Connection[dict[str, Any]]]

    # -- teams -------------------------------------------------------------------------------------------

    def create_team(self, name: str, *, admin: bool = False) -> Team:
        if not name or len(name) > 64 or not all(c.isalnum() or c in "._-" for c in name):
            raise InvalidConfigurationError(f"team name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        with self._pool.connection() as conn:
            row = conn.execute(
                "INSERT INTO teams (team_id, name, admin) VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING"
                " RETURNING *",
                (str(uuid.uuid4()), name, admin),
            ).fetchone()
        if row is None:
            raise InvalidConfigurationError(f"team {name!r} exists already")
        return _team(row)

    def team(self, name: str) -> Team:
        with self._pool.connection() as conn:
            row = conn.execute("SELECT * FROM teams WHERE name = %s", (name,)).fetchone()
        if row is None:
            raise TeamNotFoundError(f"no team named {name!r}")
        return _team(row)

    def teams(self) -> list[Team]:
        with self._pool.connection() as conn:
            rows = conn.execute("SELECT * FROM teams ORDER BY name").fetchall()
        return [_team(row) for row in rows]

    def set_team_disabled(self, name: str, disabled: bool) -> Team:
        with self._pool.connection() as conn:
            row = conn.execute(
                "UPDATE teams SET disabled = %s WHERE name = %s RETURNING *", (disabled, name)
            ).fetchone()
        if row is None:
            raise TeamNotFoundError(f"no team named {name!r}")
        return _team(row)

    def set_quotas(self, name: str, quotas: TeamQuotas) -> Team:
        with self._pool.connection() as conn:
            row = conn.execute(
                "UPDATE teams SET quotas = %s WHERE name = %s RETURNING *",
                (Jsonb(quotas.model_dump(exclude_defaults=True)), name),
            ).fetchone()
        if row is None:
            raise TeamNotFoundError(f"no team named {name!r}")
        return _team(row)

    # -- tokens ------------------------------------------------------------------------------------------

    def create_token(self, team: str, description: str = "") -> tuple[TokenInfo, str]:
        """A new token for ``team``: its record and the token itself, which is never stored or shown again."""
        owner = self.team(team)
        token = new_token()
        with self._pool.connection() as conn:
            row = conn.execute(
                "INSERT INTO api_tokens (token_id, team_id, token_hash, prefix, description)"
                " VALUES (%s, %s, %s, %s, %s) RETURNING *",
                (str(uuid.uuid4()), owner.team_id, hash_token(token), token[:12], description),
            ).fetchone()
        assert row is not None
        return self._token_info(row, owner.name), token

    def tokens(self, team: str | None = None) -> list[TokenInfo]:
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT t.*, teams.name AS team FROM api_tokens t JOIN teams USING (team_id)"
                " WHERE %s::text IS NULL OR teams.name = %s ORDER BY t.created_at",
                (team, team),
            ).fetchall()
        return [self._token_info(row, row["team"]) for row in rows]

    def revoke_token(self, token_id: str) -> bool:
        try:
            uuid.UUID(token_id)
        except ValueError:
            return False
        with self._pool.connection() as conn:
            return (
                conn.execute(
                    "UPDATE api_tokens SET revoked_at = now() WHERE token_id = %s AND revoked_at IS NULL", (token_id,)
                ).rowcount
                == 1
            )

    def team_for_token(self, token: str) -> Team | None:
        """The team a valid, unrevoked token belongs to (disabled teams included: the caller says why not)."""
        with self._pool.connection() as conn:
            row = conn.execute(
                "UPDATE api_tokens SET last_used_at = now() FROM teams"
                " WHERE api_tokens.token_hash = %s AND api_tokens.revoked_at IS NULL"
                " AND teams.team_id = api_tokens.team_id RETURNING teams.*",
                (hash_token(token),),
            ).fetchone()
        return _team(row) if row is not None else None

    @staticmethod
    def _token_info(row: dict[str, Any], team: str) -> TokenInfo:
        return TokenInfo(
            token_id=str(row["token_id"]),
            team=team,
            prefix=row["prefix"],
            description=row["description"],
            created_at=row["created_at"],
            revoked_at=row["revoked_at"],
            last_used_at=row["last_used_at"],
        )

    # -- usage and quotas --------------------------------------------------------------------------------

    def running_jobs_of(self, team_id: str) -> int:
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT count(*) AS n FROM jobs WHERE team_id = %s AND state IN ('submitting', 'running')", (team_id,)
            ).fetchone()
        return int(row["n"]) if row is not None else 0

    def usage_today(self, team_id: str) -> dict[str, dict[str, int]]:
        """Role ('optimizer', 'target', 'judge', 'submitted') -> tokens_in, tokens_out and items today (UTC)."""
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT role, tokens_in, tokens_out, items FROM team_usage"
                " WHERE team_id = %s AND day = (now() AT TIME ZONE 'UTC')::date",
                (team_id,),
            ).fetchall()
        return {row["role"]: {"tokens_in": row["tokens_in"], "tokens_out": row["tokens_out"],
                              "items": row["items"]} for row in rows}  # fmt: skip

    def add_usage(self, team_id: str, role: str, *, tokens_in: int = 0, tokens_out: int = 0, items: int = 0) -> None:
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO team_usage (team_id, day, role, tokens_in, tokens_out, items)"
                " VALUES (%s, (now() AT TIME ZONE 'UTC')::date, %s, %s, %s, %s)"
                " ON CONFLICT (team_id, day, role) DO UPDATE SET tokens_in = team_usage.tokens_in + excluded.tokens_in,"
                " tokens_out = team_usage.tokens_out + excluded.tokens_out, items = team_usage.items + excluded.items",
                (team_id, role, tokens_in, tokens_out, items),
            )

    def teams_over_token_quota(self, role: str, team_ids: Sequence[str]) -> set[str]:
        """Which of ``team_ids`` used up today's ``role`` token quota."""
        wanted = sorted(set(team_ids))
        if not wanted:
            return set()
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT t.team_id::text AS team_id FROM teams t"
                " JOIN team_usage u ON u.team_id = t.team_id AND u.day = (now() AT TIME ZONE 'UTC')::date"
                "  AND u.role = %s"
                " WHERE t.team_id = ANY(%s::uuid[]) AND (t.quotas->'tokens_per_day'->>%s) IS NOT NULL"
                " AND u.tokens_in + u.tokens_out >= (t.quotas->'tokens_per_day'->>%s)::bigint",
                (role, wanted, role, role),
            ).fetchall()
        return {row["team_id"] for row in rows}

    def today(self) -> date:
        return datetime.now(UTC).date()
