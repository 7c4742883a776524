"""Team quotas, as the operator set them (``bpo teams quota``): checked before work is accepted, and refused with
``RESOURCE_EXHAUSTED`` naming the quota and when it resets. Usage is counted per UTC day (``team_usage``)."""

from __future__ import annotations

from datetime import UTC, datetime

from bpo.auth import Caller
from bpo.errors import QuotaExceededError
from bpo.store.teams import TeamTables, next_utc_midnight


class QuotaGuard:
    def __init__(self, store: TeamTables) -> None:
        self._store = store

    @staticmethod
    def _resets() -> str:
        return next_utc_midnight(datetime.now(UTC)).isoformat().replace("+00:00", "Z")

    def check_running_jobs(self, caller: Caller) -> None:
        limit = caller.quotas.running_jobs
        if limit is None:
            return
        running = self._store.running_jobs_of(caller.team_id)
        if running >= limit:
            raise QuotaExceededError(
                f"quota running_jobs of team {caller.team!r} is used up ({running} of {limit} jobs running); "
                "it frees up as those jobs finish"
            )

    def check_items(self, caller: Caller, items_so_far: int) -> None:
        """``items_so_far``: items of the submission in progress, on top of what the team submitted today."""
        limit = caller.quotas.items_per_day
        if limit is None:
            return
        today = self._store.usage_today(caller.team_id).get("submitted", {}).get("items", 0)
        if today + items_so_far > limit:
            raise QuotaExceededError(
                f"quota items_per_day of team {caller.team!r} would be exceeded ({today} submitted today, "
                f"{items_so_far} in this job, {limit} allowed); it resets at {self._resets()}"
            )

    def check_tokens(self, caller: Caller, *roles: str) -> None:
        usage = self._store.usage_today(caller.team_id) if any(caller.quotas.token_limit(r) for r in roles) else {}
        for role in roles:
            limit = caller.quotas.token_limit(role)
            if limit is None:
                continue
            spent = usage.get(role, {})
            used = int(spent.get("tokens_in", 0)) + int(spent.get("tokens_out", 0))
            if used >= limit:
                raise QuotaExceededError(
                    f"quota tokens_per_day.{role} of team {caller.team!r} is used up ({used} of {limit} tokens); "
                    f"it resets at {self._resets()}"
                )

    def record(self, caller: Caller, role: str, tokens_in: int, tokens_out: int) -> None:
        self._store.add_usage(caller.team_id, role, tokens_in=tokens_in, tokens_out=tokens_out)
