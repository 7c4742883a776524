"""``python -m training``: the training job, configured only by environment (``BPO_TRAIN_*``, ``BPO_STATE_DIR``).

The container entry point for a Kubernetes Job: it exits 0 with the new version's summary as one JSON line on
stdout, 2 on a configuration error (message on stderr), 1 on any other failure.
"""

from __future__ import annotations

import json
import logging
import sys

from pydantic import ValidationError

from bpo.errors import BpoError
from bpo.settings import BpoSettings
from training.config import TrainConfig
from training.job import run_job


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = TrainConfig()  # type: ignore[call-arg]
    except ValidationError as exc:
        print(f"invalid training configuration (BPO_TRAIN_*):\n{exc}", file=sys.stderr)
        return 2
    try:
        result = run_job(config, BpoSettings())
    except BpoError as exc:
        print(f"error ({exc.status_code}): {exc}", file=sys.stderr)
        return 2
    summary = {"name": result.name, "version": result.version, "run_dir": str(result.run_dir)}
    print(json.dumps(summary | {"metrics": result.metrics.summary()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
