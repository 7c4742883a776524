"""The generator process: GeneratorService over gRPC and the generate stage on the rewrites topic."""

from __future__ import annotations

import asyncio

import grpc

from bpo.pipeline.runtime import Runtime, ServiceParts, run_service
from bpo.settings import BpoSettings
from bpo.v1 import bpo_pb2
from bpo.v1 import bpo_pb2_grpc as pb_grpc
from services.generator.servicer import GeneratorServicer
from services.generator.stage import GenerateStage

SERVICE = bpo_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name


async def build(runtime: Runtime) -> ServiceParts:
    settings = runtime.settings
    engines = runtime.engine_registry()
    servicer = GeneratorServicer(engines, settings.platform, runtime.quotas)

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_GeneratorServiceServicer_to_server(servicer, server)

    return ServiceParts(register, [SERVICE], GenerateStage(runtime.stage_context(), engines))


def main(settings: BpoSettings) -> None:
    asyncio.run(run_service("generator", settings, build))
