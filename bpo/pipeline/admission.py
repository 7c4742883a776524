"""Admission control at the edge: what a caller sends is checked whole, up front, before anything is stored,
queued or paid for, and refused with ``INVALID_ARGUMENT`` naming the field.

Items too large for any hop (their prompt and context together above ``max_item_bytes``) are refused one by
one, with the reason, so a corpus with one huge line still runs; a job spec with a bad field is refused whole.
"""

from __future__ import annotations

import math

from bpo.endpoints import EndpointConfig, Endpoints, Role
from bpo.errors import BpoError, InvalidConfigurationError
from bpo.pipeline.optimizer_models import OptimizerModels
from bpo.settings import PlatformSettings
from bpo.v1 import bpo_pb2 as pb

# What a job may ask of a target or judge per answer; beyond it the answer alone could exceed a message.
MAX_ANSWER_TOKENS = 8192
# The paper's optimizer writes up to 1024 new tokens; four times that is room enough for any rewrite.
MAX_REWRITE_TOKENS = 4096


def _refuse(field: str, problem: str) -> InvalidConfigurationError:
    return InvalidConfigurationError(f"{field}: {problem}")


def check_params(params: pb.OptimizeParams, field: str = "params") -> None:
    """Sampling settings within the bounds the platform's own settings enforce (zero means the default)."""
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise _refuse(f"{field}.temperature", f"must be a finite number >= 0, got {params.temperature}")
    if not math.isfinite(params.top_p) or not 0 <= params.top_p <= 1:
        raise _refuse(f"{field}.top_p", f"must be within (0, 1], got {params.top_p}")
    if not 0 <= params.max_new_tokens <= MAX_REWRITE_TOKENS:
        raise _refuse(
            f"{field}.max_new_tokens",
            f"must be within 1..{MAX_REWRITE_TOKENS} (0: the default), got {params.max_new_tokens}",
        )
    if not 0 <= params.rounds <= 10:
        raise _refuse(f"{field}.rounds", f"must be within 1..10 (0: the default), got {params.rounds}")


def check_endpoint(endpoint: pb.ModelEndpoint, field: str) -> None:
    if not 0 <= endpoint.max_new_tokens <= MAX_ANSWER_TOKENS:
        raise _refuse(
            f"{field}.max_new_tokens", f"must be within 1..{MAX_ANSWER_TOKENS} (0: the default), got "
            f"{endpoint.max_new_tokens}"
        )  # fmt: skip


def item_problem(prompt: str, context: str, max_item_bytes: int) -> str | None:
    """Why an item cannot be taken (its text is empty, or too large for the platform's messages), or None."""
    if not prompt.strip():
        return "prompt is empty or only whitespace"
    size = len(prompt.encode()) + len(context.encode())
    if size > max_item_bytes:
        return (
            f"prompt and context are {size} bytes together; at most {max_item_bytes} are accepted "
            "(BPO_PLATFORM__MAX_ITEM_BYTES)"
        )
    return None


class Admission:
    """The checks of one deployment: its limits, its declared endpoints and the optimizers its workers serve."""

    def __init__(self, platform: PlatformSettings, models: OptimizerModels, endpoints: Endpoints) -> None:
        self.platform = platform
        self.models = models
        self.endpoints = endpoints

    def check_item(self, prompt: str, context: str) -> str | None:
        return item_problem(prompt, context, self.platform.max_item_bytes)

    def optimizer_model(self, name: str, field: str = "optimizer_model", team: str | None = None) -> str:
        """The served name a requested optimizer stands for (the deployment's default when empty), which
        ``team`` may use."""
        served = self.models.resolve(name or self.platform.optimizer_model, field=field)
        if served in self.endpoints.names():
            self._endpoint(served, "optimizer", team, field)
        return served

    def endpoint(self, endpoint: pb.ModelEndpoint, role: Role, team: str | None, field: str) -> EndpointConfig:
        """The declared endpoint a target or judge names (the default when it names none), for ``team``."""
        check_endpoint(endpoint, field)
        default = self.platform.target_model if role == "target" else self.platform.judge_model
        return self._endpoint(endpoint.model or default, role, team, f"{field}.model")

    def _endpoint(self, name: str, role: Role, team: str | None, field: str) -> EndpointConfig:
        try:
            return self.endpoints.get(name, role, team)
        except BpoError as exc:
            raise type(exc)(f"{field}: {exc}") from None

    def check_job_spec(self, spec: pb.JobSpec, team: str | None = None) -> None:
        """Every field of a job spec that the stages will act on, before the job exists."""
        from bpo.pipeline.jobspec import judge_template_of, stages_of

        stages = stages_of(spec)
        if "rewrite" in stages:
            self.optimizer_model(spec.optimizer_model, "spec.optimizer_model", team)
        check_params(spec.params, "spec.params")
        if "generate" in stages:
            self.endpoint(spec.target, "target", team, "spec.target")
        if "judge" in stages:
            self.endpoint(spec.judge, "judge", team, "spec.judge")
        try:
            judge_template_of(spec.judge_template)
        except InvalidConfigurationError as exc:
            raise _refuse("spec.judge_template", str(exc)) from None
