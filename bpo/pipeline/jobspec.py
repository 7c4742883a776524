"""A job's specification with the platform's defaults filled in: what every stage reads before it acts."""

from __future__ import annotations

import time
from dataclasses import dataclass
from threading import Lock

from bpo.engines.factory import ENGINE_NAMES
from bpo.engines.registry import EndpointKey
from bpo.errors import InvalidConfigurationError, JobNotFoundError
from bpo.judging.pairwise import JUDGE_TEMPLATES, JudgeTemplate
from bpo.messages import ALL_STAGES, STAGE_NAMES, from_json, params_from_proto
from bpo.optimizer.optimizer import OptimizeParams
from bpo.settings import PlatformSettings
from bpo.store.repository import JobRow, PipelineStore
from bpo.v1 import bpo_pb2 as pb

DEFAULT_ANSWER_TOKENS = 256
DEFAULT_JUDGE_TOKENS = 384


@dataclass(frozen=True, slots=True)
class ResolvedJob:
    job_id: str
    state: str
    stages: tuple[str, ...]
    optimizer_model: str
    params: OptimizeParams
    target: EndpointKey
    target_max_new_tokens: int
    judge: EndpointKey
    judge_max_new_tokens: int
    judge_template: JudgeTemplate = "pair-v2"

    def next_stage(self, stage: str) -> str | None:
        index = self.stages.index(stage)
        return self.stages[index + 1] if index + 1 < len(self.stages) else None

    def is_last(self, stage: str) -> bool:
        return self.next_stage(stage) is None

    @property
    def active(self) -> bool:
        return self.state == "running"


def stages_of(spec: pb.JobSpec) -> tuple[str, ...]:
    wanted = {STAGE_NAMES[s] for s in spec.stages if s in STAGE_NAMES}
    if spec.stages and len(wanted) != len(spec.stages):
        raise InvalidConfigurationError("stages must be REWRITE, GENERATE or JUDGE, each at most once")
    stages = tuple(s for s in ALL_STAGES if s in wanted) or ALL_STAGES
    # A later stage needs the earlier ones' outputs: only a prefix of rewrite -> generate -> judge makes sense.
    if stages != ALL_STAGES[: len(stages)]:
        raise InvalidConfigurationError(f"stages {', '.join(stages)} skip a stage the later ones depend on")
    return stages


def endpoint_key(endpoint: pb.ModelEndpoint, default_engine: str, default_model: str) -> EndpointKey:
    engine = endpoint.engine or ("openai" if endpoint.base_url else default_engine)
    if engine not in ENGINE_NAMES:
        raise InvalidConfigurationError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINE_NAMES)}")
    return EndpointKey(
        engine=engine,  # type: ignore[arg-type]
        model=endpoint.model or default_model,
        base_url=endpoint.base_url,
        api_key_env=endpoint.api_key_env,
        max_concurrency=endpoint.max_concurrency,
        requests_per_second=endpoint.requests_per_second,
    )


def judge_template_of(name: str) -> JudgeTemplate:
    """An empty name is the paper's GPT-4 protocol, pair-v2."""
    if not name:
        return "pair-v2"
    if name not in JUDGE_TEMPLATES:
        raise InvalidConfigurationError(f"unknown judge template {name!r}; choose one of {', '.join(JUDGE_TEMPLATES)}")
    return name


def resolve(job: JobRow, platform: PlatformSettings, defaults: OptimizeParams | None = None) -> ResolvedJob:
    """``defaults`` are the deployment's optimizer settings: a job that names no parameter gets them, exactly
    as a synchronous Optimize call does, so both share rewrite-cache entries."""
    spec = from_json(job.spec, pb.JobSpec)
    return ResolvedJob(
        job_id=job.job_id,
        state=job.state,
        stages=job.stages,
        optimizer_model=spec.optimizer_model or platform.optimizer_model,
        params=params_from_proto(spec.params, defaults),
        target=endpoint_key(spec.target, platform.target_engine, platform.target_model),
        target_max_new_tokens=spec.target.max_new_tokens or DEFAULT_ANSWER_TOKENS,
        judge=endpoint_key(spec.judge, platform.judge_engine, platform.judge_model),
        judge_max_new_tokens=spec.judge.max_new_tokens or DEFAULT_JUDGE_TOKENS,
        judge_template=judge_template_of(spec.judge_template),
    )


class JobLookup:
    """Stages look a job up for every message; specs never change and states change rarely, so cache briefly."""

    def __init__(
        self,
        store: PipelineStore,
        platform: PlatformSettings,
        ttl_s: float = 2.0,
        *,
        defaults: OptimizeParams | None = None,
    ) -> None:
        self._store = store
        self._platform = platform
        self._defaults = defaults
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[float, ResolvedJob]] = {}
        self._lock = Lock()

    def get(self, job_id: str) -> ResolvedJob:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(job_id)
            if hit is not None and now - hit[0] < self._ttl_s:
                return hit[1]
        row = self._store.get_job(job_id)
        if row is None:
            raise JobNotFoundError(f"job {job_id} not found")
        resolved = resolve(row, self._platform, self._defaults)
        with self._lock:
            self._cache[job_id] = (now, resolved)
        return resolved
