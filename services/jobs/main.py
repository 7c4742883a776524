"""The jobs process: JobsService over gRPC; on start it re-publishes every unfinished item of running jobs."""

from __future__ import annotations

import asyncio

import grpc

from bpo.pipeline.runtime import Runtime, ServiceParts, run_service
from bpo.settings import BpoSettings
from bpo.v1 import bpo_pb2
from bpo.v1 import bpo_pb2_grpc as pb_grpc
from services.jobs.resume import republish_unfinished
from services.jobs.servicer import JobsServicer

SERVICE = bpo_pb2.DESCRIPTOR.services_by_name["JobsService"].full_name


async def build(runtime: Runtime) -> ServiceParts:
    servicer = JobsServicer(runtime)

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_JobsServiceServicer_to_server(servicer, server)

    return ServiceParts(register, [SERVICE])


async def resume(runtime: Runtime) -> None:
    await asyncio.to_thread(republish_unfinished, runtime)


def main(settings: BpoSettings) -> None:
    port = settings.platform.jobs_port
    asyncio.run(run_service("jobs", settings, port, settings.platform.metrics_port_base, build, on_ready=resume))
