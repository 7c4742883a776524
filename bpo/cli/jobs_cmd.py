"""``bpo submit`` and ``bpo jobs ...``: talk to the Jobs service over gRPC."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import json_format
from tqdm import tqdm

from bpo.corpus.export import ExportFormat, export_lines, export_sink
from bpo.corpus.formats import CorpusError, builtin_dataset_path
from bpo.errors import InvalidConfigurationError
from bpo.messages import STAGE_NAMES, STAGE_VALUES
from bpo.pipeline.client import JobsClient, corpus_entries, open_channel, rpc_error, submit_requests
from bpo.pipeline.outcome import JobOutcome
from bpo.settings import BpoSettings
from bpo.stack.supervisor import StackState
from bpo.v1 import bpo_pb2 as pb
from bpo.v1 import bpo_pb2_grpc as pb_grpc

app = typer.Typer(help="Watch, cancel, report on and export jobs.", no_args_is_help=True)

MaxFailureRate = Annotated[
    float,
    typer.Option(
        min=0.0,
        max=1.0,
        help="Share of a job's items allowed to fail before the command exits non-zero (0: any failure does).",
    ),
]


def require_success(outcomes: list[JobOutcome], max_failure_rate: float, more_problems: Sequence[str] = ()) -> None:
    """Exit non-zero, saying why, when any job did not do its work (beyond the failures allowed)."""
    problems = [problem for outcome in outcomes if (problem := outcome.problem(max_failure_rate)) is not None]
    problems += more_problems
    if problems:
        for problem in problems:
            typer.secho(problem, fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def jobs_address(settings: BpoSettings) -> str:
    state = StackState.load(settings)
    if state is not None and "jobs" in state.addresses:
        return state.addresses["jobs"]
    return f"{settings.platform.host}:{settings.platform.jobs_port}"


def jobs_stub(settings: BpoSettings) -> pb_grpc.JobsServiceStub:
    return pb_grpc.JobsServiceStub(open_channel(jobs_address(settings), settings))


def endpoint(name: str | None, tokens: int) -> pb.ModelEndpoint:
    """A declared endpoint by name (empty: the platform's default for the role)."""
    return pb.ModelEndpoint(model=name or "", max_new_tokens=tokens)


def submit(
    path: Annotated[
        Path | None, typer.Argument(help="Corpus: JSONL (OpenAI Batch, chat), JSON, CSV, Parquet; or .gz.")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="A shipped test set instead of a file.")] = None,
    field: Annotated[str | None, typer.Option(help="The prompt field.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N records.")] = None,
    name: Annotated[str, typer.Option(help="A name for the job.")] = "",
    optimizer_model: Annotated[
        str | None,
        typer.Option("--optimizer-model", "--optimizer", help="Optimizer endpoint (default: the platform's)."),
    ] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Iterative rewriting rounds.")] = 1,
    seed: Annotated[int | None, typer.Option(help="Makes the optimizer's sampling reproducible.")] = None,
    target: Annotated[
        str | None, typer.Option(help="Target: a declared endpoint's name (default: the platform's).")
    ] = None,
    target_max_tokens: Annotated[int, typer.Option(help="Max new tokens of each answer.")] = 0,
    judge: Annotated[
        str | None, typer.Option(help="Judge: a declared endpoint's name (default: the platform's).")
    ] = None,
    judge_max_tokens: Annotated[int, typer.Option(help="Max new tokens of each judgement.")] = 0,
    stages: Annotated[str, typer.Option(help="Comma-separated: rewrite,generate,judge (a prefix of them).")] = (
        "rewrite,generate,judge"
    ),
    wait: Annotated[bool, typer.Option("--wait", help="Show progress per stage until the job is done.")] = False,
    max_failure_rate: MaxFailureRate = 0.0,
) -> None:
    """Submit a corpus as a job; prints the job id. With --wait, exits non-zero unless the job did its work."""
    settings = BpoSettings()
    if (path is None) == (dataset is None):
        raise InvalidConfigurationError("give a FILE or --dataset NAME")
    corpus = path if path is not None else builtin_dataset_path(dataset or "")
    wanted = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STAGE_VALUES]
    if unknown:
        raise InvalidConfigurationError(f"unknown stages {unknown}; choose from rewrite, generate, judge")
    params = pb.OptimizeParams(rounds=rounds)
    if seed is not None:
        params.seed = seed
    spec = pb.JobSpec(
        name=name or corpus.name,
        optimizer_model=optimizer_model or "",
        params=params,
        target=endpoint(target, target_max_tokens),
        judge=endpoint(judge, judge_max_tokens),
        stages=[STAGE_VALUES[s] for s in wanted],
    )

    def report_bad_line(entry: CorpusError) -> None:
        typer.secho(f"line {entry.line}: {entry.reason}", fg=typer.colors.YELLOW, err=True)

    stub = jobs_stub(settings)
    try:
        reply = stub.SubmitJob(submit_requests(spec, corpus_entries(corpus, field, limit), report_bad_line))
    except grpc.RpcError as exc:
        raise rpc_error(exc) from None
    typer.echo(reply.job_id)
    typer.secho(f"accepted {reply.accepted}, rejected {reply.rejected}, duplicates {reply.duplicates}", err=True)
    if wait:
        _watch(stub, reply.job_id)
        report = _print_report(stub, reply.job_id, as_json=False)
        require_success([JobOutcome.of(report)], max_failure_rate)


def _watch(stub: pb_grpc.JobsServiceStub, job_id: str) -> pb.JobProgress:
    bars: dict[int, tqdm[Any]] = {}
    last = pb.JobProgress()
    try:
        for update in stub.WatchJob(pb.WatchJobRequest(job_id=job_id)):
            last = update.progress
            for position, stage in enumerate(last.stages):
                if stage.stage not in bars:
                    bars[stage.stage] = tqdm(total=stage.total, desc=f"{STAGE_NAMES[stage.stage]:>8}", unit="item",
                               position=position, file=sys.stderr, leave=True)  # fmt: skip
                bar = bars[stage.stage]
                bar.total = stage.total
                bar.n = stage.done + stage.failed
                bar.set_postfix(failed=stage.failed)
                bar.refresh()
    except grpc.RpcError as exc:
        raise rpc_error(exc) from None
    finally:
        for bar in bars.values():
            bar.close()
    typer.secho(f"job {job_id}: {pb.JobState.Name(last.state)}", err=True)
    return last


@app.command("watch")
def watch(job_id: str, max_failure_rate: MaxFailureRate = 0.0) -> None:
    """Progress bars per stage until the job finishes; exits non-zero unless it did its work."""
    stub = jobs_stub(BpoSettings())
    _watch(stub, job_id)
    require_success([JobOutcome.of(_report(stub, job_id))], max_failure_rate)


@app.command("get")
def get(job_id: str) -> None:
    """The job's spec, state and progress as JSON."""
    try:
        job = jobs_stub(BpoSettings()).GetJob(pb.GetJobRequest(job_id=job_id)).job
    except grpc.RpcError as exc:
        raise rpc_error(exc) from None
    typer.echo(json_format.MessageToJson(job, preserving_proto_field_name=True))


@app.command("cancel")
def cancel(job_id: str) -> None:
    """Cancel a running job: unfinished items are skipped; finished results stay."""
    try:
        job = jobs_stub(BpoSettings()).CancelJob(pb.CancelJobRequest(job_id=job_id)).job
    except grpc.RpcError as exc:
        raise rpc_error(exc) from None
    typer.echo(f"job {job_id}: {pb.JobState.Name(job.state)}")


def _report(stub: pb_grpc.JobsServiceStub, job_id: str) -> pb.JobReport:
    try:
        report: pb.JobReport = stub.GetJobReport(pb.GetJobReportRequest(job_id=job_id)).report
    except grpc.RpcError as exc:
        raise rpc_error(exc) from None
    return report


def _print_report(stub: pb_grpc.JobsServiceStub, job_id: str, *, as_json: bool) -> pb.JobReport:
    report = _report(stub, job_id)
    if as_json:
        typer.echo(
            json_format.MessageToJson(
                report, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
        )
    else:
        typer.echo(render_report(report))
    return report


def render_report(report: pb.JobReport) -> str:
    job = report.job
    lines = [
        f"job {job.job_id} ({job.spec.name}): {pb.JobState.Name(job.state).removeprefix('JOB_STATE_').lower()}",
        f"items {report.items}: rewritten {report.rewritten} (kept original {report.kept_original}, "
        f"cache hits {report.cache_hits}), judged {report.judged}, failed {report.failed}",
    ]
    if report.judged:
        lines.append(
            f"optimized vs original: win {report.win_rate:.1%}  tie {report.tie_rate:.1%}  "
            f"lose {report.lose_rate:.1%}  ΔWR {report.delta_wr:+.1%}  "
            f"(judge position consistency {report.position_consistency:.0%})"
        )
        lines.append(f"{'category':<20} {'judged':>6} {'win':>4} {'tie':>4} {'lose':>4} {'ΔWR':>7}")
        for cat in report.categories:
            lines.append(
                f"{cat.category or '-':<20} {cat.judged:>6} {cat.wins:>4} {cat.ties:>4} {cat.losses:>4} "
                f"{cat.delta_wr:>+7.1%}"
            )
    lines.append("tokens: " + ", ".join(f"{t.role} {t.tokens_in} in / {t.tokens_out} out" for t in report.tokens))
    if report.failed:
        lines.append(f"failed: {report.failed} ({report.rejected} corpus lines rejected at submission), by reason:")
    for reason in report.failure_reasons[:20]:
        sample = ", ".join(str(line) for line in reason.sample_lines)
        more = ", ..." if reason.count > len(reason.sample_lines) else ""
        stage = STAGE_NAMES.get(reason.stage, "submit")
        lines.append(f"  {reason.count}x [{stage}] {reason.reason} (lines {sample}{more})")
    if len(report.failure_reasons) > 20:
        lines.append(f"  ... {len(report.failure_reasons) - 20} more distinct reasons (--json lists them)")
    return "\n".join(lines)


@app.command("report")
def report(job_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Counts, win / tie / lose, ΔWR per category, tokens, failures with reasons."""
    _print_report(jobs_stub(BpoSettings()), job_id, as_json=as_json)


@app.command("export")
def export(
    job_id: str,
    out: Annotated[
        Path | None,
        typer.Option(help="Write here instead of standard output (gzip-compressed when the name ends in .gz)."),
    ] = None,
    export_format: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="jsonl: each item with every stage's output; openai-batch: the OpenAI Batch output format.",
        ),
    ] = ExportFormat.JSONL,
) -> None:
    """Every item of the job, in corpus order, one JSON object a line, streamed."""
    settings = BpoSettings()
    written = 0
    with JobsClient(jobs_address(settings), settings) as client, export_sink(out) as sink:
        for line in export_lines(client.export(job_id), export_format):
            sink.write(line)
            written += 1
    if out is not None:
        typer.echo(json.dumps({"output": str(out), "items": written}))
