"""Conversions between the API's protobuf messages and the library's results, and their JSON form in Postgres.

Kafka topics and gRPC carry the same protobuf messages (``bpo.v1``); Postgres stores them as JSON with the
proto field names, so a stored stage output can be re-published as it was.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from bpo.optimizer.optimizer import OptimizeParams, RewriteResult
from bpo.v1 import bpo_pb2 as pb

M = TypeVar("M", bound=Message)

WINNER_NAMES = {
    pb.WINNER_OPTIMIZED: "optimized",
    pb.WINNER_ORIGINAL: "original",
    pb.WINNER_TIE: "tie",
}
WINNER_VALUES = {name: value for value, name in WINNER_NAMES.items()}
STAGE_NAMES = {pb.STAGE_REWRITE: "rewrite", pb.STAGE_GENERATE: "generate", pb.STAGE_JUDGE: "judge"}
STAGE_VALUES = {name: value for value, name in STAGE_NAMES.items()}
ALL_STAGES = ("rewrite", "generate", "judge")


def to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def from_json(data: dict[str, Any], message_type: type[M]) -> M:
    return json_format.ParseDict(data, message_type(), ignore_unknown_fields=True)


def _from_float32(value: float) -> float:
    """The shortest decimal that a proto ``float`` (32 bits) stands for: 0.6 is read back as 0.6000000238418579,
    which would make an explicit 0.6 other parameters (another rewrite-cache key) than the default 0.6."""
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", candidate))[0] == value:
            return candidate
    return value


def params_from_proto(params: pb.OptimizeParams, defaults: OptimizeParams | None = None) -> OptimizeParams:
    """Zero values in the proto mean "the default" (proto3 has no presence for scalars but ``seed``)."""
    base = defaults or OptimizeParams()
    return OptimizeParams(
        temperature=_from_float32(params.temperature) if params.temperature > 0 else base.temperature,
        top_p=_from_float32(params.top_p) if params.top_p > 0 else base.top_p,
        max_new_tokens=params.max_new_tokens or base.max_new_tokens,
        seed=params.seed if params.HasField("seed") else base.seed,
        rounds=params.rounds or base.rounds,
    )


def params_to_proto(params: OptimizeParams) -> pb.OptimizeParams:
    message = pb.OptimizeParams(
        temperature=params.temperature,
        top_p=params.top_p,
        max_new_tokens=params.max_new_tokens,
        rounds=params.rounds,
    )
    if params.seed is not None:
        message.seed = params.seed
    return message


def params_hash(params: OptimizeParams) -> str:
    canonical = json.dumps(params.as_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def prompt_hash(prompt: str, context: str | None) -> str:
    return hashlib.sha256(f"{prompt}\x00{context or ''}".encode()).hexdigest()


def rewrite_from_result(item: pb.PromptItem, result: RewriteResult, *, cache_hit: bool = False) -> pb.Rewrite:
    params = OptimizeParams(**{k: v for k, v in result.params.items() if k in OptimizeParams.__dataclass_fields__})
    return pb.Rewrite(
        item=item,
        optimized=result.optimized,
        model=result.model,
        model_version=result.model_version,
        engine=result.engine,
        params=params_to_proto(params),
        rounds_done=result.rounds_done,
        tokens_in=result.tokens_in,
        tokens_out=result.tokens_out,
        latency_s=result.latency_s,
        fallback_reason=result.fallback_reason or "",
        stop_reason=result.stop_reason,
        cache_hit=cache_hit,
    )
