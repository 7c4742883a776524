"""The platform as an untrusted caller sees it: every attack of issue 11 against a running platform.

One platform for the module (``bpo up``, everything embedded) serving gRPC over TLS that requires client
certificates, with its optimizer, targets and judges on a real OpenAI-compatible HTTP endpoint (the stub in
``bpo.testing``). The operator declares the endpoints and creates the teams and tokens with the ``bpo``
command; the callers use nothing but gRPC. Each attack records the status it got; the table is printed at the
end and written to ``$BPO_SECURITY_TALLY`` when set.
"""

from __future__ import annotations

import json
import os
import stat
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bpo.pipeline.client import with_bearer_token
from bpo.stack.isolated import isolated_platform_env
from bpo.testing.openai_stub import OpenAIStub
from bpo.v1 import bpo_pb2 as pb
from bpo.v1 import bpo_pb2_grpc as pb_grpc
from tests.integration.pki import Pair, Pki, make_pki
from tests.integration.platform import admin_token, bpo, platform_logs, running_platform, shared_models_dir, state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

OPTIMIZER = "stub-optimizer"
# The target and judge endpoints' key: a secret the operator names; only those endpoints may ever see it.
ENDPOINT_KEY = "sk-endpoint-" + uuid.uuid4().hex
# Every prompt a caller sends here carries this, so that the log scan can find any that leaked.
PROMPT_MARK = "zebra-octagon"
FINISHED = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_PARTIALLY_FAILED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


@dataclass
class Attacks:
    """Each attack tried and the status it got, for the closing table."""

    rows: list[tuple[str, str]] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)

    def record(self, attack: str, code: grpc.StatusCode | str) -> None:
        self.rows.append((attack, code.name if isinstance(code, grpc.StatusCode) else code))


@pytest.fixture(scope="module")
def attacks() -> Iterator[Attacks]:
    tally = Attacks()
    yield tally
    table = "\n".join(f"| {attack} | {code} |" for attack, code in tally.rows)
    print(f"\nattacks tried:\n| attack | status |\n|---|---|\n{table}")
    if target := os.environ.get("BPO_SECURITY_TALLY"):
        Path(target).write_text(json.dumps([{"attack": a, "status": c} for a, c in tally.rows], indent=2))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub() as server:
        yield server


@pytest.fixture(scope="module")
def platform(stub: OpenAIStub, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    declared = {
        "target": {"engine": "openai", "url": stub.url("target"), "model": "stub-target", "roles": ["target"],
                   "api_key_secret": "endpoint-key", "usd_per_million_input_tokens": 1.0,
                   "usd_per_million_output_tokens": 2.0},
        "judge": {"engine": "openai", "url": stub.url("judge"), "model": "stub-judge", "roles": ["judge"],
                  "api_key_secret": "endpoint-key"},
        # Only the research team may use this one.
        "restricted": {"engine": "openai", "url": stub.url("restricted"), "model": "stub-target",
                       "roles": ["target"], "teams": ["research"]},
    }  # fmt: skip
    env = isolated_platform_env(
        tmp_path_factory.mktemp("security"),
        shared_models_dir(),
        model=OPTIMIZER,
        extra={
            "BPO_ENGINE__NAME": "openai",
            "BPO_ENGINE__OPENAI_BASE_URL": stub.url("optimizer"),
            "BPO_ENDPOINTS": json.dumps(declared),
            "BPO_SECRET_ENDPOINT_KEY": ENDPOINT_KEY,
            "BPO_PLATFORM__TARGET_MODEL": "target",
            "BPO_PLATFORM__JUDGE_MODEL": "judge",
            "BPO_PLATFORM__AUTH_CACHE_S": "0.5",
            # TLS on every server, client certificates required (mTLS); the bpo command holds a client certificate.
            "BPO_PLATFORM__TLS_CERT_FILE": str(pki.server.cert),
            "BPO_PLATFORM__TLS_KEY_FILE": str(pki.server.key),
            "BPO_PLATFORM__TLS_CLIENT_CA_FILE": str(pki.ca),
            "BPO_PLATFORM__TLS_REQUIRE_CLIENT_CERT": "true",
            "BPO_CLIENT__CA_FILE": str(pki.ca),
            "BPO_CLIENT__CERT_FILE": str(pki.client.cert),
            "BPO_CLIENT__KEY_FILE": str(pki.client.key),
        },
    )
    with running_platform(env) as running:
        yield running


@dataclass(frozen=True)
class Teams:
    alpha: str
    beta: str
    research: str
    metered: str
    revoked: str
    disabled: str


def operator(env: dict[str, str], *args: str) -> str:
    result = bpo(env, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def teams(platform: dict[str, str], attacks: Attacks) -> Teams:
    """The operator's commands: teams, tokens (each printed once), a revoked token, a disabled team."""
    tokens: dict[str, str] = {}
    for team in ("alpha", "beta", "research", "metered", "gone", "off"):
        assert operator(platform, "teams", "create", team) == f"team {team} created"
        tokens[team] = operator(platform, "tokens", "create", "--team", team, "--description", "security suite")
    listed = json.loads(operator(platform, "tokens", "list", "--json"))
    assert {row["team"] for row in listed} >= set(tokens)
    listing = json.dumps(listed)
    assert not any(token in listing for token in tokens.values())  # never shown again, only a prefix
    gone = next(row["token_id"] for row in listed if row["team"] == "gone")
    operator(platform, "tokens", "revoke", gone)
    operator(platform, "teams", "disable", "off")
    attacks.tokens.extend(tokens.values())
    attacks.tokens.append(admin_token(platform))
    return Teams(tokens["alpha"], tokens["beta"], tokens["research"], tokens["metered"], tokens["gone"], tokens["off"])


# -- calling the platform -----------------------------------------------------------------------------------


def secure_channel(
    env: dict[str, str], service: str, *, ca: Path | None, client: Pair | None, token: str | None
) -> grpc.Channel:
    root = ca.read_bytes() if ca else None
    key = client.key.read_bytes() if client else None
    chain = client.cert.read_bytes() if client else None
    credentials = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)
    channel = grpc.secure_channel(state(env)["addresses"][service], credentials)
    return with_bearer_token(channel, token) if token is not None else channel


@pytest.fixture(scope="module")
def connect(platform: dict[str, str], pki: Pki) -> Callable[[str, str | None], grpc.Channel]:
    """A trusted TLS channel with a valid client certificate, as the caller holding ``token``."""
    return lambda service, token: secure_channel(platform, service, ca=pki.ca, client=pki.client, token=token)


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__next__"):
            for _ in result:
                break
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def item(prompt: str, source_id: str = "") -> pb.PromptItem:
    return pb.PromptItem(source_id=source_id, prompt=f"{prompt} ({PROMPT_MARK})")


def submission(spec: pb.JobSpec, count: int) -> Iterator[pb.SubmitJobRequest]:
    yield pb.SubmitJobRequest(spec=spec)
    for n in range(count):
        yield pb.SubmitJobRequest(item=item(f"Explain idea number {n} simply", f"s{n}"))


def a_rewrite() -> pb.Rewrite:
    prompt = item("How do tides work?")
    return pb.Rewrite(item=prompt, optimized=f"Explain how tides work, step by step ({PROMPT_MARK}).")


def every_rpc(connect: Callable[[str, str | None], grpc.Channel], token: str | None, job_id: str) -> dict[str, Any]:
    """One call of every RPC of every service as ``token``'s holder; the status each answered."""
    optimizer = pb_grpc.OptimizerServiceStub(connect("rewriter", token))
    generator = pb_grpc.GeneratorServiceStub(connect("generator", token))
    judge = pb_grpc.JudgeServiceStub(connect("judge", token))
    jobs = pb_grpc.JobsServiceStub(connect("jobs", token))
    answers = pb.AnswerPair(rewrite=a_rewrite(), original_answer="A.", optimized_answer="B.")
    calls: dict[str, Callable[[], Any]] = {
        "Optimize": lambda: optimizer.Optimize(pb.OptimizeRequest(prompt=f"Hi ({PROMPT_MARK})"), timeout=30),
        "OptimizeBatch": lambda: optimizer.OptimizeBatch(
            iter([pb.OptimizeBatchRequest(request_id="1", prompt=f"Hi ({PROMPT_MARK})")]), timeout=30
        ),
        "Generate": lambda: generator.Generate(pb.GenerateRequest(rewrite=a_rewrite()), timeout=30),
        "Judge": lambda: judge.Judge(pb.JudgeRequest(answers=answers), timeout=30),
        "SubmitJob": lambda: jobs.SubmitJob(submission(pb.JobSpec(name="probe", stages=[pb.STAGE_REWRITE]), 1)),
        "GetJob": lambda: jobs.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10),
        "WatchJob": lambda: jobs.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=10),
        "GetJobReport": lambda: jobs.GetJobReport(pb.GetJobReportRequest(job_id=job_id), timeout=10),
        "ExportJob": lambda: jobs.ExportJob(pb.ExportJobRequest(job_id=job_id), timeout=10),
        "CancelJob": lambda: jobs.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=10),
    }
    return {name: code_of(call) for name, call in calls.items()}


def wait_finished(stub: pb_grpc.JobsServiceStub, job_id: str, timeout_s: float = 180) -> pb.Job:
    deadline = time.monotonic() + timeout_s
    while True:
        job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10).job
        if job.state in FINISHED:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {pb.JobState.Name(job.state)}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def alphas_job(connect: Callable[[str, str | None], grpc.Channel], teams: Teams) -> str:
    """A finished job of team alpha, through every stage."""
    jobs = pb_grpc.JobsServiceStub(connect("jobs", teams.alpha))
    reply = jobs.SubmitJob(submission(pb.JobSpec(name="alpha's corpus", params=pb.OptimizeParams(seed=1)), 3))
    job = wait_finished(jobs, reply.job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.team == "alpha"
    return reply.job_id


# -- authentication -----------------------------------------------------------------------------------------


def test_every_rpc_refuses_a_caller_without_a_valid_token(
    connect: Callable[[str, str | None], grpc.Channel], teams: Teams, alphas_job: str, attacks: Attacks
) -> None:
    cases = {
        "no token": (None, grpc.StatusCode.UNAUTHENTICATED),
        "malformed token": ("not-a-token", grpc.StatusCode.UNAUTHENTICATED),
        "unknown token": ("bpo_" + "A" * 43, grpc.StatusCode.UNAUTHENTICATED),
        "revoked token": (teams.revoked, grpc.StatusCode.UNAUTHENTICATED),
        "disabled team": (teams.disabled, grpc.StatusCode.PERMISSION_DENIED),
    }
    for attack, (token, expected) in cases.items():
        codes = every_rpc(connect, token, alphas_job)
        assert set(codes.values()) == {expected}, (attack, codes)
        attacks.record(f"{attack}, on each of the 10 RPCs", expected)
    # Malformed metadata of another kind: a non-Bearer scheme.
    channel = connect("jobs", None)
    stub = pb_grpc.JobsServiceStub(channel)
    basic = code_of(lambda: stub.GetJob(pb.GetJobRequest(job_id=alphas_job), metadata=(("authorization", "Basic a"),)))
    assert basic == grpc.StatusCode.UNAUTHENTICATED
    attacks.record("'authorization: Basic ...' instead of a bearer token", basic)
    # Health checking and reflection stay open (probes carry no token), over TLS like everything else.
    health: Any = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    # The job is untouched by all of the above.
    jobs = pb_grpc.JobsServiceStub(connect("jobs", teams.alpha))
    assert jobs.GetJob(pb.GetJobRequest(job_id=alphas_job), timeout=10).job.state == pb.JOB_STATE_SUCCEEDED


def test_another_teams_job_does_not_exist_for_a_caller(
    platform: dict[str, str],
    connect: Callable[[str, str | None], grpc.Channel],
    teams: Teams,
    alphas_job: str,
    attacks: Attacks,
) -> None:
    codes = every_rpc(connect, teams.beta, alphas_job)
    job_rpcs = ("GetJob", "WatchJob", "GetJobReport", "ExportJob", "CancelJob")
    for rpc in job_rpcs:
        assert codes[rpc] == grpc.StatusCode.NOT_FOUND, codes
        attacks.record(f"another team's job id on {rpc}", codes[rpc])
    # Beta's own calls work: it is the job, not the caller, that is refused.
    assert {codes[rpc] for rpc in ("Optimize", "Generate", "Judge", "SubmitJob")} == {grpc.StatusCode.OK}, codes
    # The admin team sees every job; alpha's job is as it was (beta's CancelJob did nothing).
    admin = pb_grpc.JobsServiceStub(connect("jobs", admin_token(platform)))
    job = admin.GetJob(pb.GetJobRequest(job_id=alphas_job), timeout=10).job
    assert (job.team, job.state) == ("alpha", pb.JOB_STATE_SUCCEEDED)
    report = pb_grpc.JobsServiceStub(connect("jobs", teams.alpha)).GetJobReport(
        pb.GetJobReportRequest(job_id=alphas_job), timeout=10
    )
    assert report.report.judged == 3


# -- endpoints: names the operator declared, nothing else ---------------------------------------------------


def raw_field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field, as a client built from an older ``bpo.v1`` would send it."""

    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            byte, value = value & 0x7F, value >> 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                return bytes(out)

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_the_old_url_and_key_env_fields_reach_nothing(
    platform: dict[str, str],
    stub: OpenAIStub,
    connect: Callable[[str, str | None], grpc.Channel],
    teams: Teams,
    attacks: Attacks,
) -> None:
    """The issue's exploit, sent byte for byte as the old API had it: engine "openai", base_url the caller's
    server, api_key_env PATH. The fields no longer exist (reserved), so the server parses them as unknown and
    the request goes to the declared default endpoint with the declared key."""
    names = {f.name for message in pb.DESCRIPTOR.message_types_by_name.values() for f in message.fields}
    assert not {n for n in names if any(part in n for part in ("url", "env", "key", "path", "secret", "hub"))}
    attacker = stub.url("attacker")
    endpoint = raw_field(1, b"openai") + raw_field(3, attacker.encode()) + raw_field(4, b"PATH")
    request = raw_field(1, a_rewrite().SerializeToString()) + raw_field(2, endpoint)
    channel = connect("generator", teams.alpha)
    generate = channel.unary_unary(
        "/bpo.v1.GeneratorService/Generate",
        request_serializer=lambda raw: raw,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    reply = generate(request, timeout=30)
    assert reply.answers.target_model == "stub-target"
    spec = pb.JobSpec(name="exploit", stages=[pb.STAGE_REWRITE, pb.STAGE_GENERATE]).SerializeToString()
    jobs = pb_grpc.JobsServiceStub(connect("jobs", teams.alpha))
    submit = channel_submit(connect("jobs", teams.alpha))
    job_id = submit(iter([raw_field(1, spec + raw_field(4, endpoint)), *item_messages(2)]), timeout=30).job_id
    assert wait_finished(jobs, job_id).state == pb.JOB_STATE_SUCCEEDED
    path_value = os.environ.get("PATH", "")
    assert stub.calls("attacker").requests == 0
    everywhere = {auth for route in ("optimizer", "target", "judge") for auth in stub.calls(route).authorizations}
    assert not any(path_value and path_value in auth for auth in everywhere)
    assert set(stub.calls("target").authorizations) == {f"Bearer {ENDPOINT_KEY}"}
    attacks.record("old api_key_env=PATH + base_url=attacker on Generate (unknown fields, ignored)", "OK, no request")
    attacks.record("the same inside a SubmitJob spec", "OK, no request")
    # The command line has no such options any more.
    result = bpo(platform, "submit", "--dataset", "vicuna_eval", "--target-url", attacker, "--target-key-env", "PATH")
    assert result.returncode == 2 and "No such option" in result.stderr


def channel_submit(channel: grpc.Channel) -> Any:
    return channel.stream_unary(
        "/bpo.v1.JobsService/SubmitJob",
        request_serializer=lambda raw: raw,
        response_deserializer=pb.SubmitJobResponse.FromString,
    )


def item_messages(count: int) -> list[bytes]:
    return [pb.SubmitJobRequest(item=item(f"Name a colour {n}", f"c{n}")).SerializeToString() for n in range(count)]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("http://127.0.0.1:9/attacker/v1", grpc.StatusCode.NOT_FOUND),
        ("file:///etc/passwd", grpc.StatusCode.NOT_FOUND),
        ("/etc/passwd", grpc.StatusCode.NOT_FOUND),
        ("../../models/qwen.gguf", grpc.StatusCode.NOT_FOUND),
        ("Qwen/Qwen2.5-0.5B-Instruct", grpc.StatusCode.NOT_FOUND),
        ("smollm2-135m-instruct", grpc.StatusCode.NOT_FOUND),  # a catalogue model the operator did not declare
        ("no-such-endpoint", grpc.StatusCode.NOT_FOUND),
        ("judge", grpc.StatusCode.INVALID_ARGUMENT),  # declared, but not as a target
        ("restricted", grpc.StatusCode.PERMISSION_DENIED),  # declared for another team
    ],
)
def test_only_declared_endpoints_the_team_may_use_are_reachable(
    stub: OpenAIStub,
    connect: Callable[[str, str | None], grpc.Channel],
    teams: Teams,
    attacks: Attacks,
    name: str,
    expected: grpc.StatusCode,
) -> None:
    generator = pb_grpc.GeneratorServiceStub(connect("generator", teams.alpha))
    target = pb.ModelEndpoint(model=name)
    code = code_of(lambda: generator.Generate(pb.GenerateRequest(rewrite=a_rewrite(), target=target), timeout=30))
    assert code == expected
    jobs = pb_grpc.JobsServiceStub(connect("jobs", teams.alpha))
    spec = pb.JobSpec(name="named", target=target)
    assert code_of(lambda: jobs.SubmitJob(submission(spec, 1), timeout=30)) == expected
    attacks.record(f"target endpoint {name!r} on Generate and SubmitJob", expected)
    if name.startswith(("/", "file:", "..", "Qwen/", "smollm2")):
        optimizer = pb_grpc.OptimizerServiceStub(connect("rewriter", teams.alpha))
        refused = code_of(lambda: optimizer.Optimize(pb.OptimizeRequest(prompt="Hi", model=name), timeout=30))
        assert refused == grpc.StatusCode.INVALID_ARGUMENT
        attacks.record(f"optimizer model {name!r} on Optimize", refused)
    assert stub.calls("attacker").requests == 0
    if expected == grpc.StatusCode.PERMISSION_DENIED:
        # The team it is declared for uses it.
        allowed = pb_grpc.GeneratorServiceStub(connect("generator", teams.research))
        assert allowed.Generate(pb.GenerateRequest(rewrite=a_rewrite(), target=target), timeout=30).answers


# -- quotas -------------------------------------------------------------------------------------------------


def test_quotas_refuse_with_the_quota_and_when_it_resets(
    platform: dict[str, str], connect: Callable[[str, str | None], grpc.Channel], teams: Teams, attacks: Attacks
) -> None:
    operator(platform, "teams", "quota", "metered", "--items-per-day", "4", "--tokens-per-day", "target=1")
    time.sleep(1.0)  # the services' authentication cache (0.5 s here) holds the quotas as they were
    jobs = pb_grpc.JobsServiceStub(connect("jobs", teams.metered))
    with pytest.raises(grpc.RpcError) as caught:
        jobs.SubmitJob(submission(pb.JobSpec(name="too big", stages=[pb.STAGE_REWRITE]), 5), timeout=30)
    details = caught.value.details() or ""
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "quota items_per_day of team 'metered'" in details and "resets at" in details
    attacks.record("5 items against items_per_day=4", caught.value.code())
    generator = pb_grpc.GeneratorServiceStub(connect("generator", teams.metered))
    # A prompt nobody asked before (a cached answer costs no tokens, so charges none): it spends the quota.
    fresh = pb.Rewrite(item=item(f"What is {uuid.uuid4().hex}?"), optimized="What is it, exactly?")
    assert generator.Generate(pb.GenerateRequest(rewrite=fresh), timeout=30).answers
    with pytest.raises(grpc.RpcError) as spent:
        generator.Generate(pb.GenerateRequest(rewrite=a_rewrite()), timeout=30)
    assert spent.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "quota tokens_per_day.target of team 'metered' is used up" in (spent.value.details() or "")
    attacks.record("Generate after tokens_per_day.target is spent", spent.value.code())
    operator(platform, "teams", "quota", "metered", "--clear", "--running-jobs", "0")
    time.sleep(1.0)
    with pytest.raises(grpc.RpcError) as running:
        jobs.SubmitJob(submission(pb.JobSpec(name="one more", stages=[pb.STAGE_REWRITE]), 1), timeout=30)
    assert running.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "quota running_jobs" in (running.value.details() or "")
    attacks.record("a job beyond running_jobs=0", running.value.code())
    # Another team is not affected.
    other = pb_grpc.GeneratorServiceStub(connect("generator", teams.beta))
    assert other.Generate(pb.GenerateRequest(rewrite=a_rewrite()), timeout=30).answers


def test_usage_per_team_in_reports_and_metrics(
    platform: dict[str, str], connect: Callable[[str, str | None], grpc.Channel], teams: Teams, alphas_job: str
) -> None:
    jobs = pb_grpc.JobsServiceStub(connect("jobs", teams.alpha))
    report = jobs.GetJobReport(pb.GetJobReportRequest(job_id=alphas_job), timeout=10).report
    usage = {t.role: t for t in report.tokens}
    assert set(usage) == {"rewrite", "target", "judge"}, usage
    target = usage["target"]
    assert target.tokens_in > 0 and target.cost_usd == pytest.approx(
        (target.tokens_in * 1.0 + target.tokens_out * 2.0) / 1e6
    )
    port = int(platform["BPO_PLATFORM__METRICS_PORT_BASE"]) + 2  # the generator's
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    spent = [line for line in text.splitlines() if line.startswith("bpo_team_tokens_total{") and 'team="alpha"' in line]
    assert spent and any('role="target"' in line for line in spent), text[-2000:]


# -- transport ----------------------------------------------------------------------------------------------


def test_tls_refuses_untrusted_parties(platform: dict[str, str], pki: Pki, teams: Teams, attacks: Attacks) -> None:
    def get_job(channel: grpc.Channel) -> grpc.StatusCode:
        stub = pb_grpc.JobsServiceStub(channel)
        return code_of(lambda: stub.GetJob(pb.GetJobRequest(job_id=str(uuid.uuid4())), timeout=5))

    address = state(platform)["addresses"]["jobs"]
    cases = {
        "plaintext client": with_bearer_token(grpc.insecure_channel(address), teams.alpha),
        "client trusting another CA (the server's certificate is untrusted)": secure_channel(
            platform, "jobs", ca=pki.rogue_ca, client=pki.client, token=teams.alpha
        ),
        "no client certificate (mTLS)": secure_channel(platform, "jobs", ca=pki.ca, client=None, token=teams.alpha),
        "client certificate from an untrusted CA": secure_channel(
            platform, "jobs", ca=pki.ca, client=pki.rogue_client, token=teams.alpha
        ),
    }
    for attack, channel in cases.items():
        code = get_job(channel)
        assert code == grpc.StatusCode.UNAVAILABLE, (attack, code)
        attacks.record(f"TLS: {attack}", code)
    trusted = secure_channel(platform, "jobs", ca=pki.ca, client=pki.client, token=teams.alpha)
    assert get_job(trusted) == grpc.StatusCode.NOT_FOUND  # through: a random job id is simply not there


# -- what stays private -------------------------------------------------------------------------------------


def test_embedded_services_require_their_generated_passwords(platform: dict[str, str], attacks: Attacks) -> None:
    stack = Path(platform["BPO_STATE_DIR"]) / "stack"
    urls = json.loads((stack / "connections.json").read_text())
    secrets = stack / "secrets"
    for name in ("postgres", "redis"):
        path = secrets / f"{name}.password"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text().strip()) >= 24
    postgres_password = (secrets / "postgres.password").read_text().strip()
    assert postgres_password in urls["database_url"]
    without = urls["database_url"].replace(f":{postgres_password}@", "@")
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(without, connect_timeout=5).close()
    attacks.record("embedded Postgres without its password", "refused (password authentication)")
    redis_password = (secrets / "redis.password").read_text().strip()
    bare = redis.Redis.from_url(urls["redis_url"].replace(f":{redis_password}@", ""))
    with pytest.raises(redis.exceptions.AuthenticationError):
        bare.ping()
    attacks.record("embedded Redis without its password", "refused (NOAUTH)")
    # state.json, which clients read, holds no password.
    status = (stack / "state.json").read_text()
    assert postgres_password not in status and redis_password not in status


def test_no_prompt_key_token_or_password_in_the_logs(platform: dict[str, str], attacks: Attacks) -> None:
    """Last: everything the suite sent is in the platform's logs or it is not (it must not be)."""
    stack = Path(platform["BPO_STATE_DIR"]) / "stack"
    text = platform_logs(platform, tail=None)
    assert text.count("== ") >= 5
    secrets = [(stack / "secrets" / f"{n}.password").read_text().strip() for n in ("postgres", "redis")]
    for what, value in [
        ("prompt text", PROMPT_MARK),
        ("the endpoints' API key", ENDPOINT_KEY),
        *[("a bearer token", token) for token in attacks.tokens],
        *[("an embedded service's password", secret) for secret in secrets],
    ]:
        assert value not in text, f"{what} found in the logs"
    for path in (stack, stack / "logs", stack / "secrets", *stack.glob("*.json"), *(stack / "logs").glob("*")):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} is readable by others"
    attacks.record("scan of every log for prompts, keys, tokens and passwords", "none found")
