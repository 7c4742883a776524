"""Where training reads its pairs: ``prompt_pairs`` rows whose decision is ``kept`` (migration 0002).

``StorePairs`` reads them through the platform's pairs store; anything with the same ``kept_pairs`` method (an
in-memory list in a test) can stand in for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from bpo.errors import BpoError
from bpo.store.pairs import PairsStore
from training.data import TrainingPair


class PairSource(Protocol):
    def kept_pairs(self, datasets: Sequence[str]) -> list[TrainingPair]: ...


class StorePairs:
    def __init__(self, store: PairsStore) -> None:
        self._store = store

    def kept_pairs(self, datasets: Sequence[str]) -> list[TrainingPair]:
        return [
            TrainingPair(pair.pair_id, pair.record_id, pair.dataset, pair.x_user, pair.x_opt)
            for pair in self._store.kept_pairs(datasets)
        ]


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
