"""Measure the demo models through the public client: questions and drawings.

Used by the quality tests, ``-m dreamsight_demo.demo`` and ``-m dreamsight_demo.measure``.
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
from typing import Any, Literal

import dreamsight
import numpy as np
from PIL import Image

from dreamsight_demo.shapes import scenes
from dreamsight_demo.shapes.judge import Verdict, judge

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


MAX_IMAGES_PER_REQUEST = 4
"""The diffusion service's default limit on images per request."""


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

    Image i of a prompt uses seed + i (requests of up to four images).
    """
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str, colour: str, shape: str, first: int, count: int) -> list[Drawn]:
        async with gate:
            result = await client.generate_image(
                prompt,
                model=model,
                steps=steps,
                guidance_scale=guidance_scale,
                seed=seed + first,
                num_images=count,
            )
        return [
            Drawn(prompt, colour, shape, judge(image.to_pil()), image.png, image.seed)
            for image in result.images
        ]

    requests = [
        one(prompt, colour, shape, first, min(MAX_IMAGES_PER_REQUEST, per_prompt - first))
        for prompt, colour, shape in prompts
        for first in range(0, per_prompt, MAX_IMAGES_PER_REQUEST)
    ]
    batches = await asyncio.gather(*requests)
    return [d for batch in batches for d in batch]


def draw_accuracy(drawn: Sequence[Drawn]) -> dict[str, float]:
    """Share of images with the right colour, shape, and both."""
    n = len(drawn)
    return {
        "colour": sum(d.colour_ok for d in drawn) / n,
        "shape": sum(d.shape_ok for d in drawn) / n,
        "both": sum(d.both_ok for d in drawn) / n,
    }


def judge_accuracy(seed: int, total: int) -> dict[str, float]:
    """The judge's own accuracy on drawn ground truth: every shape and colour
    it knows, at several sizes, half of the images blurred, noised and tinted,
    a quarter striped."""
    rng = np.random.default_rng(seed)
    right = {"colour": 0, "shape": 0, "both": 0}
    for i in range(total):
        scene = scenes.sample_scene(
            rng, shapes=scenes.ALL_SHAPES, colours=scenes.ALL_COLOURS, stripes=i % 4 == 3
        )
        image = scenes.render(scene, (32, 48, 64, 112, 160)[i % 5])
        if i % 2:
            image = scenes.degrade(image, rng)
        verdict = judge(image)
        right["colour"] += verdict.colour == scene.colour
        right["shape"] += verdict.shape == scene.shape
        right["both"] += verdict.matches(scene.colour, scene.shape)
    return {k: v / total for k, v in right.items()}


def subject_prompts(prompt: str = SUBJECT_PROMPT) -> list[tuple[str, str, str]]:
    """The DreamBooth subject prompt with what it should show."""
    return [(prompt, scenes.SUBJECT_COLOUR, scenes.SUBJECT_SHAPE)]


@dataclass(frozen=True)
class DreamBoothSettings:
    """A DreamBooth job the demo, the tests and -m dreamsight_demo.measure run: the
    subject from four photos as "a sks shape", class prompt "a shape".

    Class-prior preservation is off (``num_class_images`` 0) because in this
    toy world it hurts: the demo model's text encoder, trained only on the
    base world's few words, maps "a sks shape" within 11% of "a shape", so
    the prior loss pulls the very embedding the subject is taught on back to
    random shapes (docs/quality.md has the measurements).
    """

    kind: Literal["lora", "full"] = "full"
    max_train_steps: int = 2500
    learning_rate: float = 5e-5
    num_class_images: int = 0
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False
    """The whole text encoder (a full tune only)."""
    seed: int = 0
    rank: int = 0
    """LoRA rank (LoRA only; 0 for a full tune)."""
    lora_alpha: float = 0.0
    """LoRA scale numerator (LoRA only; 0 takes the rank)."""
    lora_layers: tuple[str, ...] = ()
    """UNet modules that get adapters (LoRA only; empty takes the service's)."""
    train_text_encoder_lora: bool = False
    """Adapters on the text encoder too (LoRA only)."""

    def train_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``client.train`` (one checkpoint, at the end);
        the other kind's fields are left out, since the service refuses them."""
        kwargs = {**dataclasses.asdict(self), "checkpoint_interval": self.max_train_steps}
        if self.kind == "full":
            for name in ("rank", "lora_alpha", "lora_layers", "train_text_encoder_lora"):
                del kwargs[name]
        else:
            del kwargs["train_text_encoder"]
        return kwargs


DREAMBOOTH = DreamBoothSettings()
"""A full fine-tune (UNet only), as measured in docs/quality.md."""
DREAMBOOTH_WITH_PRIOR = dataclasses.replace(DREAMBOOTH, num_class_images=16)
"""The same job with class-prior preservation, as the DreamBooth paper runs it."""
LORA_LAYERS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv",
)  # fmt: skip
"""Every UNet module of the shapes model that takes an adapter (``conv``: the down- and
upsamplers'): with the attention projections alone (the service's default, the diffusers
script's) the adapter learns the subject's colour but not its shape (6% subject fidelity,
docs/quality.md)."""
DREAMBOOTH_LORA = DreamBoothSettings(
    kind="lora",
    max_train_steps=1500,
    learning_rate=3e-4,
    rank=8,
    lora_alpha=16,
    lora_layers=LORA_LAYERS,
)
"""The demo's job: a LoRA tune (the service's default kind), alpha twice the rank; the
search behind it and its measured figures are in docs/quality.md."""
DREAMBOOTH_LORA_WITH_PRIOR = dataclasses.replace(DREAMBOOTH_LORA, num_class_images=16)
"""The LoRA job with class-prior preservation."""
