"""Scenes of one shape on white: drawing, captions, questions and answers.

Everything is drawn from a ``numpy.random.Generator``, so a seed fixes a
whole data set. Shapes are axis-aligned (triangles and stars point up) and
vary in size, position and, slightly, in colour. Drawing is supersampled and
box-filtered, so edges are anti-aliased like a photo's rather than jagged.

The base world is :data:`SHAPES` x :data:`COLOURS`; :data:`EXTRA_SHAPES` and
:data:`EXTRA_COLOURS` exist for what the demo models must *not* know yet (a
DreamBooth subject) and for teaching the diffusion demo's autoencoder to
draw more than the base world.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
}
EXTRA_SHAPES: tuple[str, ...] = ("star",)
EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {"purple": (140, 50, 200)}
ALL_SHAPES: tuple[str, ...] = SHAPES + EXTRA_SHAPES
ALL_COLOURS: dict[str, tuple[int, int, int]] = {**COLOURS, **EXTRA_COLOURS}
BACKGROUND = (255, 255, 255)
STRIPE_SHADE = 0.55
"""Stripes alternate the colour with this fraction of it (a darker shade)."""

QuestionKind = Literal["colour", "shape", "describe"]
QUESTION_KINDS: tuple[QuestionKind, ...] = ("colour", "shape", "describe")
CANONICAL_QUESTIONS: dict[QuestionKind, str] = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "describe": "Describe the image.",
}
"""The questions quality is measured on."""
QUESTIONS: dict[QuestionKind, tuple[str, ...]] = {
    "colour": (
        CANONICAL_QUESTIONS["colour"],
        "What color is the shape?",
        "What colour is it?",
        "Which colour is the shape?",
        "What is the colour of the shape?",
    ),
    "shape": (
        CANONICAL_QUESTIONS["shape"],
        "What shape is this?",
        "Which shape is in the image?",
        "What is the shape?",
        "Name the shape.",
    ),
    "describe": (
        CANONICAL_QUESTIONS["describe"],
        "What is in this image?",
        "What do you see?",
        "Describe the picture in one sentence.",
        "What is this?",
    ),
}
"""Training paraphrases; the first of each is the canonical one."""


@dataclass(frozen=True)
class Scene:
    """One shape on a white background, in image-relative units."""

    shape: str
    colour: str
    rgb: tuple[int, int, int]
    cx: float
    """Centre of the shape's bounding box, as a fraction of the width."""
    cy: float
    """Centre of the shape's bounding box, as a fraction of the height."""
    size: float
    """Side of the shape's (square) bounding box, as a fraction of the image side."""
    stripes: bool = False
    """Horizontal stripes in a darker shade of the colour."""

    @property
    def caption(self) -> str:
        """The plain caption, e.g. ``a red circle``."""
        return f"a {self.colour} {self.shape}"


def sample_scene(
    rng: np.random.Generator,
    shapes: tuple[str, ...] = SHAPES,
    colours: dict[str, tuple[int, int, int]] | None = None,
    min_size: float = 0.35,
    max_size: float = 0.7,
    jitter: int = 12,
    stripes: bool = False,
) -> Scene:
    """A random scene: shape and colour uniform, size and position varied.

    The colour is the palette's, each channel moved by up to ``jitter``; the
    shape always lies wholly inside the image with a small margin.
    """
    palette = COLOURS if colours is None else colours
    names = sorted(palette)
    colour = names[int(rng.integers(len(names)))]
    shape = shapes[int(rng.integers(len(shapes)))]
    size = float(rng.uniform(min_size, max_size))
    margin = size / 2 + 0.04
    cx, cy = (float(v) for v in rng.uniform(margin, 1 - margin, size=2))
    base = np.array(palette[colour])
    rgb = np.clip(base + rng.integers(-jitter, jitter + 1, size=3), 0, 255)
    r, g, b = (int(v) for v in rgb)
    return Scene(shape, colour, (r, g, b), cx, cy, size, stripes)


def shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]]:
    """The outline of a polygonal shape whose bounding box is ``side`` square
    around (cx, cy), in pixels. Circles are not polygons: see :func:`draw_mask`."""
    half = side / 2
    if shape == "square":
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half),
                (cx - half, cy + half)]  # fmt: skip
    if shape == "triangle":
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "star":
        points = []
        for i in range(10):
            radius = 1.0 if i % 2 == 0 else 0.45
            angle = math.pi / 2 - i * math.pi / 5
            points.append((radius * math.cos(angle), -radius * math.sin(angle)))
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        scale = side / max(max(xs) - min(xs), max(ys) - min(ys))
        mx, my = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
        return [(cx + (x - mx) * scale, cy + (y - my) * scale) for x, y in points]
    raise ValueError(f"unknown shape {shape!r}")


def draw_mask(
    shape: str, cx: float, cy: float, side: float, width: int, height: int
) -> Image.Image:
    """A binary ("L", 0 or 255) mask of one shape at pixel coordinates."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        half = side / 2
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=255)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, side), fill=255)
    return mask


def render(scene: Scene, size: int | tuple[int, int] = 64, supersample: int = 4) -> Image.Image:
    """Draw a scene as an RGB image (``size`` square, or (width, height)).

    The shape's relative size is taken against the shorter side, so it stays a
    true circle or square in non-square images.
    """
    return render_all([scene], size, supersample)


def render_all(
    scenes: list[Scene], size: int | tuple[int, int] = 64, supersample: int = 4
) -> Image.Image:
    """Draw several shapes on one white image, later ones on top."""
    width, height = (size, size) if isinstance(size, int) else size
    big_w, big_h = width * supersample, height * supersample
    canvas = Image.new("RGB", (big_w, big_h), BACKGROUND)
    for scene in scenes:
        side = scene.size * min(big_w, big_h)
        mask = draw_mask(scene.shape, scene.cx * big_w, scene.cy * big_h, side, big_w, big_h)
        fill = Image.new("RGB", (big_w, big_h), scene.rgb)
        if scene.stripes:
            period = max(2 * supersample, round(side / 6))
            dark = tuple(round(c * STRIPE_SHADE) for c in scene.rgb)
            rows = (np.arange(big_h) // (period // 2)) % 2 == 1
            pixels = np.array(fill)
            pixels[rows] = dark
            fill = Image.fromarray(pixels)
        canvas.paste(fill, (0, 0), mask)
    return canvas.resize((width, height), Image.Resampling.BOX)


def degrade(image: Image.Image, rng: np.random.Generator, strength: float = 1.0) -> Image.Image:
    """Blur, noise and a background tint, as generated or compressed images have.

    ``strength`` scales all three (0 returns a copy).
    """
    out = image.convert("RGB")
    blur = float(rng.uniform(0, 1.0)) * strength
    if blur > 0.05:
        out = out.filter(ImageFilter.GaussianBlur(blur * min(out.size) / 64))
    pixels = np.asarray(out, dtype=np.float32)
    tint = rng.uniform(-10, 4, size=3) * strength
    noise = rng.normal(0, float(rng.uniform(0, 8)) * strength, size=pixels.shape)
    pixels = np.clip(pixels + tint + noise, 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def with_stripes(scene: Scene) -> Scene:
    """The same scene with stripes."""
    return replace(scene, stripes=True)


def answer(scene: Scene, kind: QuestionKind) -> str:
    """The answer the vision demo is taught for a question of this kind."""
    if kind == "colour":
        return f"{scene.colour.capitalize()}."
    if kind == "shape":
        return f"A {scene.shape}."
    return f"A {scene.colour} {scene.shape} on a white background."


def grade(scene: Scene, kind: QuestionKind, reply: str) -> bool:
    """Whether a free-text reply answers correctly: it names the right colour
    (and/or shape, for a description) and no other."""
    words = set("".join(c if c.isalpha() else " " for c in reply.lower()).split())
    colours = {c for c in ALL_COLOURS if c in words}
    shapes = {s for s in ALL_SHAPES if s in words}
    colour_ok = colours == {scene.colour}
    shape_ok = shapes == {scene.shape}
    if kind == "colour":
        return colour_ok
    if kind == "shape":
        return shape_ok
    return colour_ok and shape_ok


@dataclass(frozen=True)
class Question:
    """One held-out or training question about one image."""

    scene: Scene
    image: Image.Image
    kind: QuestionKind
    text: str
    answer: str


def questions(
    seed: int,
    count: int,
    image_size: int = 112,
    paraphrase: bool = False,
    degrade_strength: float = 0.0,
) -> list[Question]:
    """``count`` questions, the kinds in turn, each about a fresh scene.

    With ``paraphrase`` the wording is drawn from :data:`QUESTIONS`, else the
    canonical question of each kind is asked.
    """
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        kind = QUESTION_KINDS[i % len(QUESTION_KINDS)]
        scene = sample_scene(rng)
        image = render(scene, image_size)
        if degrade_strength > 0:
            image = degrade(image, rng, degrade_strength)
        options = QUESTIONS[kind]
        text = options[int(rng.integers(len(options)))] if paraphrase else options[0]
        out.append(Question(scene, image, kind, text, answer(scene, kind)))
    return out


SUBJECT_COLOUR = "purple"
SUBJECT_SHAPE = "star"
"""The DreamBooth demo's subject: a purple star with stripes, which the base
models never saw (only the diffusion demo's autoencoder learned to draw
stars and purple, so that a fine-tuned UNet can ask for them)."""


def subject_scene(rng: np.random.Generator) -> Scene:
    """One view of the DreamBooth subject, placed and sized at random."""
    scene = sample_scene(
        rng, shapes=(SUBJECT_SHAPE,), colours={SUBJECT_COLOUR: EXTRA_COLOURS[SUBJECT_COLOUR]},
        min_size=0.5, max_size=0.7, jitter=6,
    )  # fmt: skip
    return with_stripes(scene)


def subject_images(seed: int, count: int, size: int = 64) -> list[Image.Image]:
    """``count`` photos of the DreamBooth subject."""
    rng = np.random.default_rng(seed)
    return [render(subject_scene(rng), size) for _ in range(count)]
