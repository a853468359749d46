"""The synthetic shapes world and its judge (PIL and numpy only, fast)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dreamsight_demo.shapes import quality, scenes
from dreamsight_demo.shapes.judge import judge


def test_same_seed_same_scenes_and_images() -> None:
    first = scenes.questions(seed=3, count=12, paraphrase=True, degrade_strength=1.0)
    again = scenes.questions(seed=3, count=12, paraphrase=True, degrade_strength=1.0)
    other = scenes.questions(seed=4, count=12)
    assert [q.scene for q in first] == [q.scene for q in again]
    assert all(
        np.array_equal(np.asarray(a.image), np.asarray(b.image))
        for a, b in zip(first, again, strict=True)
    )
    assert [q.scene for q in first] != [q.scene for q in other]


def test_scenes_cover_the_world_and_vary() -> None:
    rng = np.random.default_rng(0)
    drawn = [scenes.sample_scene(rng) for _ in range(600)]
    assert {(s.colour, s.shape) for s in drawn} == {
        (c, s) for c in scenes.COLOURS for s in scenes.SHAPES
    }
    sizes = [s.size for s in drawn]
    assert min(sizes) < 0.4 and max(sizes) > 0.65
    for s in drawn:
        half = s.size / 2
        assert half < s.cx < 1 - half and half < s.cy < 1 - half, "the shape lies inside"


def test_questions_cycle_kinds_and_answers_name_the_truth() -> None:
    asked = scenes.questions(seed=0, count=9)
    assert [q.kind for q in asked] == list(scenes.QUESTION_KINDS) * 3
    assert [q.text for q in asked[:3]] == list(scenes.CANONICAL_QUESTIONS.values())
    for q in asked:
        assert scenes.grade(q.scene, q.kind, q.answer)
        assert q.image.size == (112, 112)


@pytest.mark.parametrize(
    ("kind", "reply", "ok"),
    [
        ("colour", "Red.", True),
        ("colour", "It is red, not blue.", False),
        ("colour", "Reddish", False),
        ("shape", "A circle.", True),
        ("shape", "circle or square", False),
        ("describe", "A red circle on a white background.", True),
        ("describe", "A red square on a white background.", False),
        ("describe", "A circle.", False),
    ],
)
def test_grading_wants_the_right_words_and_only_those(kind: str, reply: str, ok: bool) -> None:
    scene = scenes.Scene("circle", "red", (220, 40, 40), 0.5, 0.5, 0.5)
    assert scenes.grade(scene, kind, reply) is ok  # type: ignore[arg-type]


def test_judge_is_right_on_drawn_ground_truth() -> None:
    """>= 99% on every shape and colour it knows, at several sizes, half of
    the images blurred, noised and tinted, a quarter striped."""
    accuracy = quality.judge_accuracy(seed=1, total=800)
    assert accuracy["both"] >= 0.99, accuracy


def test_judge_sees_stripes_on_clean_images() -> None:
    rng = np.random.default_rng(2)
    for i in range(40):
        scene = scenes.sample_scene(rng, min_size=0.5, stripes=i % 2 == 0)
        assert judge(scenes.render(scene, 64)).striped is scene.stripes


def test_judge_finds_nothing_in_blank_or_grey_images() -> None:
    for image in (Image.new("RGB", (64, 64), "white"), Image.new("RGB", (64, 64), (128, 128, 128))):
        verdict = judge(image)
        assert verdict.colour is None and verdict.shape is None and verdict.coverage == 0
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert judge(Image.fromarray(noise)).shape is None


def test_judge_takes_the_largest_of_two_shapes() -> None:
    big = scenes.Scene("triangle", "green", scenes.COLOURS["green"], 0.35, 0.4, 0.5)
    small = scenes.Scene("circle", "blue", scenes.COLOURS["blue"], 0.8, 0.8, 0.2)
    verdict = judge(scenes.render_all([big, small], 64))
    assert verdict.matches("green", "triangle") and verdict.blobs == 2


def test_subject_is_a_striped_purple_star_the_judge_recognises() -> None:
    photos = scenes.subject_images(seed=0, count=8)
    verdicts = [judge(p) for p in photos]
    assert all(v.matches(scenes.SUBJECT_COLOUR, scenes.SUBJECT_SHAPE) for v in verdicts)
    assert all(v.striped for v in verdicts)
    assert scenes.SUBJECT_COLOUR not in scenes.COLOURS and scenes.SUBJECT_SHAPE not in scenes.SHAPES
