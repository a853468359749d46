"""The gateway's own services: UsageService for callers, AdminService for operators."""

from __future__ import annotations

import hmac
import time
from typing import Any

import grpc
from dreamsight.gateway.v1 import admin_pb2, admin_pb2_grpc, usage_pb2, usage_pb2_grpc

from dreamsight_server.errors import FailedPrecondition, PermissionDenied, Unauthenticated
from gateway.core import GatewayCore
from gateway.grpc_api import convert
from gateway.training import TrainingMeter

Context = grpc.aio.ServicerContext[Any, Any]


def _authorization(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return value
    return None


class UsageServicer(usage_pb2_grpc.UsageServiceServicer):
    """GetUsage for the calling key's tenant."""

    def __init__(self, core: GatewayCore, training: TrainingMeter | None = None) -> None:
        self._core = core
        self._training = training

    async def GetUsage(
        self, request: usage_pb2.GetUsageRequest, context: Context
    ) -> usage_pb2.GetUsageResponse:
        caller, tier = await self._core.authenticate(_authorization(context))
        # Bill jobs that ended since they were last seen, and count the running ones.
        jobs = await self._training.reconcile(caller) if self._training else 0
        now = time.time()
        windows = [
            await self._core.budgets.window_usage(caller.tenant, w, now) for w in tier.windows
        ]
        in_flight = await self._core.limiter.in_flight(caller.tenant)
        return convert.usage_response(caller, tier, in_flight, jobs, windows)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Key management behind the admin token."""

    def __init__(self, core: GatewayCore, admin_token: str) -> None:
        self._core = core
        self._token = admin_token

    def _check(self, context: Context) -> None:
        if not self._token:
            raise FailedPrecondition("the admin service is disabled (no admin token configured)")
        authorization = _authorization(context)
        if not authorization:
            raise Unauthenticated("the admin service needs the admin token")
        presented = authorization.removeprefix("Bearer ").strip()
        if not hmac.compare_digest(presented.encode(), self._token.encode()):
            raise PermissionDenied("only the admin token may manage keys")

    async def CreateKey(
        self, request: admin_pb2.CreateKeyRequest, context: Context
    ) -> admin_pb2.CreateKeyResponse:
        self._check(context)
        row, secret = await self._core.keys.create(
            request.tenant, request.tier, request.description
        )
        return admin_pb2.CreateKeyResponse(key=convert.api_key(row), secret=secret)

    async def ListKeys(
        self, request: admin_pb2.ListKeysRequest, context: Context
    ) -> admin_pb2.ListKeysResponse:
        self._check(context)
        rows = await self._core.keys.list(request.tenant, request.include_revoked)
        return admin_pb2.ListKeysResponse(keys=[convert.api_key(r) for r in rows])

    async def RevokeKey(
        self, request: admin_pb2.RevokeKeyRequest, context: Context
    ) -> admin_pb2.RevokeKeyResponse:
        self._check(context)
        row = await self._core.keys.revoke(request.key_id)
        return admin_pb2.RevokeKeyResponse(key=convert.api_key(row))
