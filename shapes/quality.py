"""Measure the demo models through the public client: questions and drawings.

Used by the quality tests, ``scripts/demo.py`` and ``scripts/quality.py``.
Everything goes through :class:`dreamsight.AsyncClient` (so through the
gateway and the real services); the shapes world supplies the questions and
the judge scores the images.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dreamsight
from PIL import Image

from shapes import scenes
from shapes.judge import Verdict, judge

BASE_PROMPTS: tuple[tuple[str, str, str], ...] = tuple(
    (f"a {colour} {shape}", colour, shape) for colour in scenes.COLOURS for shape in scenes.SHAPES
)
"""(prompt, colour, shape) for every base-world pair."""
SUBJECT_PROMPT = "a sks shape"
CLASS_PROMPT = "a shape"


@dataclass(frozen=True)
class Answered:
    """One question asked through chat and its graded reply."""

    question: scenes.Question
    reply: str
    correct: bool


def png(image: Image.Image) -> bytes:
    """A PIL image as PNG bytes."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


async def ask(
    client: dreamsight.AsyncClient,
    questions: Sequence[scenes.Question],
    model: str = "",
    concurrency: int = 8,
    max_tokens: int = 16,
) -> list[Answered]:
    """Ask every question (greedy), ``concurrency`` at a time, and grade the replies."""
    gate = asyncio.Semaphore(concurrency)

    async def one(q: scenes.Question) -> Answered:
        message = dreamsight.Message("user", q.text, (png(q.image),))
        async with gate:
            reply = await client.chat(
                model, [message], options={"temperature": 0.0, "max_tokens": max_tokens}
            )
        return Answered(q, reply.text, scenes.grade(q.scene, q.kind, reply.text))

    return list(await asyncio.gather(*(one(q) for q in questions)))


def answer_accuracy(answered: Sequence[Answered]) -> dict[str, float]:
    """Share correct per question kind, and over all (``all``)."""
    out: dict[str, float] = {}
    for kind in scenes.QUESTION_KINDS:
        mine = [a.correct for a in answered if a.question.kind == kind]
        if mine:
            out[kind] = sum(mine) / len(mine)
    out["all"] = sum(a.correct for a in answered) / len(answered)
    return out


@dataclass(frozen=True)
class Drawn:
    """One generated image, what it was asked to show, and what the judge saw."""

    prompt: str
    colour: str
    shape: str
    verdict: Verdict
    png: bytes
    seed: int

    @property
    def colour_ok(self) -> bool:
        """The judge saw the asked-for colour."""
        return self.verdict.colour == self.colour

    @property
    def shape_ok(self) -> bool:
        """The judge saw the asked-for shape."""
        return self.verdict.shape == self.shape

    @property
    def both_ok(self) -> bool:
        """Colour and shape are both right."""
        return self.colour_ok and self.shape_ok


async def draw(
    client: dreamsight.AsyncClient,
    prompts: Sequence[tuple[str, str, str]],
    per_prompt: int,
    model: str = "",
    steps: int = 20,
    guidance_scale: float | None = None,
    seed: int = 0,
    concurrency: int = 2,
) -> list[Drawn]:
    """Generate ``per_prompt`` images of each (prompt, colour, shape) and judge them.

    Image i of a prompt uses seed + i (one request per prompt).
    """
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str, colour: str, shape: str) -> list[Drawn]:
        async with gate:
            result = await client.generate_image(
                prompt,
                model=model,
                steps=steps,
                guidance_scale=guidance_scale,
                seed=seed,
                num_images=per_prompt,
            )
        return [
            Drawn(prompt, colour, shape, judge(image.to_pil()), image.png, image.seed)
            for image in result.images
        ]

    batches = await asyncio.gather(*(one(*p) for p in prompts))
    return [d for batch in batches for d in batch]


def draw_accuracy(drawn: Sequence[Drawn]) -> dict[str, float]:
    """Share of images with the right colour, shape, and both."""
    n = len(drawn)
    return {
        "colour": sum(d.colour_ok for d in drawn) / n,
        "shape": sum(d.shape_ok for d in drawn) / n,
        "both": sum(d.both_ok for d in drawn) / n,
    }


def subject_prompts(prompt: str = SUBJECT_PROMPT) -> list[tuple[str, str, str]]:
    """The DreamBooth subject prompt with what it should show."""
    return [(prompt, scenes.SUBJECT_COLOUR, scenes.SUBJECT_SHAPE)]


@dataclass(frozen=True)
class DreamBoothSettings:
    """The DreamBooth job the demo, the tests and scripts/quality.py run: the
    subject from four photos, "a sks shape", with class-prior preservation on
    ("a shape") unless ``num_class_images`` is 0."""

    max_train_steps: int = 150
    learning_rate: float = 2e-4
    num_class_images: int = 8
    train_text_encoder: bool = False
    seed: int = 0

    def train_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``client.train`` (one checkpoint, at the end)."""
        return {**dataclasses.asdict(self), "checkpoint_interval": self.max_train_steps}


DREAMBOOTH = DreamBoothSettings()
