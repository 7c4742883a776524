"""The pure parts of failure isolation and liveness: admission, served models, restarts with back-off, masked
URLs, redacted task logs, and corpus lines that must fail alone."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bpo.corpus.formats import CorpusError, CorpusRecord, read_corpus
from bpo.endpoints import (
    EndpointConfig,
    EndpointForbiddenError,
    EndpointNotFoundError,
    Endpoints,
    Secrets,
    default_declarations,
)
from bpo.errors import BpoError, EngineUnavailableError, InvalidConfigurationError
from bpo.grpc_server import DependencyHealth
from bpo.infra.process import ServiceStartError
from bpo.infra.urls import mask_url
from bpo.metrics import PlatformMetrics
from bpo.models.catalogue import ModelCatalogue
from bpo.pipeline.admission import Admission, check_params, item_problem
from bpo.pipeline.optimizer_models import OptimizerModels
from bpo.settings import BpoSettings, EngineSettings, PlatformSettings
from bpo.stack.supervisor import Component, Supervisor, restart_delay_s
from bpo.v1 import bpo_pb2 as pb
from services.optimizer_worker.app import RedactTaskPayloads
from services.optimizer_worker.presence import KEY_PREFIX, PresenceBeacon, ServedModels, announced_nodes

pytestmark = pytest.mark.unit


# -- admission ----------------------------------------------------------------------------------------------


class Live:
    def __init__(self, models: dict[str, int] | None = None, *, down: bool = False) -> None:
        self.models = models or {}
        self.down = down

    def live(self, *, fresh: bool = False) -> dict[str, int]:
        if self.down:
            raise ConnectionError("redis unreachable")
        return dict(self.models)


def test_an_item_over_the_size_limit_is_refused_with_its_size() -> None:
    assert item_problem("x" * 10, "y" * 10, 20) is None
    assert item_problem("x" * 10, "y" * 11, 20) == (
        "prompt and context are 21 bytes together; at most 20 are accepted (BPO_PLATFORM__MAX_ITEM_BYTES)"
    )
    assert item_problem("é" * 11, "", 20) is not None  # bytes, not characters
    assert item_problem("  \n", "", 20) == "prompt is empty or only whitespace"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (pb.OptimizeParams(temperature=-0.5), "params.temperature"),
        (pb.OptimizeParams(temperature=float("nan")), "params.temperature"),
        (pb.OptimizeParams(top_p=1.5), "params.top_p"),
        (pb.OptimizeParams(max_new_tokens=100_000), "params.max_new_tokens"),
        (pb.OptimizeParams(rounds=11), "params.rounds"),
    ],
)
def test_parameters_out_of_bounds_are_refused_by_name(params: pb.OptimizeParams, field: str) -> None:
    with pytest.raises(InvalidConfigurationError, match=f"^{field}: "):
        check_params(params)


def test_zero_parameters_mean_the_defaults() -> None:
    check_params(pb.OptimizeParams())


def test_optimizer_names_resolve_to_what_workers_serve() -> None:
    models = OptimizerModels(["qwen2.5-coder-0.5b-instruct"], Live({"latest": 1}), ModelCatalogue())
    assert models.resolve("qwen2.5-coder-0.5b-instruct") == "qwen2.5-coder-0.5b-instruct"
    # A catalogue alias of a served model goes to the served model's queue, not to a queue of its own.
    assert models.resolve("qwen-0.5b") == "qwen2.5-coder-0.5b-instruct"
    assert models.resolve("latest") == "latest"  # announced by a live worker
    with pytest.raises(InvalidConfigurationError, match=r"optimizer_model: 'smollm2' is not served .* served: latest"):
        models.resolve("smollm2")
    # A caller's path or hub id is never looked up: names only.
    with pytest.raises(InvalidConfigurationError):
        models.resolve("/etc/passwd")


def test_a_served_model_without_a_live_worker_is_unavailable() -> None:
    models = OptimizerModels(["opt"], Live({"other": 2}), ModelCatalogue())
    with pytest.raises(EngineUnavailableError, match="no optimizer worker is serving 'opt' right now"):
        models.require_live("opt")
    with pytest.raises(EngineUnavailableError, match="cannot tell which optimizer workers are up"):
        OptimizerModels(["opt"], Live(down=True), ModelCatalogue()).require_live("opt")
    # Redis down says nothing about which names are valid.
    assert OptimizerModels(["opt"], Live(down=True), ModelCatalogue()).resolve("opt") == "opt"


BadInput = InvalidConfigurationError


def declared_endpoints() -> Endpoints:
    """The packaged models, plus one remote endpoint only the research team may use, as a judge only."""
    declared = default_declarations(EngineSettings()) | {
        "gpt-judge": EndpointConfig(
            name="gpt-judge", engine="openai", model="gpt-4o", url="http://127.0.0.1:9/v1", roles=("judge",),
            teams=("research",),
        )
    }  # fmt: skip
    return Endpoints(declared, EngineSettings(), Secrets(None, {}))


@pytest.mark.parametrize(
    ("spec", "field", "error"),
    [
        (pb.JobSpec(optimizer_model="unknown"), "spec.optimizer_model", InvalidConfigurationError),
        (pb.JobSpec(params=pb.OptimizeParams(rounds=50)), "spec.params.rounds", InvalidConfigurationError),
        (pb.JobSpec(target=pb.ModelEndpoint(max_new_tokens=100_000)), "spec.target.max_new_tokens", BadInput),
        (pb.JobSpec(target=pb.ModelEndpoint(model="http://evil/v1")), "spec.target.model", EndpointNotFoundError),
        (pb.JobSpec(judge=pb.ModelEndpoint(model="/etc/passwd")), "spec.judge.model", EndpointNotFoundError),
        (pb.JobSpec(target=pb.ModelEndpoint(model="gpt-judge")), "spec.target.model", InvalidConfigurationError),
        (pb.JobSpec(judge=pb.ModelEndpoint(model="gpt-judge")), "spec.judge.model", EndpointForbiddenError),
        (pb.JobSpec(judge_template="vibes"), "spec.judge_template", InvalidConfigurationError),
    ],
)  # fmt: skip
def test_a_job_spec_is_checked_whole_before_it_exists(spec: pb.JobSpec, field: str, error: type[BpoError]) -> None:
    platform = PlatformSettings(
        optimizer_model="opt", target_model="smollm2-135m-instruct", judge_model="smollm2-135m-instruct"
    )
    admission = Admission(platform, OptimizerModels(["opt"], Live(), ModelCatalogue()), declared_endpoints())
    admission.check_job_spec(pb.JobSpec(), team="ops")  # the platform's defaults are valid
    with pytest.raises(error, match=f"^{field}: "):
        admission.check_job_spec(spec, team="ops")
    admission.check_job_spec(pb.JobSpec(judge=pb.ModelEndpoint(model="gpt-judge")), team="research")


def test_size_limits_are_consistent_across_hops() -> None:
    with pytest.raises(ValueError, match="too large for kafka_max_message_bytes"):
        PlatformSettings(max_item_bytes=600 * 1024)
    with pytest.raises(ValueError, match="grpc_max_message_bytes must exceed max_item_bytes"):
        PlatformSettings(max_item_bytes=200 * 1024, grpc_max_message_bytes=128 * 1024)
    PlatformSettings(max_item_bytes=384 * 1024)


# -- workers' presence --------------------------------------------------------------------------------------


class FakeRedis:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.expiries: dict[str, int] = {}

    def set(self, key: str, value: str, ex: int) -> None:
        self.values[key] = value.encode()
        self.expiries[key] = ex

    def delete(self, key: str) -> None:
        self.values.pop(key, None)

    def scan_iter(self, match: str, count: int) -> Iterator[bytes]:
        prefix = match.rstrip("*")
        return iter([key.encode() for key in self.values if key.startswith(prefix)])

    def mget(self, keys: list[bytes]) -> list[Any]:
        return [self.values.get(key.decode()) for key in keys]


def test_workers_announce_what_they_serve_until_they_stop() -> None:
    redis = FakeRedis()
    first = PresenceBeacon(redis, "w1", ["opt", "latest"], ttl_s=30)  # type: ignore[arg-type]
    second = PresenceBeacon(redis, "w2", ["opt"], ttl_s=30)  # type: ignore[arg-type]
    first.start()
    second.start()
    redis.values[f"{KEY_PREFIX}broken"] = b"not json"
    assert redis.expiries[f"{KEY_PREFIX}w1"] == 30  # a worker that dies drops out when its key expires
    served = ServedModels(redis, cache_s=0)  # type: ignore[arg-type]
    assert served.live() == {"opt": 2, "latest": 1}
    assert announced_nodes(redis) == {"w1", "w2", "broken"}  # type: ignore[arg-type]
    first.stop()
    assert served.live() == {"opt": 1}
    second.stop()
    assert served.live() == {}
    assert announced_nodes(redis) == {"broken"}  # type: ignore[arg-type]


def test_a_refusal_is_never_given_on_a_cached_reading() -> None:
    class Announcing:
        """The cache said nobody; the worker announced itself since."""

        def __init__(self) -> None:
            self.fresh_reads = 0

        def live(self, *, fresh: bool = False) -> dict[str, int]:
            self.fresh_reads += fresh
            return {"opt": 1} if fresh else {}

    live = Announcing()
    OptimizerModels(["opt"], live, ModelCatalogue()).require_live("opt")
    assert live.fresh_reads == 1


def test_served_models_are_cached_briefly() -> None:
    redis = FakeRedis()
    now = [0.0]
    served = ServedModels(redis, cache_s=2.0, clock=lambda: now[0])  # type: ignore[arg-type]
    assert served.live() == {}
    redis.set(f"{KEY_PREFIX}w", json.dumps({"models": ["opt"]}), ex=30)
    assert served.live() == {}
    now[0] = 2.5
    assert served.live() == {"opt": 1}
    redis.delete(f"{KEY_PREFIX}w")
    assert served.live() == {"opt": 1} and served.live(fresh=True) == {}


# -- the supervisor's restarts ------------------------------------------------------------------------------


class Child:
    def __init__(self, *, start_fails: int = 0) -> None:
        self.alive = True
        self.starts = 0
        self.start_fails = start_fails

    def start(self) -> None:
        if self.start_fails:
            self.start_fails -= 1
            raise RuntimeError("port still taken")
        self.starts += 1
        self.alive = True

    def component(self, name: str) -> Component:
        return Component(name, self.start, lambda: self.alive, lambda: None, lambda: 1, lambda: "killed by SIGKILL")


def test_every_death_is_restarted_after_a_growing_back_off(tmp_path: Path) -> None:
    supervisor = Supervisor(BpoSettings(state_dir=tmp_path))
    child = Child()
    component = child.component("generator")
    for death, delay in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        child.alive = False
        now = 100.0 * death
        assert supervisor._watch(component, now)  # noticed: restart scheduled
        assert supervisor._states["generator"].status == f"restarting in {delay:g}s"
        assert not supervisor._watch(component, now + delay - 0.1)  # not yet due
        assert supervisor._watch(component, now + delay)  # due: restarted
        assert child.starts == death and supervisor.state.restarts["generator"] == death
    # Running a minute since its last start makes it healthy again: the next back-off starts over.
    assert not supervisor._watch(component, 400.0 + 8.0 + 61.0)
    child.alive = False
    supervisor._watch(component, 500.0)
    assert supervisor._states["generator"].status == "restarting in 1s"
    assert supervisor._states["generator"].last_exit == "killed by SIGKILL"


def test_a_restart_that_fails_is_tried_again_later(tmp_path: Path) -> None:
    supervisor = Supervisor(BpoSettings(state_dir=tmp_path))
    child = Child(start_fails=1)
    component = child.component("postgres")
    child.alive = False
    supervisor._watch(component, 0.0)
    supervisor._watch(component, 1.0)
    assert "failed to restart: port still taken" in supervisor._states["postgres"].status
    supervisor._watch(component, 1.5)  # noticed again: a longer wait
    assert supervisor._states["postgres"].status == "restarting in 2s"
    supervisor._watch(component, 3.5)
    assert child.starts == 1 and supervisor._states["postgres"].status == "running"


def test_ready_waits_until_every_worker_announced_itself(tmp_path: Path) -> None:
    announced: list[set[str]] = [set(), {"worker-0"}, {"worker-0", "worker-1"}]
    asked: list[str] = []

    def read(redis_url: str) -> set[str]:
        asked.append(redis_url)
        return announced.pop(0)

    settings = BpoSettings.model_validate({"state_dir": tmp_path, "platform": {"workers": 2}})
    supervisor = Supervisor(settings, announced_workers=read)
    supervisor._urls["redis"] = "redis://:pw@127.0.0.1:1/0"
    supervisor._children = [Child().component("worker-0"), Child().component("worker-1")]
    supervisor._wait_workers_announced(deadline=time.monotonic() + 30)
    assert asked == ["redis://:pw@127.0.0.1:1/0"] * 3 and not announced


def test_a_worker_that_dies_or_never_announces_fails_the_start(tmp_path: Path) -> None:
    settings = BpoSettings.model_validate({"state_dir": tmp_path, "platform": {"workers": 1}})
    supervisor = Supervisor(settings, announced_workers=lambda _: set())
    supervisor._urls["redis"] = "redis://127.0.0.1:1/0"
    dead = Child()
    dead.alive = False
    supervisor._children = [dead.component("worker-0")]
    not_ready = r"worker-0 exited before it was ready \(killed by SIGKILL\)"
    with pytest.raises(ServiceStartError, match=not_ready + ": no output"):
        supervisor._wait_workers_announced(deadline=time.monotonic() + 30)
    supervisor.logs.mkdir(parents=True, exist_ok=True)
    crash = "Traceback (most recent call last):\n  ...\nOSError: [Errno 98] Address in use\n\n"
    (supervisor.logs / "worker-0.log").write_text(crash)
    with pytest.raises(ServiceStartError, match=not_ready + r": OSError: \[Errno 98\] Address in use; see "):
        supervisor._wait_workers_announced(deadline=time.monotonic() + 30)
    supervisor._children = [Child().component("worker-0")]
    with pytest.raises(ServiceStartError, match="optimizer workers not serving within the start timeout: worker-0"):
        supervisor._wait_workers_announced(deadline=time.monotonic())


def test_replicas_are_started_with_their_index_and_their_own_ports(tmp_path: Path) -> None:
    settings = BpoSettings.model_validate({"state_dir": tmp_path, "platform": {"replicas": 2, "workers": 1}})
    supervisor = Supervisor(settings)
    supervisor._urls.update(database="postgresql://x", kafka="k:1", redis="redis://r")
    commands = supervisor._commands()
    assert sorted(commands) == sorted(
        ["jobs", "rewriter", "generator", "judge", "rewriter-1", "generator-1", "judge-1", "worker-0"]
    )
    assert commands["judge-1"][-2:] == ["serve", "judge"]
    assert supervisor._child_env("judge-1")["BPO_PLATFORM__REPLICA"] == "1"
    assert supervisor._child_env("judge")["BPO_PLATFORM__REPLICA"] == "0"
    addresses = supervisor._addresses()
    assert len(set(addresses.values())) == len(addresses) == 7
    assert addresses["judge-1"].endswith(f":{settings.platform.judge_port + 100}")


def test_restart_delays_are_capped() -> None:
    assert [restart_delay_s(n) for n in (1, 2, 3, 6, 7, 50)] == [1.0, 2.0, 4.0, 30.0, 30.0, 30.0]


# -- what logs and state files may show ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://bpo:s3cret@db:5432/bpo", "postgresql://bpo:***@db:5432/bpo"),
        ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("postgresql://postgres@127.0.0.1:5432/postgres", "postgresql://postgres@127.0.0.1:5432/postgres"),
        ("127.0.0.1:9092", "127.0.0.1:9092"),
    ],
)
def test_passwords_never_show_in_urls(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_task_payloads_are_redacted_from_celery_success_lines() -> None:
    values = {"name": "bpo.optimize_batch", "id": "t1", "runtime": 0.5, "args": "('my secret prompt',)",
              "kwargs": "{}", "return_value": "[{'optimized': 'my secret prompt'}]"}  # fmt: skip
    fmt = "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s"
    record = logging.LogRecord("celery.app.trace", logging.INFO, __file__, 1, fmt, (values,), None)
    assert RedactTaskPayloads().filter(record)
    message = record.getMessage()
    assert "secret" not in message
    assert message == "Task bpo.optimize_batch[t1] succeeded in 0.5s: <redacted>"


# -- corpus lines that fail alone ---------------------------------------------------------------------------


def test_a_lone_surrogate_fails_its_line_only(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": "broken \\ud800 text"}\n{"prompt": "also fine"}\n'
    )
    entries = list(read_corpus(path))
    assert [type(e) for e in entries] == [CorpusRecord, CorpusError, CorpusRecord]
    assert isinstance(entries[1], CorpusError) and "not valid Unicode" in entries[1].reason


def test_a_csv_field_larger_than_the_csv_default_is_read(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("prompt\n" + "x" * 200_000 + "\nshort one\n")
    entries = list(read_corpus(path))
    assert [type(e) for e in entries] == [CorpusRecord, CorpusRecord]


# -- health that reflects dependencies ----------------------------------------------------------------------


async def test_health_is_down_while_any_dependency_is() -> None:
    state = {"postgres": True, "kafka": True}

    def kafka() -> bool:
        if not state["kafka"]:
            raise ConnectionError("broker unreachable")
        return True

    metrics = PlatformMetrics()
    health = DependencyHealth({"postgres": lambda: state["postgres"], "kafka": kafka}, metrics, interval_s=0.1)
    assert await health.all_up()
    state["kafka"] = False
    assert not await health.all_up()
    assert metrics.registry.get_sample_value("bpo_dependency_up", {"dependency": "kafka"}) == 0
    assert metrics.registry.get_sample_value("bpo_dependency_up", {"dependency": "postgres"}) == 1
    state["kafka"] = True
    assert await health.all_up()
