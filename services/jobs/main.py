"""The jobs process: JobsService over gRPC, and the sweep that hands unfinished items to their stages."""

from __future__ import annotations

import asyncio

import grpc
import redis

from bpo.models.catalogue import ModelCatalogue
from bpo.pipeline.admission import Admission
from bpo.pipeline.optimizer_models import OptimizerModels
from bpo.pipeline.runtime import Runtime, ServiceParts, run_service
from bpo.settings import BpoSettings
from bpo.v1 import bpo_pb2
from bpo.v1 import bpo_pb2_grpc as pb_grpc
from services.jobs.servicer import JobsServicer
from services.jobs.sweep import Sweeper
from services.optimizer_worker.presence import ServedModels
from services.optimizer_worker.settings import WorkerSettings

SERVICE = bpo_pb2.DESCRIPTOR.services_by_name["JobsService"].full_name


async def build(runtime: Runtime) -> ServiceParts:
    settings = runtime.settings
    worker_settings = WorkerSettings.for_platform(settings)
    # The optimizer models jobs may name: the workers' configured ones, and any a live worker announces.
    broker = redis.Redis.from_url(worker_settings.broker_url, socket_connect_timeout=5, socket_timeout=5)
    runtime.closers.append(lambda: asyncio.to_thread(broker.close))
    models = OptimizerModels(worker_settings.models, ServedModels(broker), ModelCatalogue())
    sweeper = Sweeper(runtime)
    servicer = JobsServicer(runtime, Admission(settings.platform, models, runtime.endpoints), sweeper.wake)

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_JobsServiceServicer_to_server(servicer, server)

    return ServiceParts(register, [SERVICE], background=[sweeper.run])


def main(settings: BpoSettings) -> None:
    asyncio.run(run_service("jobs", settings, build))
