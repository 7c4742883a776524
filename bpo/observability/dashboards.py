"""The Grafana dashboards, as code: an overview and one dashboard per area, built with Grafana's typed SDK
(``grafana-foundation-sdk``, a ``dev`` dependency: only ``python -m bpo.observability`` and the tests import this
module) and checked in as JSON under ``bpo/resources/grafana/``.

Read top to bottom: the panel vocabulary (``Query``, ``Chart``, ``Row``, ``Board``) and the PromQL shapes the
panels share, then the seven dashboards' content, then the rendering through the SDK.

Every query names only the platform's own metrics (``bpo_*``, declared in ``bpo/metrics.py`` and
``services/optimizer_worker/metrics.py``) and never the ``job`` label, which differs between ``bpo up``'s
Prometheus and a Prometheus Operator's monitors. Rates use Grafana's ``$__rate_interval``; totals "over the time
range" use ``$__range``. The scrape test (tests/integration/test_observability.py) evaluates every query of the
JSON against a running platform: each one must return data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from grafana_foundation_sdk.builders import bargauge, stat, table, timeseries
from grafana_foundation_sdk.builders.dashboard import Dashboard, DashboardLink, DatasourceVariable
from grafana_foundation_sdk.builders.dashboard import Row as RowBuilder
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DashboardLinkType, DataSourceRef

RATE = "$__rate_interval"
RANGE = "$__range"
TAG = "bpo"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")

# Metrics the platform exports that no panel charts (by declared name: no `_total`), with why. Every other exported
# metric is on some panel: the scrape test checks both directions.
NOT_CHARTED: dict[str, str] = {}

# -- the panel vocabulary --------------------------------------------------------------------------------------

ChartKind = Literal["timeseries", "stat", "bargauge", "table"]


@dataclass(frozen=True, slots=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True, slots=True)
class Chart:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: ChartKind = "timeseries"
    width: int = 12


@dataclass(frozen=True, slots=True)
class Row:
    title: str
    charts: tuple[Chart, ...]


@dataclass(frozen=True, slots=True)
class Board:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]


def chart(
    title: str, description: str, *queries: Query, unit: str = "short", kind: ChartKind = "timeseries", width: int = 12
) -> Chart:
    return Chart(title, description, queries, unit, kind, width)


def figure(title: str, description: str, *queries: Query, unit: str = "short", kind: ChartKind = "stat") -> Chart:
    """A single number (or one per series) at the top of a dashboard."""
    return Chart(title, description, queries, unit, kind, width=6)


# -- the PromQL shapes the panels share ---------------------------------------------------------------------


def total(by: str) -> str:
    """``sum``, kept apart by the ``by`` labels when there are any."""
    return f"sum by ({by})" if by else "sum"


def per_second(selector: str, by: str) -> str:
    return f"{total(by)} (rate({selector}[{RATE}]))"


def over_range(selector: str, by: str = "") -> str:
    return f"{total(by)} (increase({selector}[{RANGE}]))"


def quantile(q: float, histogram: str, by: str, selector: str = "") -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({histogram}_bucket{selector}[{RATE}])))"


def mean(histogram: str, by: str) -> str:
    """Mean observation over the rate window: the sum's rate over the count's."""
    return f"sum by ({by}) (rate({histogram}_sum[{RATE}])) / sum by ({by}) (rate({histogram}_count[{RATE}]))"


def share(part: str, whole: str, by: str, window: str = RATE) -> str:
    """The part's share of the whole per ``by``; 0, not "no data", where the part has no series yet."""
    numerator = f"{total(by)} (rate({part}[{window}]))"
    denominator = f"{total(by)} (rate({whole}[{window}]))"
    return f"({numerator} or {denominator} * 0) / {denominator}"


def percentiles(
    histogram: str, by: str, legend: str, selector: str = "", qs: tuple[float, ...] = (0.5, 0.99)
) -> tuple[Query, ...]:
    return tuple(Query(quantile(q, histogram, by, selector), f"p{round(q * 100)} {legend}") for q in qs)


# Judged items (the judge stage), by winner: the optimized prompt's answer, the original's, or a tie.
JUDGED = "bpo_judged_items_total"


def delta_win_rate(window: str) -> str:
    """ΔWR, the paper's measure: the optimized answers' win rate minus their loss rate."""
    won = f'sum(increase({JUDGED}{{winner="optimized"}}[{window}]))'
    lost = f'sum(increase({JUDGED}{{winner="original"}}[{window}]))'
    return f"({won} - {lost}) / sum(increase({JUDGED}[{window}]))"


def position_consistency(window: str) -> str:
    consistent = f'sum(increase({JUDGED}{{position_consistent="true"}}[{window}]))'
    return f"{consistent} / sum(increase({JUDGED}[{window}]))"


GRPC_ERRORS = 'bpo_grpc_requests_total{code!="OK"}'
ENDPOINT_ERRORS = 'bpo_endpoint_requests_total{outcome!="ok"}'


# -- the dashboards -----------------------------------------------------------------------------------------

OVERVIEW = Board(
    "bpo-overview",
    "bpo / Overview",
    "The platform at a glance: work in flight, throughput, backlogs, failures, endpoints and quality.",
    (
        Row(
            "Now",
            (
                figure(
                    "Jobs running",
                    "Jobs in the running state (the jobs service's sweep counts them).",
                    Query("max(bpo_jobs_running)"),
                ),
                figure(
                    "Oldest pending item",
                    "Age of the oldest unfinished item of a running job.",
                    Query("max(bpo_oldest_pending_item_age_seconds)"),
                    unit="s",
                ),
                figure(
                    "Items judged /s",
                    "Items the judge stage finished per second.",
                    Query(f'sum(rate(bpo_stage_messages_total{{stage="judge", outcome="done"}}[{RATE}]))'),
                ),
                figure(
                    "ΔWR over the time range",
                    "Win rate minus loss rate of the optimized prompts' answers.",
                    Query(delta_win_rate(RANGE)),
                    unit="percentunit",
                ),
            ),
        ),
        Row(
            "Flow",
            (
                chart(
                    "Items /s per stage",
                    "Items each stage finished per second.",
                    Query(per_second('bpo_stage_messages_total{outcome="done"}', "stage"), "{{stage}}"),
                    unit="ops",
                ),
                chart(
                    "Consumer lag per stage",
                    "Messages waiting on each stage's topic, over all partitions.",
                    Query("sum by (stage) (bpo_consumer_lag)", "{{stage}}"),
                ),
                chart(
                    "Optimizer queue depth",
                    "Batches waiting in each optimizer model's Celery queue.",
                    Query("max by (queue) (bpo_celery_queue_depth)", "{{queue}}"),
                ),
                chart(
                    "Item failures /s per stage",
                    "Items failed for good, by the stage they failed in.",
                    Query(per_second("bpo_items_failed_total", "stage"), "{{stage}}"),
                    unit="ops",
                ),
            ),
        ),
        Row(
            "Health",
            (
                chart(
                    "Endpoint error ratio",
                    "Share of model endpoint requests that failed (retried ones included).",
                    Query(share(ENDPOINT_ERRORS, "bpo_endpoint_requests_total", "endpoint"), "{{endpoint}}"),
                    unit="percentunit",
                ),
                chart(
                    "Optimize latency",
                    "Latency of OptimizerService.Optimize calls.",
                    *percentiles(
                        "bpo_grpc_latency_seconds", "method", "{{method}}", '{service="rewriter", method="Optimize"}'
                    ),
                    unit="s",
                ),
                figure(
                    "Live optimizer workers",
                    "Workers announcing each optimizer queue's model.",
                    Query("max by (queue) (bpo_optimizer_workers)", "{{queue}}"),
                ),
                figure(
                    "Dependencies up",
                    "Whether every service reaches its dependencies (1 = all of them answer).",
                    Query("min by (dependency) (bpo_dependency_up)", "{{dependency}}"),
                ),
            ),
        ),
    ),
)

JOBS = Board(
    "bpo-jobs",
    "bpo / Jobs",
    "Jobs and their items: submissions, what is running, throughput per stage, failures and how long work waits.",
    (
        Row(
            "Jobs",
            (
                figure(
                    "Jobs submitted",
                    "Jobs submitted over the time range.",
                    Query(over_range('bpo_jobs_total{event="submitted"}')),
                ),
                figure("Jobs running", "Jobs in the running state now.", Query("max(bpo_jobs_running)")),
                figure(
                    "Items accepted",
                    "Items accepted into jobs over the time range.",
                    Query(over_range('bpo_items_submitted_total{result="accepted"}')),
                ),
                figure(
                    "Oldest pending item",
                    "Age of the oldest unfinished item of a running job.",
                    Query("max(bpo_oldest_pending_item_age_seconds)"),
                    unit="s",
                ),
                chart(
                    "Job events /s",
                    "Jobs submitted and cancelled per second.",
                    Query(per_second("bpo_jobs_total", "event"), "{{event}}"),
                    unit="ops",
                ),
                chart(
                    "Items submitted /s",
                    "Submitted items: accepted, rejected at submission, duplicates of others.",
                    Query(per_second("bpo_items_submitted_total", "result"), "{{result}}"),
                    unit="ops",
                ),
            ),
        ),
        Row(
            "Items",
            (
                chart(
                    "Items /s per stage",
                    "Items each stage finished per second.",
                    Query(per_second('bpo_stage_messages_total{outcome="done"}', "stage"), "{{stage}}"),
                    unit="ops",
                ),
                chart(
                    "Stage messages /s by outcome",
                    "What each stage did with its messages: done, parked for a retry, failed, skipped, redelivered, "
                    "deferred by a quota, duplicate, poison.",
                    Query(per_second("bpo_stage_messages_total", "stage, outcome"), "{{stage}} {{outcome}}"),
                    unit="ops",
                ),
                chart(
                    "Item failures /s by stage and reason",
                    "Items failed for good, by stage and reason class (rejected input, retries exhausted, too "
                    "large, unusable job spec, dead-lettered).",
                    Query(per_second("bpo_items_failed_total", "stage, reason"), "{{stage}} {{reason}}"),
                    unit="ops",
                ),
                chart(
                    "Failures by stage and reason",
                    "Items failed over the time range.",
                    Query(over_range("bpo_items_failed_total", "stage, reason"), "{{stage}} {{reason}}"),
                    kind="bargauge",
                ),
                chart(
                    "Oldest pending item age",
                    "Age of the oldest unfinished item of a running job.",
                    Query("max(bpo_oldest_pending_item_age_seconds)", "oldest"),
                    unit="s",
                    width=24,
                ),
            ),
        ),
    ),
)

PIPELINE = Board(
    "bpo-pipeline",
    "bpo / Pipeline",
    "The Kafka stages: backlog per partition, batches, dead letters, re-publishes by the sweep, caches.",
    (
        Row(
            "Backlog and batches",
            (
                chart(
                    "Consumer lag per stage and partition",
                    "Messages not yet committed, per partition.",
                    Query("sum by (stage, partition) (bpo_consumer_lag)", "{{stage}} [{{partition}}]"),
                ),
                chart(
                    "Batches /s per stage",
                    "Batches each stage handled per second.",
                    Query(per_second("bpo_stage_batch_seconds_count", "stage"), "{{stage}}"),
                    unit="ops",
                ),
                chart(
                    "Batch size per stage",
                    "Mean messages per batch.",
                    Query(mean("bpo_stage_batch_size", "stage"), "{{stage}}"),
                ),
                chart(
                    "Batch latency per stage",
                    "Time to handle one batch, from poll to commit.",
                    *percentiles("bpo_stage_batch_seconds", "stage", "{{stage}}"),
                    unit="s",
                ),
            ),
        ),
        Row(
            "Recovery",
            (
                chart(
                    "Dead letters per stage",
                    "Messages dead-lettered (undecodable, or naming no job or item).",
                    Query(f"sum by (stage) (increase(bpo_dead_letters_total[{RATE}]))", "{{stage}}"),
                ),
                chart(
                    "Re-publishes by reason",
                    "Items the sweep handed to their stage again: never published, parked and due, or idle.",
                    Query(f"sum by (reason) (increase(bpo_items_republished_total[{RATE}]))", "{{reason}}"),
                ),
                chart(
                    "Cache hit ratio",
                    "Rewrites and greedy target and judge completions served from Postgres.",
                    Query(
                        share('bpo_rewrite_cache_lookups_total{result="hit"}', "bpo_rewrite_cache_lookups_total", ""),
                        "rewrites",
                    ),
                    Query(
                        share(
                            'bpo_completion_cache_lookups_total{result="hit"}', "bpo_completion_cache_lookups_total", ""
                        ),
                        "completions",
                    ),
                    unit="percentunit",
                ),
                chart(
                    "Dependencies up",
                    "Whether each process reaches Postgres, Kafka and Redis (1) or not (0).",
                    Query("min by (dependency) (bpo_dependency_up)", "{{dependency}}"),
                ),
            ),
        ),
    ),
)

OPTIMIZER_WORKERS = Board(
    "bpo-optimizer-workers",
    "bpo / Optimizer workers",
    "The Celery optimizer workers: their queues, replicas and versions, tasks, latency, tokens and rewrite outcomes.",
    (
        Row(
            "Capacity",
            (
                chart(
                    "Queue depth",
                    "Batches waiting in each optimizer model's Celery queue.",
                    Query("max by (queue) (bpo_celery_queue_depth)", "{{queue}}"),
                ),
                chart(
                    "Live workers per queue",
                    "Workers announcing each queue's model (heartbeats in Redis).",
                    Query("max by (queue) (bpo_optimizer_workers)", "{{queue}}"),
                ),
                chart(
                    "Engine replicas per model",
                    "Engine replicas loaded and serving, over all workers.",
                    Query("sum by (model) (bpo_worker_engine_replicas)", "{{model}}"),
                ),
                chart(
                    "Model version served",
                    "Replicas serving each version of each optimizer model.",
                    Query("sum by (model, version) (bpo_worker_model_version)", "{{model}} {{version}}"),
                    kind="table",
                ),
                figure(
                    "Engine load time",
                    "Mean time a worker process took to load its engine.",
                    Query(
                        "max by (model) (bpo_worker_engine_load_seconds_sum / bpo_worker_engine_load_seconds_count)",
                        "{{model}}",
                    ),
                    unit="s",
                ),
                figure(
                    "Worker restarts",
                    "Optimizer worker restarts over the time range.",
                    Query(f"sum(changes(bpo_worker_start_time_seconds[{RANGE}]))"),
                ),
            ),
        ),
        Row(
            "Work",
            (
                chart(
                    "Tasks /s by outcome",
                    "Batch tasks finished: success, retry, failure, duplicate.",
                    Query(per_second("bpo_worker_tasks_total", "model, outcome"), "{{model}} {{outcome}}"),
                    unit="ops",
                ),
                chart(
                    "Batch latency",
                    "Time a task spent optimizing its batch.",
                    *percentiles("bpo_worker_task_seconds", "model", "{{model}}"),
                    unit="s",
                ),
                chart(
                    "Batch size", "Mean prompts per task.", Query(mean("bpo_worker_batch_size", "model"), "{{model}}")
                ),
                chart(
                    "Tokens /s",
                    "Optimizer tokens: prompt (in) and generated (out).",
                    Query(per_second("bpo_worker_tokens_total", "model, direction"), "{{model}} {{direction}}"),
                ),
                chart(
                    "Prompts /s by status",
                    "Prompts in finished batches: OK or the failure's status code.",
                    Query(per_second("bpo_worker_items_total", "model, status"), "{{model}} {{status}}"),
                    unit="ops",
                ),
                chart(
                    "Rewrite outcomes /s",
                    "Prompts rewritten, or kept as the user wrote them and why.",
                    Query(
                        per_second("bpo_worker_rewrites_total", "outcome, fallback_reason"),
                        "{{outcome}} {{fallback_reason}}",
                    ),
                    unit="ops",
                ),
                chart(
                    "Kept original by fallback reason",
                    "Prompts kept unchanged over the time range, by reason.",
                    Query(
                        over_range('bpo_worker_rewrites_total{outcome="kept_original"}', "fallback_reason"),
                        "{{fallback_reason}}",
                    ),
                    kind="bargauge",
                    width=24,
                ),
            ),
        ),
    ),
)

ENDPOINTS = Board(
    "bpo-endpoints",
    "bpo / Endpoints",
    "Calls to the declared model endpoints: requests, latency, errors, retries, rate-limit waits, tokens and cost.",
    (
        Row(
            "Requests",
            (
                chart(
                    "Requests /s by outcome",
                    "HTTP requests to each endpoint, by outcome (every retry counts).",
                    Query(per_second("bpo_endpoint_requests_total", "endpoint, outcome"), "{{endpoint}} {{outcome}}"),
                    unit="reqps",
                ),
                chart(
                    "Request latency",
                    "Time of one request to the endpoint.",
                    *percentiles("bpo_endpoint_request_seconds", "endpoint", "{{endpoint}}", qs=(0.5, 0.95, 0.99)),
                    unit="s",
                ),
                chart(
                    "Error ratio",
                    "Share of requests that failed.",
                    Query(share(ENDPOINT_ERRORS, "bpo_endpoint_requests_total", "endpoint"), "{{endpoint}}"),
                    unit="percentunit",
                ),
                chart(
                    "Retries /s",
                    "Requests retried after a retryable error (timeouts, 429, 5xx).",
                    Query(per_second("bpo_endpoint_retries_total", "endpoint"), "{{endpoint}}"),
                    unit="ops",
                ),
                chart(
                    "Rate-limit wait",
                    "Seconds spent waiting for the endpoint's rate limiter, per second.",
                    Query(per_second("bpo_endpoint_rate_limit_wait_seconds_sum", "endpoint"), "{{endpoint}}"),
                    unit="s",
                ),
                chart(
                    "Rate-limit wait per request",
                    "Wait before one request was sent.",
                    *percentiles("bpo_endpoint_rate_limit_wait_seconds", "endpoint", "{{endpoint}}", qs=(0.5, 0.95)),
                    unit="s",
                ),
            ),
        ),
        Row(
            "Tokens and cost",
            (
                chart(
                    "Tokens /s by role",
                    "Tokens processed by the stages, by role.",
                    Query(per_second("bpo_tokens_total", "role, direction"), "{{role}} {{direction}}"),
                ),
                chart(
                    "Tokens /s per team",
                    "Tokens spent for each team, by role.",
                    Query(per_second("bpo_team_tokens_total", "team, role"), "{{team}} {{role}}"),
                ),
                chart(
                    "Cost per team per hour",
                    "Spend at the declared endpoints' prices, by team and role.",
                    Query(f"{per_second('bpo_team_cost_usd_total', 'team, role')} * 3600", "{{team}} {{role}}"),
                    unit="currencyUSD",
                ),
                chart(
                    "Cost per team",
                    "Spend over the time range at the declared endpoints' prices.",
                    Query(over_range("bpo_team_cost_usd_total", "team"), "{{team}}"),
                    unit="currencyUSD",
                    kind="bargauge",
                ),
            ),
        ),
    ),
)

QUALITY = Board(
    "bpo-quality",
    "bpo / Quality",
    "How the optimized prompts' answers fare against the originals' with the judge, and how consistent it is.",
    (
        Row(
            "Over the time range",
            (
                figure(
                    "ΔWR",
                    "Win rate minus loss rate of the optimized prompts' answers.",
                    Query(delta_win_rate(RANGE)),
                    unit="percentunit",
                ),
                figure(
                    "Judged items by winner",
                    "Optimized won, original won, or tie.",
                    Query(over_range(JUDGED, "winner"), "{{winner}}"),
                ),
                figure(
                    "Position consistency",
                    "Share of verdicts that agree when the answers swap places.",
                    Query(position_consistency(RANGE)),
                    unit="percentunit",
                ),
                figure("Items judged", "Items the judge stage judged.", Query(over_range(JUDGED))),
            ),
        ),
        Row(
            "Trends (rolling hour)",
            (
                chart(
                    "ΔWR",
                    "Win rate minus loss rate over the last hour.",
                    Query(delta_win_rate("1h"), "ΔWR"),
                    unit="percentunit",
                ),
                chart(
                    "Position consistency",
                    "Share of consistent verdicts over the last hour.",
                    Query(position_consistency("1h"), "consistent"),
                    unit="percentunit",
                ),
                chart(
                    "Judged items /s by winner",
                    "Verdicts per second.",
                    Query(per_second(JUDGED, "winner"), "{{winner}}"),
                    unit="ops",
                    width=24,
                ),
            ),
        ),
    ),
)

GRPC = Board(
    "bpo-grpc",
    "bpo / gRPC",
    "Calls to the platform's gRPC services: rate, status codes and latency per method.",
    (
        Row(
            "Calls",
            (
                chart(
                    "Requests /s by method",
                    "Calls handled per second.",
                    Query(per_second("bpo_grpc_requests_total", "service, method"), "{{service}} {{method}}"),
                    unit="reqps",
                ),
                chart(
                    "Responses /s by code",
                    "Calls per second by method and status code.",
                    Query(per_second("bpo_grpc_requests_total", "method, code"), "{{method}} {{code}}"),
                    unit="reqps",
                ),
                chart(
                    "Error ratio by method",
                    "Share of calls that did not end OK.",
                    Query(share(GRPC_ERRORS, "bpo_grpc_requests_total", "service, method"), "{{service}} {{method}}"),
                    unit="percentunit",
                ),
                chart(
                    "Latency by method",
                    "Call latency per method.",
                    *percentiles(
                        "bpo_grpc_latency_seconds", "service, method", "{{service}} {{method}}", qs=(0.5, 0.95, 0.99)
                    ),
                    unit="s",
                ),
            ),
        ),
    ),
)

BOARDS = (OVERVIEW, JOBS, PIPELINE, OPTIMIZER_WORKERS, ENDPOINTS, QUALITY, GRPC)

# -- rendering through the SDK ----------------------------------------------------------------------------


def _target(query: Query, ref: str, kind: ChartKind) -> Dataquery:
    target = Dataquery().expr(query.expr).legend_format(query.legend or "__auto").ref_id(ref).datasource(DATASOURCE)
    # Single numbers, bars and tables show one value per series: asked for at the end of the range only.
    return target.range() if kind == "timeseries" else target.instant()


PanelBuilder = timeseries.Panel | stat.Panel | bargauge.Panel | table.Panel


def _panel(spec: Chart, panel_id: int) -> PanelBuilder:
    panel: PanelBuilder
    if spec.kind == "timeseries":
        panel = timeseries.Panel()
    elif spec.kind == "stat":
        panel = stat.Panel()
    elif spec.kind == "bargauge":
        panel = bargauge.Panel()
    else:
        panel = table.Panel()
    panel.id(panel_id).title(spec.title).description(spec.description).datasource(DATASOURCE).unit(spec.unit)
    panel.span(spec.width).height(8 if spec.width > 6 else 4)
    for index, query in enumerate(spec.queries):
        panel.with_target(_target(query, chr(ord("A") + index), spec.kind))
    return panel


def build(board: Board) -> Dashboard:
    dashboard = (
        Dashboard(board.title)
        .uid(board.uid)
        .description(board.description)
        .tags([TAG])
        .time("now-1h", "now")
        .refresh("30s")
        .editable()
        .with_variable(DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .link(
            DashboardLink("bpo dashboards").type(DashboardLinkType.DASHBOARDS).tags([TAG]).as_dropdown(True)
            .include_vars(True).keep_time(True)
        )
    )  # fmt: skip
    panel_id = 0
    for row in board.rows:
        panel_id += 1
        # An expanded row: its panels follow it on the dashboard rather than nesting in it.
        dashboard = dashboard.with_row(RowBuilder(row.title).id(panel_id))
        for spec in row.charts:
            panel_id += 1
            dashboard = dashboard.with_panel(_panel(spec, panel_id))
    return dashboard


def render(board: Board) -> str:
    """The dashboard's JSON as it is checked in (keys sorted, so a change shows as a small diff)."""
    return JSONEncoder(sort_keys=True, indent=2, ensure_ascii=False).encode(build(board).build()) + "\n"


def file_name(board: Board) -> str:
    return f"{board.uid}.json"
