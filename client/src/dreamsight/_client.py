"""``Client`` and ``AsyncClient``: mirror images over one shared core.

Configuration (target, key, TLS, deadlines, retries, keepalive) is resolved
once in :class:`_Config`; requests and responses are converted in
``_convert``; errors are translated once in ``_call``/``_acall`` and their
streaming counterparts. Retries back off with jitter on UNAVAILABLE and, when
the server sent RetryInfo, on RESOURCE_EXHAUSTED; a stream is retried only
before its first message, and training jobs carry a client request id so a
retried create never makes a second job.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import grpc

from dreamsight import _convert
from dreamsight._errors import DreamsightError, RateLimited, Unavailable, from_rpc_error
from dreamsight._types import (
    ApiKey,
    ChatChunk,
    ChatResponse,
    CreatedKey,
    GenerateEvent,
    GenerateResult,
    ImageInput,
    JobEvent,
    MessageLike,
    Model,
    Options,
    Tool,
    ToolChoice,
    TrainingJob,
    Usage,
)
from dreamsight.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from dreamsight.gateway.v1 import admin_pb2, admin_pb2_grpc, usage_pb2, usage_pb2_grpc
from dreamsight.vision.v1 import vision_pb2, vision_pb2_grpc

T = TypeVar("T")
DEFAULT_HOST = "127.0.0.1:50051"


@dataclass(frozen=True)
class Timeouts:
    """Default deadline per kind of call, in seconds (None: no deadline)."""

    chat: float | None = 300.0
    generate: float | None = 600.0
    unary: float | None = 30.0
    watch: float | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """Retries with jittered exponential backoff."""

    max_attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 10.0
    multiplier: float = 2.0
    retry_unavailable: bool = True
    retry_rate_limited: bool = True
    """Only when the server said when (RetryInfo), and only up to max_backoff."""

    def delay(self, error: DreamsightError, attempt: int) -> float | None:
        """Seconds to wait before attempt+1, or None to give up."""
        if attempt + 1 >= self.max_attempts:
            return None
        if isinstance(error, Unavailable) and self.retry_unavailable:
            backoff = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
            return random.uniform(0, backoff)  # full jitter
        if (
            isinstance(error, RateLimited)
            and self.retry_rate_limited
            and error.retry_after is not None
            and error.retry_after <= self.max_backoff
        ):
            return error.retry_after * random.uniform(1.0, 1.2)
        return None


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class _Config:
    target: str
    metadata: tuple[tuple[str, str], ...]
    credentials: grpc.ChannelCredentials | None
    timeouts: Timeouts
    retry: RetryPolicy
    options: tuple[tuple[str, Any], ...] = field(default=())


def _config(
    host: str | None,
    api_key: str | None,
    tls: bool | None,
    root_certificates: bytes | None,
    timeouts: Timeouts | None,
    retry: RetryPolicy | None,
) -> _Config:
    target = host or os.environ.get("DREAMSIGHT_HOST") or DEFAULT_HOST
    if tls is None:
        tls = target.startswith("https://") or os.environ.get("DREAMSIGHT_TLS", "") in ("1", "true")
    target = target.removeprefix("https://").removeprefix("http://")
    key = api_key if api_key is not None else os.environ.get("DREAMSIGHT_API_KEY", "")
    ca_path = os.environ.get("DREAMSIGHT_TLS_CA")
    if tls and root_certificates is None and ca_path:
        root_certificates = Path(ca_path).read_bytes()
    credentials = grpc.ssl_channel_credentials(root_certificates) if tls else None
    return _Config(
        target=target,
        metadata=(("authorization", f"Bearer {key}"),) if key else (),
        credentials=credentials,
        timeouts=timeouts or Timeouts(),
        retry=retry or RetryPolicy(),
        options=(
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.max_receive_message_length", 128 * 1024 * 1024),
            ("grpc.max_send_message_length", 128 * 1024 * 1024),
            ("grpc.primary_user_agent", "dreamsight-python"),
        ),
    )


def _metadata(config: _Config, request_id: str) -> tuple[tuple[str, str], ...]:
    return (*config.metadata, ("x-request-id", request_id))


class _Common:
    """What both clients share: configuration and request building."""

    _config: _Config

    def _timeout(self, kind: str, timeout: float | Literal["default"] | None) -> float | None:
        if timeout != "default":
            return timeout
        value: float | None = getattr(self._config.timeouts, kind)
        return value


class Client(_Common):
    """The synchronous dreamsight client.

    >>> client = Client("127.0.0.1:50051", api_key="ds_...")
    >>> for chunk in client.chat("llava-demo", ["Describe this", ], stream=True):
    ...     print(chunk.text, end="")
    """

    def __init__(
        self,
        host: str | None = None,
        *,
        api_key: str | None = None,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        """Connect to ``host`` (default: $DREAMSIGHT_HOST, else 127.0.0.1:50051)
        with ``api_key`` (default: $DREAMSIGHT_API_KEY)."""
        self._config = _config(host, api_key, tls, root_certificates, timeouts, retry)
        options = list(self._config.options)
        if self._config.credentials is not None:
            channel = grpc.secure_channel(self._config.target, self._config.credentials, options)
        else:
            channel = grpc.insecure_channel(self._config.target, options)
        self._channel = channel
        self._vision = vision_pb2_grpc.VisionServiceStub(channel)
        self._diffusion = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        self._usage = usage_pb2_grpc.UsageServiceStub(channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        request_id = uuid.uuid4().hex
        attempt = 0
        while True:
            try:
                return method(
                    request, timeout=timeout, metadata=_metadata(self._config, request_id)
                )
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error, request_id)
                delay = self._config.retry.delay(error, attempt)
                if delay is None:
                    raise error from None
                time.sleep(delay)
                attempt += 1

    def _stream(
        self, method: Callable[..., Any], request: Any, timeout: float | None
    ) -> Iterator[Any]:
        request_id = getattr(request, "request_id", "") or uuid.uuid4().hex
        attempt = 0
        while True:
            call = method(request, timeout=timeout, metadata=_metadata(self._config, request_id))
            started = False
            try:
                for item in call:
                    started = True
                    yield item
                return
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error, request_id)
                delay = None if started else self._config.retry.delay(error, attempt)
                if delay is None:
                    raise error from None
                time.sleep(delay)
                attempt += 1
            finally:
                call.cancel()

    # chat -----------------------------------------------------------------

    @overload
    def chat(
        self,
        model: str = "",
        messages: Sequence[MessageLike] | MessageLike = (),
        *,
        options: Options | None = None,
        tools: Sequence[Tool] = (),
        tool_choice: ToolChoice | None = None,
        stream: Literal[False] = False,
        timeout: float | Literal["default"] | None = "default",
    ) -> ChatResponse: ...

    @overload
    def chat(
        self,
        model: str = "",
        messages: Sequence[MessageLike] | MessageLike = (),
        *,
        options: Options | None = None,
        tools: Sequence[Tool] = (),
        tool_choice: ToolChoice | None = None,
        stream: Literal[True],
        timeout: float | Literal["default"] | None = "default",
    ) -> Iterator[ChatChunk]: ...

    def chat(
        self,
        model: str = "",
        messages: Sequence[MessageLike] | MessageLike = (),
        *,
        options: Options | None = None,
        tools: Sequence[Tool] = (),
        tool_choice: ToolChoice | None = None,
        stream: bool = False,
        timeout: float | Literal["default"] | None = "default",
    ) -> ChatResponse | Iterator[ChatChunk]:
        """Chat about images. ``stream=True`` yields chunks; the last has ``done``.

        ``tools`` the model may call: ``tool_choice`` "required" or one Tool
        makes it call (any model); "auto" lets it choose where the service
        runs a tool call parser. The calls are the response's ``tool_calls``.
        """
        request = _convert.chat_request(
            model, messages, options, uuid.uuid4().hex, tools, tool_choice
        )
        chunks = (
            _convert.chat_chunk(r)
            for r in self._stream(self._vision.Chat, request, self._timeout("chat", timeout))
        )
        if stream:
            return chunks
        # Read to the end (not just the final message), so the call completes
        # normally instead of being cancelled after its last message.
        finals = [c.response for c in chunks if c.done and c.response is not None]
        if not finals:
            raise DreamsightError("the stream ended without a final message")
        return finals[-1]

    # images ---------------------------------------------------------------

    @overload
    def generate_image(
        self,
        prompt: str,
        *,
        model: str = "",
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str = "",
        seed: int | None = None,
        num_images: int | None = None,
        stream: Literal[False] = False,
        timeout: float | Literal["default"] | None = "default",
    ) -> GenerateResult: ...

    @overload
    def generate_image(
        self,
        prompt: str,
        *,
        model: str = "",
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str = "",
        seed: int | None = None,
        num_images: int | None = None,
        stream: Literal[True],
        timeout: float | Literal["default"] | None = "default",
    ) -> Iterator[GenerateEvent]: ...

    def generate_image(
        self,
        prompt: str,
        *,
        model: str = "",
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str = "",
        seed: int | None = None,
        num_images: int | None = None,
        stream: bool = False,
        timeout: float | Literal["default"] | None = "default",
    ) -> GenerateResult | Iterator[GenerateEvent]:
        """Generate images; ``stream=True`` yields progress, then the result."""
        request = _convert.generate_request(
            uuid.uuid4().hex,
            model=model,
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            scheduler=scheduler,
            seed=seed,
            num_images=num_images,
        )
        events = (
            _convert.generate_event(r)
            for r in self._stream(
                self._diffusion.Generate, request, self._timeout("generate", timeout)
            )
        )
        if stream:
            return events
        results = [e for e in events if isinstance(e, GenerateResult)]
        if not results:
            raise DreamsightError("the stream ended without a result")
        return results[-1]

    # training -------------------------------------------------------------

    def train(
        self,
        instance_images: Sequence[ImageInput],
        instance_prompt: str,
        *,
        base_model: str = "",
        class_prompt: str = "",
        num_class_images: int | None = None,
        prior_loss_weight: float | None = None,
        max_train_steps: int | None = None,
        learning_rate: float | None = None,
        train_text_encoder: bool | None = None,
        resolution: int | None = None,
        seed: int | None = None,
        checkpoint_interval: int | None = None,
        validation_prompt: str = "",
        output_model_name: str = "",
        kind: Literal["lora", "full"] | None = None,
        rank: int | None = None,
        lora_alpha: float | None = None,
        lora_layers: Sequence[str] | None = None,
        train_text_encoder_lora: bool | None = None,
    ) -> TrainingJobHandle:
        """Start a DreamBooth job; retries never create a second job.

        ``kind`` is "lora" (the service's default: a small adapter served on
        the base model) or "full"; ``rank``, ``lora_alpha``, ``lora_layers``
        and ``train_text_encoder_lora`` apply to LoRA only, and
        ``train_text_encoder`` (the whole encoder) to a full tune only.
        """
        spec = _convert.training_spec(
            instance_images=instance_images,
            base_model=base_model,
            instance_prompt=instance_prompt,
            class_prompt=class_prompt,
            num_class_images=num_class_images,
            prior_loss_weight=prior_loss_weight,
            max_train_steps=max_train_steps,
            learning_rate=learning_rate,
            train_text_encoder=train_text_encoder,
            resolution=resolution,
            seed=seed,
            checkpoint_interval=checkpoint_interval,
            validation_prompt=validation_prompt,
            output_model_name=output_model_name,
            kind=kind,
            rank=rank,
            lora_alpha=lora_alpha,
            lora_layers=list(lora_layers) if lora_layers is not None else None,
            train_text_encoder_lora=train_text_encoder_lora,
        )
        request = diffusion_pb2.CreateTrainingJobRequest(
            spec=spec, client_request_id=uuid.uuid4().hex
        )
        response = self._call(
            self._diffusion.CreateTrainingJob, request, self._timeout("unary", "default")
        )
        return TrainingJobHandle(self, _convert.training_job(response.job))

    def job(self, job_id: str) -> TrainingJob:
        """One of your training jobs."""
        response = self._call(
            self._diffusion.GetTrainingJob,
            diffusion_pb2.GetTrainingJobRequest(job_id=job_id),
            self._timeout("unary", "default"),
        )
        return _convert.training_job(response.job)

    def jobs(self, page_size: int = 50) -> list[TrainingJob]:
        """Your training jobs, newest first (all pages)."""
        jobs: list[TrainingJob] = []
        token = ""
        while True:
            response = self._call(
                self._diffusion.ListTrainingJobs,
                diffusion_pb2.ListTrainingJobsRequest(page_size=page_size, page_token=token),
                self._timeout("unary", "default"),
            )
            jobs.extend(_convert.training_job(j) for j in response.jobs)
            token = response.next_page_token
            if not token:
                return jobs

    def watch(self, job_id: str) -> Iterator[JobEvent]:
        """A job's events from the start; ends when the job does. Re-attach any time."""
        request = diffusion_pb2.WatchTrainingJobRequest(job_id=job_id)
        for response in self._stream(
            self._diffusion.WatchTrainingJob, request, self._timeout("watch", "default")
        ):
            yield _convert.job_event(response)

    def cancel(self, job_id: str) -> TrainingJob:
        """Cancel a queued or running job."""
        response = self._call(
            self._diffusion.CancelTrainingJob,
            diffusion_pb2.CancelTrainingJobRequest(job_id=job_id),
            self._timeout("unary", "default"),
        )
        return _convert.training_job(response.job)

    # models, usage, keys ------------------------------------------------

    def models(self) -> list[Model]:
        """Chat models, then image models (base and your fine-tuned ones)."""
        timeout = self._timeout("unary", "default")
        vision = self._call(self._vision.ListModels, vision_pb2.ListModelsRequest(), timeout)
        images = self._call(self._diffusion.ListModels, diffusion_pb2.ListModelsRequest(), timeout)
        return [_convert.vision_model(m) for m in vision.models] + [
            _convert.diffusion_model(m) for m in images.models
        ]

    def delete_model(self, name: str) -> None:
        """Delete one of your fine-tuned models."""
        self._call(
            self._diffusion.DeleteModel,
            diffusion_pb2.DeleteModelRequest(name=name),
            self._timeout("unary", "default"),
        )

    def usage(self) -> Usage:
        """Your tier, limits, GPU-seconds per window and requests in flight."""
        response = self._call(
            self._usage.GetUsage, usage_pb2.GetUsageRequest(), self._timeout("unary", "default")
        )
        return _convert.usage(response)

    def create_key(self, tenant: str, tier: str, description: str = "") -> CreatedKey:
        """Admin: mint a key (the client's api_key must be the admin token)."""
        response = self._call(
            self._admin.CreateKey,
            admin_pb2.CreateKeyRequest(tenant=tenant, tier=tier, description=description),
            self._timeout("unary", "default"),
        )
        return CreatedKey(_convert.api_key(response.key), response.secret)

    def list_keys(self, tenant: str = "", include_revoked: bool = False) -> list[ApiKey]:
        """Admin: stored keys (never secrets)."""
        response = self._call(
            self._admin.ListKeys,
            admin_pb2.ListKeysRequest(tenant=tenant, include_revoked=include_revoked),
            self._timeout("unary", "default"),
        )
        return [_convert.api_key(k) for k in response.keys]

    def revoke_key(self, key_id: str) -> ApiKey:
        """Admin: revoke a key at once."""
        response = self._call(
            self._admin.RevokeKey,
            admin_pb2.RevokeKeyRequest(key_id=key_id),
            self._timeout("unary", "default"),
        )
        return _convert.api_key(response.key)


class TrainingJobHandle:
    """A training job you started: watch it, wait for it, cancel it."""

    def __init__(self, client: Client, job: TrainingJob) -> None:
        self._client = client
        self.job = job

    @property
    def id(self) -> str:
        """The job id."""
        return self.job.job_id

    def refresh(self) -> TrainingJob:
        """Fetch the job's current state."""
        self.job = self._client.job(self.id)
        return self.job

    def watch(self) -> Iterator[JobEvent]:
        """Events from the start until the job ends."""
        return self._client.watch(self.id)

    def wait(self) -> TrainingJob:
        """Block until the job ends; return its final state."""
        for _ in self.watch():
            pass
        return self.refresh()

    def cancel(self) -> TrainingJob:
        """Cancel the job."""
        self.job = self._client.cancel(self.id)
        return self.job


class AsyncClient(_Common):
    """The asyncio dreamsight client; every method mirrors :class:`Client`."""

    def __init__(
        self,
        host: str | None = None,
        *,
        api_key: str | None = None,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        """Connect to ``host`` (default: $DREAMSIGHT_HOST, else 127.0.0.1:50051)
        with ``api_key`` (default: $DREAMSIGHT_API_KEY)."""
        self._config = _config(host, api_key, tls, root_certificates, timeouts, retry)
        options = list(self._config.options)
        if self._config.credentials is not None:
            channel = grpc.aio.secure_channel(
                self._config.target, self._config.credentials, options
            )
        else:
            channel = grpc.aio.insecure_channel(self._config.target, options)
        self._channel = channel
        self._vision = vision_pb2_grpc.VisionServiceStub(channel)
        self._diffusion = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        self._usage = usage_pb2_grpc.UsageServiceStub(channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close(grace=None)

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        request_id = uuid.uuid4().hex
        attempt = 0
        while True:
            try:
                return await method(
                    request, timeout=timeout, metadata=_metadata(self._config, request_id)
                )
            except grpc.aio.AioRpcError as rpc_error:
                error = from_rpc_error(rpc_error, request_id)
                delay = self._config.retry.delay(error, attempt)
                if delay is None:
                    raise error from None
                await asyncio.sleep(delay)
                attempt += 1

    async def _stream(self, method: Any, request: Any, timeout: float | None) -> AsyncIterator[Any]:
        request_id = getattr(request, "request_id", "") or uuid.uuid4().hex
        attempt = 0
        while True:
            call = method(request, timeout=timeout, metadata=_metadata(self._config, request_id))
            started = False
            try:
                async for item in call:
                    started = True
                    yield item
                return
            except grpc.aio.AioRpcError as rpc_error:
                error = from_rpc_error(rpc_error, request_id)
                delay = None if started else self._config.retry.delay(error, attempt)
                if delay is None:
                    raise error from None
                await asyncio.sleep(delay)
                attempt += 1
            finally:
                call.cancel()

    @overload
    async def chat(
        self,
        model: str = "",
        messages: Sequence[MessageLike] | MessageLike = (),
        *,
        options: Options | None = None,
        tools: Sequence[Tool] = (),
        tool_choice: ToolChoice | None = None,
        stream: Literal[False] = False,
        timeout: float | Literal["default"] | None = "default",
    ) -> ChatResponse: ...

    @overload
    async def chat(
        self,
        model: str = "",
        messages: Sequence[MessageLike] | MessageLike = (),
        *,
        options: Options | None = None,
        tools: Sequence[Tool] = (),
        tool_choice: ToolChoice | None = None,
        stream: Literal[True],
        timeout: float | Literal["default"] | None = "default",
    ) -> AsyncIterator[ChatChunk]: ...

    async def chat(
        self,
        model: str = "",
        messages: Sequence[MessageLike] | MessageLike = (),
        *,
        options: Options | None = None,
        tools: Sequence[Tool] = (),
        tool_choice: ToolChoice | None = None,
        stream: bool = False,
        timeout: float | Literal["default"] | None = "default",
    ) -> ChatResponse | AsyncIterator[ChatChunk]:
        """Chat about images. ``stream=True`` yields chunks; the last has ``done``.

        ``tools`` the model may call: ``tool_choice`` "required" or one Tool
        makes it call (any model); "auto" lets it choose where the service
        runs a tool call parser. The calls are the response's ``tool_calls``.
        """
        request = _convert.chat_request(
            model, messages, options, uuid.uuid4().hex, tools, tool_choice
        )
        responses = self._stream(self._vision.Chat, request, self._timeout("chat", timeout))

        async def chunks() -> AsyncIterator[ChatChunk]:
            async for response in responses:
                yield _convert.chat_chunk(response)

        if stream:
            return chunks()
        finals = [c.response async for c in chunks() if c.done and c.response is not None]
        if not finals:
            raise DreamsightError("the stream ended without a final message")
        return finals[-1]

    @overload
    async def generate_image(
        self,
        prompt: str,
        *,
        model: str = "",
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str = "",
        seed: int | None = None,
        num_images: int | None = None,
        stream: Literal[False] = False,
        timeout: float | Literal["default"] | None = "default",
    ) -> GenerateResult: ...

    @overload
    async def generate_image(
        self,
        prompt: str,
        *,
        model: str = "",
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str = "",
        seed: int | None = None,
        num_images: int | None = None,
        stream: Literal[True],
        timeout: float | Literal["default"] | None = "default",
    ) -> AsyncIterator[GenerateEvent]: ...

    async def generate_image(
        self,
        prompt: str,
        *,
        model: str = "",
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str = "",
        seed: int | None = None,
        num_images: int | None = None,
        stream: bool = False,
        timeout: float | Literal["default"] | None = "default",
    ) -> GenerateResult | AsyncIterator[GenerateEvent]:
        """Generate images; ``stream=True`` yields progress, then the result."""
        request = _convert.generate_request(
            uuid.uuid4().hex,
            model=model,
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            scheduler=scheduler,
            seed=seed,
            num_images=num_images,
        )
        responses = self._stream(
            self._diffusion.Generate, request, self._timeout("generate", timeout)
        )

        async def events() -> AsyncIterator[GenerateEvent]:
            async for response in responses:
                yield _convert.generate_event(response)

        if stream:
            return events()
        results = [e async for e in events() if isinstance(e, GenerateResult)]
        if not results:
            raise DreamsightError("the stream ended without a result")
        return results[-1]

    async def train(
        self,
        instance_images: Sequence[ImageInput],
        instance_prompt: str,
        *,
        base_model: str = "",
        class_prompt: str = "",
        num_class_images: int | None = None,
        prior_loss_weight: float | None = None,
        max_train_steps: int | None = None,
        learning_rate: float | None = None,
        train_text_encoder: bool | None = None,
        resolution: int | None = None,
        seed: int | None = None,
        checkpoint_interval: int | None = None,
        validation_prompt: str = "",
        output_model_name: str = "",
        kind: Literal["lora", "full"] | None = None,
        rank: int | None = None,
        lora_alpha: float | None = None,
        lora_layers: Sequence[str] | None = None,
        train_text_encoder_lora: bool | None = None,
    ) -> AsyncTrainingJobHandle:
        """Start a DreamBooth job; retries never create a second job.

        ``kind`` is "lora" (the service's default: a small adapter served on
        the base model) or "full"; ``rank``, ``lora_alpha``, ``lora_layers``
        and ``train_text_encoder_lora`` apply to LoRA only, and
        ``train_text_encoder`` (the whole encoder) to a full tune only.
        """
        spec = _convert.training_spec(
            instance_images=instance_images,
            base_model=base_model,
            instance_prompt=instance_prompt,
            class_prompt=class_prompt,
            num_class_images=num_class_images,
            prior_loss_weight=prior_loss_weight,
            max_train_steps=max_train_steps,
            learning_rate=learning_rate,
            train_text_encoder=train_text_encoder,
            resolution=resolution,
            seed=seed,
            checkpoint_interval=checkpoint_interval,
            validation_prompt=validation_prompt,
            output_model_name=output_model_name,
            kind=kind,
            rank=rank,
            lora_alpha=lora_alpha,
            lora_layers=list(lora_layers) if lora_layers is not None else None,
            train_text_encoder_lora=train_text_encoder_lora,
        )
        request = diffusion_pb2.CreateTrainingJobRequest(
            spec=spec, client_request_id=uuid.uuid4().hex
        )
        response = await self._call(
            self._diffusion.CreateTrainingJob, request, self._timeout("unary", "default")
        )
        return AsyncTrainingJobHandle(self, _convert.training_job(response.job))

    async def job(self, job_id: str) -> TrainingJob:
        """One of your training jobs."""
        response = await self._call(
            self._diffusion.GetTrainingJob,
            diffusion_pb2.GetTrainingJobRequest(job_id=job_id),
            self._timeout("unary", "default"),
        )
        return _convert.training_job(response.job)

    async def jobs(self, page_size: int = 50) -> list[TrainingJob]:
        """Your training jobs, newest first (all pages)."""
        jobs: list[TrainingJob] = []
        token = ""
        while True:
            response = await self._call(
                self._diffusion.ListTrainingJobs,
                diffusion_pb2.ListTrainingJobsRequest(page_size=page_size, page_token=token),
                self._timeout("unary", "default"),
            )
            jobs.extend(_convert.training_job(j) for j in response.jobs)
            token = response.next_page_token
            if not token:
                return jobs

    async def watch(self, job_id: str) -> AsyncIterator[JobEvent]:
        """A job's events from the start; ends when the job does. Re-attach any time."""
        request = diffusion_pb2.WatchTrainingJobRequest(job_id=job_id)
        async for response in self._stream(
            self._diffusion.WatchTrainingJob, request, self._timeout("watch", "default")
        ):
            yield _convert.job_event(response)

    async def cancel(self, job_id: str) -> TrainingJob:
        """Cancel a queued or running job."""
        response = await self._call(
            self._diffusion.CancelTrainingJob,
            diffusion_pb2.CancelTrainingJobRequest(job_id=job_id),
            self._timeout("unary", "default"),
        )
        return _convert.training_job(response.job)

    async def models(self) -> list[Model]:
        """Chat models, then image models (base and your fine-tuned ones)."""
        timeout = self._timeout("unary", "default")
        vision = await self._call(self._vision.ListModels, vision_pb2.ListModelsRequest(), timeout)
        images = await self._call(
            self._diffusion.ListModels, diffusion_pb2.ListModelsRequest(), timeout
        )
        return [_convert.vision_model(m) for m in vision.models] + [
            _convert.diffusion_model(m) for m in images.models
        ]

    async def delete_model(self, name: str) -> None:
        """Delete one of your fine-tuned models."""
        await self._call(
            self._diffusion.DeleteModel,
            diffusion_pb2.DeleteModelRequest(name=name),
            self._timeout("unary", "default"),
        )

    async def usage(self) -> Usage:
        """Your tier, limits, GPU-seconds per window and requests in flight."""
        response = await self._call(
            self._usage.GetUsage, usage_pb2.GetUsageRequest(), self._timeout("unary", "default")
        )
        return _convert.usage(response)

    async def create_key(self, tenant: str, tier: str, description: str = "") -> CreatedKey:
        """Admin: mint a key (the client's api_key must be the admin token)."""
        response = await self._call(
            self._admin.CreateKey,
            admin_pb2.CreateKeyRequest(tenant=tenant, tier=tier, description=description),
            self._timeout("unary", "default"),
        )
        return CreatedKey(_convert.api_key(response.key), response.secret)

    async def list_keys(self, tenant: str = "", include_revoked: bool = False) -> list[ApiKey]:
        """Admin: stored keys (never secrets)."""
        response = await self._call(
            self._admin.ListKeys,
            admin_pb2.ListKeysRequest(tenant=tenant, include_revoked=include_revoked),
            self._timeout("unary", "default"),
        )
        return [_convert.api_key(k) for k in response.keys]

    async def revoke_key(self, key_id: str) -> ApiKey:
        """Admin: revoke a key at once."""
        response = await self._call(
            self._admin.RevokeKey,
            admin_pb2.RevokeKeyRequest(key_id=key_id),
            self._timeout("unary", "default"),
        )
        return _convert.api_key(response.key)


class AsyncTrainingJobHandle:
    """A training job you started (asyncio)."""

    def __init__(self, client: AsyncClient, job: TrainingJob) -> None:
        self._client = client
        self.job = job

    @property
    def id(self) -> str:
        """The job id."""
        return self.job.job_id

    async def refresh(self) -> TrainingJob:
        """Fetch the job's current state."""
        self.job = await self._client.job(self.id)
        return self.job

    def watch(self) -> AsyncIterator[JobEvent]:
        """Events from the start until the job ends."""
        return self._client.watch(self.id)

    async def wait(self) -> TrainingJob:
        """Wait until the job ends; return its final state."""
        async for _ in self.watch():
            pass
        return await self.refresh()

    async def cancel(self) -> TrainingJob:
        """Cancel the job."""
        self.job = await self._client.cancel(self.id)
        return self.job
