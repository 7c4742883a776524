"""Which optimizer model a job or an ``Optimize`` call may name, and whether a worker serves it right now.

A name is accepted when the platform declares workers for it (the workers' configured models) or a live worker
announces it; a catalogue alias of a served name (``qwen-0.5b`` for ``qwen2.5-coder-0.5b-instruct``) resolves to
the served name, whose queue the workers consume. Anything else is refused up front with the names that would
do: a task sent to a queue nobody consumes would otherwise wait out its timeout while stalling the stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from bpo.errors import EngineUnavailableError, InvalidConfigurationError
from bpo.models.catalogue import ModelCatalogue


class LiveModels(Protocol):
    def live(self, *, fresh: bool = False) -> dict[str, int]:
        """Model -> live workers serving it now (``fresh``: not from a cache); raises when that cannot be known."""


class OptimizerModels:
    def __init__(self, declared: Sequence[str], live: LiveModels, catalogue: ModelCatalogue) -> None:
        self._declared = tuple(declared)
        self._live = live
        self._catalogue = catalogue

    def _live_or_empty(self) -> dict[str, int]:
        try:
            return self._live.live()
        except Exception:
            # Whether a worker is up right now says nothing about which names are valid.
            return {}

    def resolve(self, name: str, *, field: str = "optimizer_model") -> str:
        """The served name ``name`` stands for; ``InvalidConfigurationError`` naming ``field`` otherwise."""
        served = {*self._declared, *self._live_or_empty()}
        if name in served:
            return name
        wanted = self._catalogue.canonical_name(name)
        if wanted is not None:
            for candidate in sorted(served):
                if self._catalogue.canonical_name(candidate) == wanted:
                    return candidate
        raise InvalidConfigurationError(
            f"{field}: {name!r} is not served by this platform's optimizer workers; served: "
            f"{', '.join(sorted(served)) or 'none'}"
        )

    def require_live(self, name: str) -> None:
        """``EngineUnavailableError`` when no live worker serves ``name`` now (or that cannot be known)."""
        try:
            live = self._live.live()
            if live.get(name, 0) < 1:
                # A cached "nobody" may predate a worker that has just announced itself (right after `bpo up`,
                # or a worker's restart): a refusal is only given on a fresh reading.
                live = self._live.live(fresh=True)
        except Exception as exc:
            raise EngineUnavailableError(f"cannot tell which optimizer workers are up: {exc}") from exc
        if live.get(name, 0) < 1:
            raise EngineUnavailableError(f"no optimizer worker is serving {name!r} right now")
