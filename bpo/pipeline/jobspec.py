"""A job's specification with the platform's defaults filled in: what every stage reads before it acts."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from threading import Lock

from bpo.errors import BpoError, InvalidConfigurationError, JobNotFoundError
from bpo.judging.pairwise import JUDGE_TEMPLATES, JudgeTemplate
from bpo.messages import ALL_STAGES, STAGE_NAMES, from_json, params_from_proto
from bpo.optimizer.optimizer import OptimizeParams
from bpo.settings import PlatformSettings
from bpo.store.repository import JobRow, PipelineStore
from bpo.v1 import bpo_pb2 as pb

DEFAULT_ANSWER_TOKENS = 256
# Bounds the lookup's memory on a platform with very many jobs: expired entries are dropped beyond this.
_MAX_CACHED_JOBS = 10_000
DEFAULT_JUDGE_TOKENS = 384


@dataclass(frozen=True, slots=True)
class ResolvedJob:
    job_id: str
    state: str
    stages: tuple[str, ...]
    optimizer_model: str
    params: OptimizeParams
    # Declared endpoint names (bpo.endpoints): what the stages build engines from.
    target: str
    target_max_new_tokens: int
    judge: str
    judge_max_new_tokens: int
    judge_template: JudgeTemplate = "pair-v2"
    team: str = ""
    team_id: str | None = None

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


def endpoint_name(endpoint: pb.ModelEndpoint, default: str) -> str:
    """The declared endpoint a job's target or judge names (the deployment's default when it names none)."""
    return endpoint.model or default


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
        target=endpoint_name(spec.target, platform.target_model),
        target_max_new_tokens=spec.target.max_new_tokens or DEFAULT_ANSWER_TOKENS,
        judge=endpoint_name(spec.judge, platform.judge_model),
        judge_max_new_tokens=spec.judge.max_new_tokens or DEFAULT_JUDGE_TOKENS,
        judge_template=judge_template_of(spec.judge_template),
        team=job.team,
        team_id=job.team_id,
    )


class JobLookup:
    """Stages look jobs up for every batch; specs never change and states change rarely, so cache briefly.

    A job whose stored spec cannot be resolved any more (say, a model name this deployment no longer knows)
    is returned as the error, so that its items fail with the reason instead of stalling the stage."""

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
        self._cache: dict[str, tuple[float, ResolvedJob | BpoError]] = {}
        self._lock = Lock()

    def get(self, job_id: str) -> ResolvedJob:
        found = self.get_many([job_id]).get(job_id)
        if found is None:
            raise JobNotFoundError(f"job {job_id} not found")
        if isinstance(found, BpoError):
            raise found
        return found

    def get_many(self, job_ids: Sequence[str]) -> dict[str, ResolvedJob | BpoError]:
        """The jobs that exist among ``job_ids``, one query for those not cached."""
        now = time.monotonic()
        found: dict[str, ResolvedJob | BpoError] = {}
        with self._lock:
            for job_id in set(job_ids):
                hit = self._cache.get(job_id)
                if hit is not None and now - hit[0] < self._ttl_s:
                    found[job_id] = hit[1]
        missing = [job_id for job_id in set(job_ids) if job_id not in found]
        rows = self._store.jobs_by_ids(missing) if missing else {}
        fresh: dict[str, ResolvedJob | BpoError] = {}
        for job_id, row in rows.items():
            try:
                fresh[job_id] = resolve(row, self._platform, self._defaults)
            except BpoError as exc:
                fresh[job_id] = exc
        with self._lock:
            if len(self._cache) > _MAX_CACHED_JOBS:
                self._cache = {k: v for k, v in self._cache.items() if now - v[0] < self._ttl_s}
            for job_id, job in fresh.items():
                self._cache[job_id] = (now, job)
        return found | fresh
