"""The trained demo models answer and draw correctly, end to end.

Real services on the committed models (vLLM on llava-shapes, diffusers on
sd-shapes) behind the real gateway, called with the public async client;
the shapes world asks the questions and the judge scores the images. Tests
run in file order on one module-wide stack. Bounds sit below the figures in
docs/quality.md by a margin that keeps them stable for these sample sizes.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import dreamsight
import pytest

from diffusion_service.config import BaseModel, DiffusionSettings, TrainingSettings
from diffusion_service.server import start_service as start_diffusion
from dreamsight_demo.shapes import quality, scenes
from dreamsight_demo.weights import COMMITTED_ROOT
from dreamsight_server.images import ImageLimits
from dreamsight_server.lifecycle import ServerOptions
from gateway.config import GatewaySettings
from gateway.server import start_gateway
from tests.gateway_helpers import ADMIN_TOKEN, Stack, new_key
from vision_service.config import VisionSettings
from vision_service.server import start_service as start_vision

pytestmark = pytest.mark.slow

VISION_QUESTIONS = 120
"""40 of each kind: a 95% bound then fails a model that is truly 98% about once in 50 runs."""
DRAW_STEPS = 20


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp("quality")
    vision = await start_vision(
        VisionSettings(
            model=str(COMMITTED_ROOT / "llava-shapes"),
            served_model_name="llava-shapes",
            max_model_len=1024,
            max_num_seqs=16,
            enforce_eager=True,
            dtype="float32",
            images=ImageLimits(max_bytes=200_000, max_pixels=1024 * 1024),
            server=ServerOptions(metrics_port=None, grace_s=1.0),
        )
    )
    diffusion = await start_diffusion(
        DiffusionSettings(
            models=(BaseModel("sd-shapes", str(COMMITTED_ROOT / "sd-shapes")),),
            device="cpu",
            training=TrainingSettings(
                store=tmp / "jobs.sqlite3", artifacts_dir=tmp / "training", stop_grace_s=5.0
            ),
            server=ServerOptions(metrics_port=None, grace_s=1.0),
        )
    )
    await vision.load()
    await diffusion.load()
    gateway = await start_gateway(
        GatewaySettings(
            vision_target=f"127.0.0.1:{vision.port}",
            diffusion_target=f"127.0.0.1:{diffusion.port}",
            database=str(tmp / "gw.sqlite3"),
            admin_token=ADMIN_TOKEN,
            http_port=0,
            server=ServerOptions(metrics_port=None, grace_s=1.0),
        )
    )
    key = await new_key(gateway, "quality", "max")
    yield Stack(gateway, f"127.0.0.1:{gateway.port}", key)
    await gateway.stop(0)
    await diffusion.stop(0)
    await vision.stop(grace_s=0)


async def test_vision_answers_held_out_questions(stack: Stack) -> None:
    questions = scenes.questions(seed=2024, count=VISION_QUESTIONS)
    async with dreamsight.AsyncClient(stack.target, api_key=stack.key) as client:
        answered = await quality.ask(client, questions, model="llava-shapes")
    accuracy = quality.answer_accuracy(answered)
    wrong = [(a.question.text, a.question.answer, a.reply) for a in answered if not a.correct]
    assert accuracy["all"] >= 0.95, (accuracy, wrong[:10])
    assert min(accuracy[k] for k in scenes.QUESTION_KINDS) >= 0.9, accuracy


async def test_vision_answer_depends_on_the_image_not_the_wording(stack: Stack) -> None:
    red_circle = scenes.Scene("circle", "red", scenes.COLOURS["red"], 0.5, 0.5, 0.6)
    blue_square = scenes.Scene("square", "blue", scenes.COLOURS["blue"], 0.4, 0.6, 0.5)
    async with dreamsight.AsyncClient(stack.target, api_key=stack.key) as client:
        replies = []
        for scene in (red_circle, blue_square):
            message = dreamsight.Message(
                "user", "Describe the image.", (quality.png(scenes.render(scene, 96)),)
            )
            chunks = [
                c.text
                async for c in await client.chat(
                    "", [message], options={"temperature": 0.0}, stream=True
                )
            ]
            replies.append("".join(chunks))
    assert scenes.grade(red_circle, "describe", replies[0]), replies
    assert scenes.grade(blue_square, "describe", replies[1]), replies


async def _completion_tokens(stack: Stack, path: str, body: dict[str, Any]) -> int:
    url = f"http://127.0.0.1:{stack.gateway.http_port}{path}"
    headers = {"Authorization": f"Bearer {stack.key}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as r,
    ):
        reply = await r.json()
        assert r.status == 200, reply
    return int(reply["usage"]["completion_tokens"] if "usage" in reply else reply["eval_count"])


async def test_ignore_eos_and_min_tokens_are_honoured_on_both_http_apis(stack: Stack) -> None:
    """The trained model ends its turn after a few words; vLLM's ignore_eos runs on
    to max_tokens (benchmarks count on it) and min_tokens holds the end back."""
    image = quality.png(
        scenes.render(scenes.Scene("circle", "red", scenes.COLOURS["red"], 0.5, 0.5, 0.6), 96)
    )
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    content = [
        {"type": "text", "text": "Describe the image."},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    openai_body: dict[str, Any] = {
        "model": "llava-shapes",
        "temperature": 0,
        "max_tokens": 40,
        "messages": [{"role": "user", "content": content}],
    }
    options: dict[str, Any] = {"temperature": 0, "num_predict": 40}
    ollama_body: dict[str, Any] = {
        "model": "llava-shapes",
        "stream": False,
        "messages": [
            {"role": "user", "content": "Describe the image.", "images": [url.split(",", 1)[1]]}
        ],
        "options": options,
    }
    ends_at = await _completion_tokens(stack, "/v1/chat/completions", openai_body)
    assert ends_at < 30, "the trained model ends its turn on its own"
    assert await _completion_tokens(stack, "/api/chat", ollama_body) == ends_at
    assert (
        await _completion_tokens(stack, "/v1/chat/completions", {**openai_body, "ignore_eos": True})
        == 40
    )
    held = await _completion_tokens(
        stack, "/v1/chat/completions", {**openai_body, "min_tokens": ends_at + 4}
    )
    assert held >= ends_at + 4
    forced = {**ollama_body, "options": {**options, "ignore_eos": True}}
    assert await _completion_tokens(stack, "/api/chat", forced) == 40
    held_body = {**ollama_body, "options": {**options, "min_tokens": ends_at + 4}}
    assert await _completion_tokens(stack, "/api/chat", held_body) >= ends_at + 4


async def test_diffusion_draws_the_prompted_colour_and_shape(stack: Stack) -> None:
    async with dreamsight.AsyncClient(stack.target, api_key=stack.key) as client:
        drawn = await quality.draw(
            client, quality.BASE_PROMPTS, per_prompt=4, steps=DRAW_STEPS, seed=100
        )
    accuracy = quality.draw_accuracy(drawn)
    assert len(drawn) == 48
    assert accuracy["colour"] >= 0.95 and accuracy["shape"] >= 0.85, accuracy


TUNES = {"lora": quality.DREAMBOOTH_LORA, "full": quality.DREAMBOOTH}
"""The demo's job (a LoRA tune) and the full fine-tune measured beside it in docs/quality.md."""
FIDELITY = {"lora": 0.6, "full": 0.7}
"""Subject fidelity bounds on 12 images, a margin below docs/quality.md's figures."""
KEPT = {"lora": 0.6, "full": 0.75}
"""Base prompts through the tune, both right, on 24 images: a margin below the same."""


@pytest.mark.parametrize("kind", TUNES)
async def test_dreambooth_teaches_a_new_subject_and_keeps_the_classes(
    stack: Stack, kind: str
) -> None:
    """Four photos of a striped purple star as "a sks shape" (class "a shape").

    Both kinds of tune (dreamsight_demo.shapes.quality: the demo's LoRA job and the full
    fine-tune, each one to two minutes here); the tuned model must draw the subject and
    still draw the base prompts, and the base model's own images stay byte-identical,
    also after an adapter was applied on its loaded pipeline.
    """
    settings = TUNES[kind]
    photos = [quality.png(p) for p in scenes.subject_images(seed=0, count=4)]
    subject = quality.subject_prompts()
    async with dreamsight.AsyncClient(stack.target, api_key=stack.key) as client:
        before = await quality.draw(client, subject, per_prompt=8, steps=DRAW_STEPS, seed=300)
        base = await quality.draw(
            client, quality.BASE_PROMPTS, per_prompt=1, steps=DRAW_STEPS, seed=100
        )
        job = await client.train(
            photos,
            quality.SUBJECT_PROMPT,
            class_prompt=quality.CLASS_PROMPT,
            output_model_name=f"sks-star-{kind}",
            **settings.train_kwargs(),
        )
        final = await job.wait()
        assert final.state == "succeeded", final.reason
        (tuned,) = [m for m in await client.models() if m.name == final.model]
        assert tuned.tune == kind, tuned
        after = await quality.draw(
            client, subject, per_prompt=12, model=final.model, steps=DRAW_STEPS, seed=300
        )
        kept = await quality.draw(
            client, quality.BASE_PROMPTS, per_prompt=2, model=final.model, steps=DRAW_STEPS,
            seed=100,
        )  # fmt: skip
        again = await quality.draw(client, subject, per_prompt=8, steps=DRAW_STEPS, seed=300)
        base_again = await quality.draw(
            client, quality.BASE_PROMPTS, per_prompt=1, steps=DRAW_STEPS, seed=100
        )
    fidelity_before = quality.draw_accuracy(before)["both"]
    fidelity_after = quality.draw_accuracy(after)["both"]
    classes = quality.draw_accuracy(kept)
    assert fidelity_before <= 0.25, "the base model never saw the subject"
    assert fidelity_after >= FIDELITY[kind], (fidelity_before, fidelity_after)
    assert classes["both"] >= KEPT[kind], classes
    # The base model is untouched: the job registered a new model beside it, and a LoRA
    # applied on the loaded base pipeline leaves nothing behind on it.
    assert [d.png for d in again] == [d.png for d in before]
    assert [d.png for d in base_again] == [d.png for d in base]
