"""The judge process: JudgeService over gRPC and the judge stage on the answers topic."""

from __future__ import annotations

import asyncio

import grpc

from bpo.pipeline.runtime import Runtime, ServiceParts, run_service
from bpo.settings import BpoSettings
from bpo.v1 import bpo_pb2
from bpo.v1 import bpo_pb2_grpc as pb_grpc
from services.judge.servicer import JudgeServicer
from services.judge.stage import JudgeStage

SERVICE = bpo_pb2.DESCRIPTOR.services_by_name["JudgeService"].full_name


async def build(runtime: Runtime) -> ServiceParts:
    settings = runtime.settings
    engines = runtime.engine_registry()
    servicer = JudgeServicer(engines, settings.platform, runtime.quotas)

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_JudgeServiceServicer_to_server(servicer, server)

    return ServiceParts(register, [SERVICE], JudgeStage(runtime.stage_context(), engines))


def main(settings: BpoSettings) -> None:
    asyncio.run(run_service("judge", settings, build))
