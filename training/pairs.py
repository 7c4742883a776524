"""Where training reads its pairs: ``prompt_pairs`` rows whose decision is ``kept`` (migration 0002).

``PostgresPairs`` is the one read query training needs; anything with the same ``kept_pairs`` method (the pairs
store, an in-memory list in a test) can stand in for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import psycopg

from bpo.errors import BpoError
from training.data import TrainingPair


class PairSource(Protocol):
    def kept_pairs(self, datasets: Sequence[str]) -> list[TrainingPair]: ...


class PostgresPairs:
    def __init__(self, database_url: str) -> None:
        self._url = database_url

    def kept_pairs(self, datasets: Sequence[str]) -> list[TrainingPair]:
        with psycopg.connect(self._url) as conn:
            rows = conn.execute(
                "SELECT pair_id::text, record_id::text, dataset, x_user, x_opt FROM prompt_pairs"
                " WHERE decision = 'kept' AND dataset = ANY(%s) AND x_opt IS NOT NULL ORDER BY pair_id",
                (list(datasets),),
            ).fetchall()
        return [TrainingPair(*row) for row in rows]


class MissingPairsError(BpoError):
    status_code = "FAILED_PRECONDITION"


def require_pairs(source: PairSource, datasets: Sequence[str]) -> list[TrainingPair]:
    pairs = source.kept_pairs(datasets)
    found = {pair.dataset for pair in pairs}
    missing = [name for name in datasets if name not in found]
    if missing:
        raise MissingPairsError(
            f"no kept pairs in dataset(s) {', '.join(missing)}: import and build them first "
            "(bpo pairs import / bpo pairs build), or check the names with bpo pairs stats"
        )
    return pairs
