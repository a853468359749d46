"""The diffusion service end to end: real gRPC, real diffusers, the tiny demo SD.

One service serves the whole module: two workers and a queue of 1 (so
queue-full is easy to reach), one pipeline in memory (so eviction is too).
Generations use few steps at 64x64 to keep the module fast on two cores.
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from dreamsight.common.v1 import common_pb2
from dreamsight.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from PIL import Image

from diffusion_service.config import (
    BaseModel,
    DiffusionSettings,
    Limits,
    TrainingSettings,
    parse_settings,
)
from diffusion_service.engine import DiffusersEngine
from diffusion_service.server import DiffusionService, start_service
from dreamsight_server.errors import FailedPrecondition
from dreamsight_server.lifecycle import ServerOptions
from tests.metrics_scrape import metrics_samples
from tests.service_process import ServiceProcess

pytestmark = pytest.mark.slow

SERVICE = "dreamsight.diffusion.v1.DiffusionService"
LIMITS = Limits(
    min_size=64,
    max_size=128,
    max_steps=1000,
    default_steps=2,
    max_guidance_scale=30.0,
    max_images=3,
)


@dataclass
class DiffusionHandle:
    """What tests get: the running service, a channel to it, health history."""

    service: DiffusionService
    channel: grpc.aio.Channel
    health_before: int
    health_after: int
    sd_dir: Path

    @property
    def engine(self) -> DiffusersEngine:
        return self.service.engine

    @property
    def stub(self) -> diffusion_pb2_grpc.DiffusionServiceAsyncStub:
        return diffusion_pb2_grpc.DiffusionServiceStub(self.channel)


@pytest.fixture(scope="module")
async def diffusion(
    sd_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[DiffusionHandle]:
    """One real diffusion service on the demo pipeline for this module."""
    training_dir = tmp_path_factory.mktemp("training")
    settings = DiffusionSettings(
        models=(BaseModel("sd-demo", str(sd_dir)),),
        max_loaded_models=1,
        concurrency=2,
        max_queue=1,
        torch_threads=1,
        device="cpu",
        limits=LIMITS,
        training=TrainingSettings(store=training_dir / "jobs.sqlite3", artifacts_dir=training_dir),
        server=ServerOptions(grace_s=2.0),
    )
    service = await start_service(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    health = health_pb2_grpc.HealthStub(channel)
    before = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
    await service.load()
    after = (await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))).status
    yield DiffusionHandle(service, channel, before, after, sd_dir)
    await channel.close(None)
    await service.stop(grace_s=1.0)


def tenant(name: str) -> tuple[tuple[str, str], ...]:
    return (("x-dreamsight-tenant", name),)


@dataclass
class Outcome:
    progress: list[tuple[int, int]]
    result: diffusion_pb2.GenerateResult

    @property
    def pngs(self) -> list[bytes]:
        return [i.image.data for i in self.result.images]


async def generate(d: DiffusionHandle, who: str = "local", **fields: Any) -> Outcome:
    fields.setdefault("prompt", "a red dog on the beach")
    fields.setdefault("seed", 7)
    progress: list[tuple[int, int]] = []
    result = None
    async for response in d.stub.Generate(
        diffusion_pb2.GenerateRequest(**fields), metadata=tenant(who)
    ):
        assert result is None, "nothing may follow the result"
        if response.WhichOneof("event") == "progress":
            progress.append((response.progress.step, response.progress.total_steps))
        else:
            result = response.result
    assert result is not None
    return Outcome(progress, result)


async def wait_idle(engine: DiffusersEngine) -> None:
    for _ in range(200):
        if engine.running == 0 and engine.queue_depth == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"still busy: {engine.running} running, {engine.queue_depth} queued")


async def test_health_went_from_not_serving_to_serving(diffusion: DiffusionHandle) -> None:
    assert diffusion.health_before == health_pb2.HealthCheckResponse.NOT_SERVING
    assert diffusion.health_after == health_pb2.HealthCheckResponse.SERVING
    assert diffusion.engine.loaded_models() == ["sd-demo"]


async def test_same_seed_gives_identical_pngs_with_a_progress_event_per_step(
    diffusion: DiffusionHandle,
) -> None:
    first = await generate(diffusion, steps=3, num_images=2)
    again = await generate(diffusion, steps=3, num_images=2)
    assert first.progress == [(1, 3), (2, 3), (3, 3)]
    assert [i.seed for i in first.result.images] == [7, 8]
    assert first.pngs == again.pngs
    assert first.pngs[0] != first.pngs[1], "image i uses seed + i"
    for image in first.result.images:
        assert image.image.mime_type == "image/png"
        with Image.open(io.BytesIO(image.image.data)) as png:
            assert png.format == "PNG" and png.size == (64, 64)
    usage = first.result.usage
    total = usage.total_time.ToTimedelta().total_seconds()
    assert 0 < usage.gpu_seconds <= total
    assert first.result.model == "sd-demo"


async def test_different_seeds_give_different_images(diffusion: DiffusionHandle) -> None:
    seven = await generate(diffusion, seed=7)
    nine = await generate(diffusion, seed=9)
    assert seven.pngs != nine.pngs


async def test_unset_seed_is_random_and_returned(diffusion: DiffusionHandle) -> None:
    picked = await generate(diffusion, seed=None)
    seed = picked.result.images[0].seed
    other = await generate(diffusion, seed=None)
    assert other.result.images[0].seed != seed
    replay = await generate(diffusion, seed=seed)
    assert replay.pngs == picked.pngs


async def test_guidance_and_negative_prompt(diffusion: DiffusionHandle) -> None:
    plain = await generate(diffusion, guidance_scale=1.0)
    guided = await generate(diffusion, guidance_scale=7.5)
    assert plain.pngs != guided.pngs
    # Guidance <= 1 skips the unconditional half, so the negative prompt is unused...
    unguided_negative = await generate(
        diffusion, guidance_scale=1.0, negative_prompt="blue snow at night"
    )
    assert unguided_negative.pngs == plain.pngs
    # ...while with guidance it steers the image.
    guided_negative = await generate(
        diffusion, guidance_scale=7.5, negative_prompt="blue snow at night"
    )
    assert guided_negative.pngs != guided.pngs


async def test_each_scheduler_runs_with_one_event_per_step(diffusion: DiffusionHandle) -> None:
    images: dict[str, bytes] = {}
    for name in ("", "ddim", "euler", "euler_ancestral", "dpmpp_2m", "pndm"):
        outcome = await generate(diffusion, scheduler=name, steps=2, guidance_scale=1.0)
        assert outcome.progress == [(1, 2), (2, 2)], name
        images[name] = outcome.pngs[0]
    assert images[""] == images["pndm"], "the demo model's own scheduler is PNDM"
    assert len({images[n] for n in images if n}) == 5


async def test_explicit_size(diffusion: DiffusionHandle) -> None:
    outcome = await generate(diffusion, width=96, height=64, steps=1)
    with Image.open(io.BytesIO(outcome.pngs[0])) as png:
        assert png.size == (96, 64)


async def test_prompt_at_the_token_limit_is_accepted(diffusion: DiffusionHandle) -> None:
    # "a" is one token in the demo vocabulary: 75 words + start + end = 77.
    outcome = await generate(diffusion, prompt="a " * 75, steps=1)
    assert len(outcome.pngs) == 1


async def test_cancel_stops_within_one_step_and_frees_the_worker(
    diffusion: DiffusionHandle,
) -> None:
    engine = diffusion.engine
    request = diffusion_pb2.GenerateRequest(prompt="a long one", steps=200, seed=1)
    call = diffusion.stub.Generate(request)
    async for response in call:
        if response.progress.step == 2:
            break
    assert engine.running == 1, "still generating when cancelled"
    call.cancel()
    await wait_idle(engine)
    record = engine.recent[-1]
    assert record.outcome == "cancelled"
    assert record.evaluations_at_cancel is not None
    assert record.evaluations - record.evaluations_at_cancel <= 1
    assert record.steps_done < 200
    assert diffusion.engine.meter.running == 0
    outcome = await generate(diffusion, steps=1)
    assert len(outcome.pngs) == 1


async def test_deadline_stops_the_generation(diffusion: DiffusionHandle) -> None:
    request = diffusion_pb2.GenerateRequest(prompt="a long one", steps=500, seed=2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in diffusion.stub.Generate(request, timeout=1.0):
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_idle(diffusion.engine)
    record = diffusion.engine.recent[-1]
    assert record.outcome == "cancelled" and record.steps_done < 500
    assert record.evaluations_at_cancel is not None
    assert record.evaluations - record.evaluations_at_cancel <= 1


async def test_concurrent_generations_match_sequential_ones(diffusion: DiffusionHandle) -> None:
    """Two workers share one pipeline's weights but never its scheduler."""
    kinds: list[dict[str, Any]] = [
        {"scheduler": "euler_ancestral", "seed": 11, "steps": 3},
        {"scheduler": "dpmpp_2m", "seed": 12, "steps": 2, "num_images": 2},
    ]
    alone = [await generate(diffusion, **kind) for kind in kinds]
    together = await asyncio.gather(*(generate(diffusion, **kind) for kind in kinds))
    assert [o.pngs for o in together] == [o.pngs for o in alone]
    for outcome in together:
        usage = outcome.result.usage
        assert 0 < usage.gpu_seconds <= usage.total_time.ToTimedelta().total_seconds()


async def test_full_queue_is_resource_exhausted(diffusion: DiffusionHandle) -> None:
    engine = diffusion.engine
    long = diffusion_pb2.GenerateRequest(prompt="a long one", steps=500, seed=3)
    running = [diffusion.stub.Generate(long) for _ in range(2)]
    for call in running:
        async for response in call:
            if response.WhichOneof("event") == "progress":
                break
    queued = diffusion.stub.Generate(long)
    waiter = asyncio.ensure_future(queued.initial_metadata())
    for _ in range(100):
        if engine.queue_depth == 1:
            break
        await asyncio.sleep(0.02)
    assert (engine.running, engine.queue_depth) == (2, 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(diffusion, steps=1)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(retry) for detail in status.details)
    assert retry.retry_delay.ToTimedelta().total_seconds() > 0
    queued.cancel()
    for call in running:
        call.cancel()
    waiter.cancel()
    await wait_idle(engine)
    assert engine.meter.running == 0


BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("blank prompt", {"prompt": "   "}, "prompt"),
    ("prompt over 77 tokens", {"prompt": "a " * 76}, "prompt"),
    ("negative prompt over 77 tokens", {"negative_prompt": "a " * 76}, "negative_prompt"),
    ("width not a multiple of 8", {"width": 60}, "width"),
    ("height too small", {"height": 32}, "height"),
    ("width too large", {"width": 1024}, "width"),
    ("zero steps", {"steps": 0}, "steps"),
    ("too many steps", {"steps": 1001}, "steps"),
    ("more steps than the model allows", {"steps": 501}, "steps"),
    ("guidance NaN", {"guidance_scale": math.nan}, "guidance_scale"),
    ("guidance infinite", {"guidance_scale": math.inf}, "guidance_scale"),
    ("guidance negative", {"guidance_scale": -1.0}, "guidance_scale"),
    ("guidance too large", {"guidance_scale": 31.0}, "guidance_scale"),
    ("zero images", {"num_images": 0}, "num_images"),
    ("too many images", {"num_images": 4}, "num_images"),
    ("unknown scheduler", {"scheduler": "heun"}, "scheduler"),
    ("negative seed", {"seed": -1}, "seed"),
    ("seed overflows with the batch", {"seed": 2**63 - 1, "num_images": 2}, "seed"),
]


@pytest.mark.parametrize(
    ("name", "fields", "field"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    diffusion: DiffusionHandle, name: str, fields: dict[str, Any], field: str
) -> None:
    engine = diffusion.engine
    busy_before, finished_before = engine.meter.busy_seconds, len(engine.recent)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(diffusion, **fields)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert (error.details() or "").startswith(f"{field}: "), error.details()
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == field
    assert (engine.queue_depth, engine.running, engine.meter.running) == (0, 0, 0)
    assert engine.meter.busy_seconds == busy_before
    assert len(engine.recent) == finished_before


async def test_unknown_model_is_not_found(diffusion: DiffusionHandle) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(diffusion, model="nope")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_unknown_training_job_is_not_found(diffusion: DiffusionHandle) -> None:
    """The training RPCs are served (tests/test_dreambooth.py covers them)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await diffusion.stub.GetTrainingJob(diffusion_pb2.GetTrainingJobRequest(job_id="x"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_models_reports_the_demo_base_model(diffusion: DiffusionHandle) -> None:
    listed = await diffusion.stub.ListModels(diffusion_pb2.ListModelsRequest())
    (model,) = listed.models
    assert model.name == "sd-demo" and model.demo
    assert model.origin == common_pb2.MODEL_ORIGIN_DEMO
    assert (model.default_width, model.default_height) == (64, 64)
    assert model.source == "", "a local directory: no server path is shown"


async def test_fine_tuned_models_belong_to_their_tenant(diffusion: DiffusionHandle) -> None:
    await asyncio.to_thread(
        diffusion.engine.register_fine_tuned, "a-dog", diffusion.sd_dir, "tenant-a", "sd-demo", "j1"
    )
    stub = diffusion.stub
    a_models = await stub.ListModels(diffusion_pb2.ListModelsRequest(), metadata=tenant("tenant-a"))
    assert [m.name for m in a_models.models] == ["sd-demo", "a-dog"]
    mine = a_models.models[1]
    assert mine.origin == common_pb2.MODEL_ORIGIN_FINE_TUNED
    assert (mine.base_model, mine.job_id, mine.source) == ("sd-demo", "j1", "")
    b_models = await stub.ListModels(diffusion_pb2.ListModelsRequest(), metadata=tenant("tenant-b"))
    assert [m.name for m in b_models.models] == ["sd-demo"]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(diffusion, "tenant-b", model="a-dog", steps=1)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    for who, name, code in [
        ("tenant-b", "a-dog", grpc.StatusCode.NOT_FOUND),
        ("tenant-a", "sd-demo", grpc.StatusCode.PERMISSION_DENIED),
        ("tenant-a", "nope", grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.DeleteModel(
                diffusion_pb2.DeleteModelRequest(name=name), metadata=tenant(who)
            )
        assert caught.value.code() == code, (who, name)

    outcome = await generate(diffusion, "tenant-a", model="a-dog", steps=1)
    assert outcome.result.model == "a-dog"
    await stub.DeleteModel(
        diffusion_pb2.DeleteModelRequest(name="a-dog"), metadata=tenant("tenant-a")
    )
    a_models = await stub.ListModels(diffusion_pb2.ListModelsRequest(), metadata=tenant("tenant-a"))
    assert [m.name for m in a_models.models] == ["sd-demo"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(diffusion, "tenant-a", model="a-dog", steps=1)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def a_different_pipeline(sd_dir: Path, dest: Path) -> Path:
    """A copy of the demo pipeline whose VAE decodes differently (same configs)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(sd_dir, dest)
    (weights,) = (dest / "vae").glob("*.safetensors")
    tensors = load_file(weights)
    tensors["decoder.conv_out.bias"] += 0.5
    save_file(tensors, weights)
    return dest


async def test_two_tenants_each_own_a_model_of_one_name_and_generate_with_their_own(
    diffusion: DiffusionHandle, tmp_path: Path
) -> None:
    """Names are per tenant: tenant-b can take "my-dog" although tenant-a has
    one, and each tenant's "my-dog" is its own pipeline (one pipeline fits in
    this service's memory, so the second load evicts the first)."""
    engine, stub = diffusion.engine, diffusion.stub
    other = await asyncio.to_thread(a_different_pipeline, diffusion.sd_dir, tmp_path / "b-dog")
    await asyncio.to_thread(
        engine.register_fine_tuned, "my-dog", diffusion.sd_dir, "tenant-a", "sd-demo", "ja"
    )
    await asyncio.to_thread(
        engine.register_fine_tuned, "my-dog", other, "tenant-b", "sd-demo", "jb"
    )
    with pytest.raises(FailedPrecondition, match="already exists"):
        engine.register_fine_tuned("my-dog", other, "tenant-b", "sd-demo", "jb2")
    with pytest.raises(FailedPrecondition, match="already exists"):
        engine.register_fine_tuned("sd-demo", other, "tenant-b", "sd-demo", "jb3")

    for who, job_id in (("tenant-a", "ja"), ("tenant-b", "jb")):
        listed = await stub.ListModels(diffusion_pb2.ListModelsRequest(), metadata=tenant(who))
        assert [(m.name, m.job_id) for m in listed.models] == [("sd-demo", ""), ("my-dog", job_id)]
    base = await generate(diffusion, "tenant-a", model="sd-demo", steps=1)
    a_dog = await generate(diffusion, "tenant-a", model="my-dog", steps=1)
    b_dog = await generate(diffusion, "tenant-b", model="my-dog", steps=1)
    again = await generate(diffusion, "tenant-a", model="my-dog", steps=1)
    assert a_dog.result.model == b_dog.result.model == "my-dog"
    assert a_dog.pngs == base.pngs == again.pngs, "tenant-a's my-dog is the demo pipeline"
    assert b_dog.pngs != a_dog.pngs, "tenant-b's my-dog is its own pipeline"

    await stub.DeleteModel(
        diffusion_pb2.DeleteModelRequest(name="my-dog"), metadata=tenant("tenant-b")
    )
    assert (await generate(diffusion, "tenant-a", model="my-dog", steps=1)).pngs == a_dog.pngs
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(diffusion, "tenant-b", model="my-dog", steps=1)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    await stub.DeleteModel(
        diffusion_pb2.DeleteModelRequest(name="my-dog"), metadata=tenant("tenant-a")
    )


async def test_another_tenants_model_answers_exactly_as_a_missing_one(
    diffusion: DiffusionHandle,
) -> None:
    """Generate and DeleteModel on tenant-a's model, called by tenant-b, give
    the status, message and details a never-registered name gives: nothing
    tells that the name exists."""
    await asyncio.to_thread(
        diffusion.engine.register_fine_tuned,
        "secret-dog", diffusion.sd_dir, "tenant-a", "sd-demo", "js",
    )  # fmt: skip
    stub = diffusion.stub

    async def failure(call: str, name: str) -> tuple[Any, ...]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if call == "generate":
                await generate(diffusion, "tenant-b", model=name, steps=1)
            else:
                request = diffusion_pb2.DeleteModelRequest(name=name)
                await stub.DeleteModel(request, metadata=tenant("tenant-b"))
        error = caught.value
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        shown = status.SerializeToString().replace(name.encode(), b"NAME") if status else None
        return error.code(), (error.details() or "").replace(name, "NAME"), shown

    try:
        for call in ("generate", "delete"):
            theirs = await failure(call, "secret-dog")
            missing = await failure(call, "absent-dog")  # same length: same bytes
            assert theirs == missing, call
            assert theirs[:2] == (grpc.StatusCode.NOT_FOUND, "model 'NAME' not found"), call
        listed = await stub.ListModels(
            diffusion_pb2.ListModelsRequest(), metadata=tenant("tenant-b")
        )
        assert [m.name for m in listed.models] == ["sd-demo"]
        # Still tenant-a's, untouched by the attempts.
        outcome = await generate(diffusion, "tenant-a", model="secret-dog", steps=1)
        assert outcome.result.model == "secret-dog"
    finally:
        await stub.DeleteModel(
            diffusion_pb2.DeleteModelRequest(name="secret-dog"), metadata=tenant("tenant-a")
        )


async def test_lru_eviction_reloads_the_model(diffusion: DiffusionHandle) -> None:
    engine = diffusion.engine
    port = diffusion.service.server.metrics_port
    assert port
    await asyncio.to_thread(
        engine.register_fine_tuned, "lru-dog", diffusion.sd_dir, "tenant-l", "sd-demo", "j2"
    )
    await generate(diffusion, "tenant-l", model="sd-demo", steps=1)
    assert engine.loaded_models() == ["sd-demo"]
    loads = "dreamsight_diffusion_model_loads_total"
    before = (await asyncio.to_thread(metrics_samples, port))[loads]
    await generate(diffusion, "tenant-l", model="lru-dog", steps=1)
    assert engine.loaded_models() == ["lru-dog"], "one pipeline fits; sd-demo was evicted"
    await generate(diffusion, "tenant-l", model="sd-demo", steps=1)
    assert engine.loaded_models() == ["sd-demo"]
    after = await asyncio.to_thread(metrics_samples, port)
    assert after[loads] == before + 2, "lru-dog loaded, then sd-demo reloaded"
    assert after["dreamsight_diffusion_models_loaded"] == 1


async def test_metrics_are_exposed_and_move(diffusion: DiffusionHandle) -> None:
    port = diffusion.service.server.metrics_port
    assert port
    before = await asyncio.to_thread(metrics_samples, port)
    await generate(diffusion, steps=2, num_images=2, scheduler="ddim")
    with pytest.raises(grpc.aio.AioRpcError):
        await generate(diffusion, steps=0)
    after = await asyncio.to_thread(metrics_samples, port)
    ok = 'dreamsight_diffusion_requests_total{method="Generate",outcome="ok"}'
    bad = 'dreamsight_diffusion_requests_total{method="Generate",outcome="invalid_argument"}'
    assert after[ok] == before.get(ok, 0) + 1
    assert after[bad] == before.get(bad, 0) + 1
    images = "dreamsight_diffusion_images_generated_total"
    assert after[images] == before[images] + 2
    steps = "dreamsight_diffusion_step_seconds_count"
    assert after[steps] == before[steps] + 2
    gpu = "dreamsight_diffusion_gpu_seconds_total"
    assert after[gpu] > before[gpu]
    assert after["dreamsight_diffusion_queue_depth"] == 0
    assert after["dreamsight_diffusion_running_requests"] == 0


def test_settings_come_from_flags_and_environment(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    env = {
        "DREAMSIGHT_DIFFUSION_MODELS": "x=/models/x,/models/y-demo",
        "DREAMSIGHT_DIFFUSION_CONCURRENCY": "2",
        "DREAMSIGHT_DIFFUSION_GATEWAY_SECRET": "from-env",
    }
    settings = parse_settings(["--max-steps", "40", "--max-queue", "3"], env)
    assert [(m.name, m.source) for m in settings.models] == [
        ("x", "/models/x"),
        ("y-demo", "/models/y-demo"),
    ]
    assert settings.default_model.name == "x"
    assert (settings.concurrency, settings.max_queue, settings.limits.max_steps) == (2, 3, 40)
    assert settings.gateway_secret == "from-env"
    assert settings.server.port == 50053
    flagged = parse_settings(["--model", "z=/z", "--gateway-secret-file", str(secret)], env)
    assert [m.name for m in flagged.models] == ["z"]
    assert flagged.gateway_secret == "s3cret"


async def test_gateway_secret_and_loading_state(sd_dir: Path) -> None:
    """Before its model loads the service answers UNAVAILABLE (and NOT_SERVING);
    with a gateway secret, calls without the gateway's token are refused."""
    settings = DiffusionSettings(
        models=(BaseModel("sd-demo", str(sd_dir)),),
        gateway_secret="s3cret",
        server=ServerOptions(metrics_port=None),
    )
    service = await start_service(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    stub: diffusion_pb2_grpc.DiffusionServiceAsyncStub = diffusion_pb2_grpc.DiffusionServiceStub(
        channel
    )
    request = diffusion_pb2.GenerateRequest(prompt="a dog")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        status = (await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        for metadata, code in [
            ((), grpc.StatusCode.UNAUTHENTICATED),
            (
                (("x-dreamsight-gateway-token", "wrong"), ("x-dreamsight-tenant", "t")),
                grpc.StatusCode.UNAUTHENTICATED,
            ),
            (
                (("x-dreamsight-gateway-token", "s3cret"), ("x-dreamsight-tenant", "t")),
                grpc.StatusCode.UNAVAILABLE,
            ),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.Generate(request, metadata=metadata):
                    pass
            assert caught.value.code() == code, metadata
    finally:
        await channel.close(None)
        await service.stop(grace_s=0.5)


def test_process_serves_and_drains_on_sigterm(sd_dir: Path) -> None:
    service = ServiceProcess(
        "diffusion_service",
        [
            f"--model=sd-demo={sd_dir}",
            "--port=0",
            "--metrics-port=0",
            "--grace-seconds=20",
            "--device=cpu",
            "--trust-any-caller",  # this test calls the backend directly
        ],
    )
    try:
        port = service.wait_for_port()
        service.wait_serving(port, timeout=120)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        request = diffusion_pb2.GenerateRequest(prompt="a dog", steps=12, guidance_scale=1.0)
        stream = stub.Generate(request)
        first = next(iter(stream))
        assert first.WhichOneof("event") == "progress"
        service.proc.send_signal(signal.SIGTERM)
        rest = list(stream)  # the in-flight stream finishes within the grace period
        assert rest[-1].WhichOneof("event") == "result"
        assert len(rest[-1].result.images) == 1
        assert service.wait() == 0, service.log()
        channel.close()
    finally:
        service.kill()


def test_a_model_that_fails_to_load_exits_non_zero_with_the_cause(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    service = ServiceProcess(
        "diffusion_service",
        [
            f"--model=broken={empty}",
            "--port=0",
            "--metrics-port=0",
            "--device=cpu",
            "--trust-any-caller",
        ],
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    try:
        service.wait_for_port()
        assert service.wait(timeout=120) == 1, service.log()
        assert "diffusion failed to load; exiting" in service.log(200)
        assert "broken" in service.log(200) or str(empty) in service.log(200)
    finally:
        service.kill()
