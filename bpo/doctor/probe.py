"""One engine check, run as a child process so that a crash in native code (a build for another CPU, corrupt
weights) is a report, never the death of the caller.

``python -m bpo.doctor.probe --engine E --model M --tokens N --result FILE`` loads the engine the way the platform
does, generates N tokens greedily, and writes one JSON object to FILE: ``{"ok": true, ...timings}`` or
``{"ok": false, "error_type": ..., "error": ...}``. A crash leaves FILE unwritten; the parent reads the signal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bpo.engines.base import ChatMessage, GenerationRequest, SamplingParams
from bpo.engines.factory import build_engine, resolve_spec
from bpo.models.catalogue import ModelCatalogue
from bpo.models.prepare import ModelPreparer
from bpo.settings import BpoSettings, EngineSettings

PROBE_PROMPT = "Reply with one short sentence: what is the capital of France?"


def run_probe(settings: BpoSettings, engine: str, model: str, tokens: int) -> dict[str, Any]:
    engine_settings = EngineSettings.model_validate(settings.engine.model_dump() | {"name": engine, "model": model})
    # Never install or convert anything here: the doctor reports what is there.
    preparer = ModelPreparer(settings.models_dir, install_missing=None)
    started = time.perf_counter()
    spec = resolve_spec(engine_settings, ModelCatalogue())
    client = build_engine(engine_settings, spec, preparer)
    loaded = time.perf_counter()
    request = GenerationRequest(
        messages=(ChatMessage("user", PROBE_PROMPT),), params=SamplingParams(temperature=0.0, max_tokens=tokens)
    )

    async def generate() -> Any:
        try:
            return (await client.generate([request]))[0]
        finally:
            await client.aclose()

    completion = asyncio.run(generate())
    if completion.completion_tokens == 0 and not completion.text:
        raise RuntimeError("the engine loaded but generated nothing")
    return {
        "ok": True,
        "version": client.identity.version,
        "text": completion.text,
        "completion_tokens": completion.completion_tokens,
        "load_s": round(loaded - started, 3),
        "generate_s": round(time.perf_counter() - loaded, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        result = run_probe(BpoSettings(), args.engine, args.model, args.tokens)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        result = {"ok": False, "error_type": type(exc).__name__, "error": str(exc)}
    args.result.write_text(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
