"""The rewriter process: OptimizerService over gRPC and the rewrite stage on the prompts topic, both sending
their batches to the Celery optimizer workers."""

from __future__ import annotations

import asyncio

import grpc
import redis

from bpo.models.catalogue import ModelCatalogue
from bpo.models.prepare import ModelPreparer
from bpo.pipeline.admission import Admission
from bpo.pipeline.optimizer_models import OptimizerModels
from bpo.pipeline.rewriting import CachedRewriter, ModelVersions
from bpo.pipeline.runtime import Runtime, ServiceParts, run_service
from bpo.settings import BpoSettings
from bpo.v1 import bpo_pb2
from bpo.v1 import bpo_pb2_grpc as pb_grpc
from services.optimizer_worker.app import make_celery_app, queue_for_model
from services.optimizer_worker.client import OptimizerWorkersClient
from services.optimizer_worker.presence import ServedModels
from services.optimizer_worker.settings import WorkerSettings
from services.rewriter.servicer import OptimizerServicer
from services.rewriter.stage import RewriteStage

SERVICE = bpo_pb2.DESCRIPTOR.services_by_name["OptimizerService"].full_name


async def build(runtime: Runtime) -> ServiceParts:
    settings = runtime.settings
    worker_settings = WorkerSettings.for_platform(settings)
    client = OptimizerWorkersClient(make_celery_app(worker_settings), timeout_s=settings.platform.worker_timeout_s)
    catalogue = ModelCatalogue()
    versions = ModelVersions(
        catalogue,
        ModelPreparer(settings.models_dir, install_missing=None),
        runtime.store,
        worker_settings.engine_settings_for,
    )
    rewriter = CachedRewriter(runtime.store, client, versions, runtime.metrics, task_size=settings.optimizer.batch_size)
    broker = redis.Redis.from_url(worker_settings.broker_url, socket_connect_timeout=5, socket_timeout=5)
    runtime.closers.append(lambda: asyncio.to_thread(broker.close))
    served = ServedModels(broker)
    models = OptimizerModels(worker_settings.models, served, catalogue)
    servicer = OptimizerServicer(
        rewriter,
        Admission(settings.platform, models, runtime.endpoints),
        runtime.quotas,
        settings.optimizer.params(),
        batch_size=settings.optimizer.batch_size,
    )

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_OptimizerServiceServicer_to_server(servicer, server)

    def queue_depth() -> None:
        live = served.live()
        for model in {*worker_settings.models, *live}:
            queue = queue_for_model(model)
            runtime.metrics.celery_queue_depth.labels(queue).set(int(broker.llen(queue)))
            runtime.metrics.optimizer_workers.labels(queue).set(live.get(model, 0))

    return ServiceParts(
        register,
        [SERVICE],
        RewriteStage(runtime.stage_context(), rewriter, models),
        gauges=[queue_depth],
        dependencies={"redis": lambda: bool(broker.ping())},
    )


def main(settings: BpoSettings) -> None:
    asyncio.run(run_service("rewriter", settings, build))
