"""Synthetic shapes: the world the demo models are trained on, and a judge.

A scene is one flat-coloured shape on white (:mod:`dreamsight_demo.shapes.scenes`), drawn
with PIL from a seed, with captions for the diffusion demo and questions and
answers for the vision demo. :mod:`dreamsight_demo.shapes.judge` reads a shape's colour and
kind back from any image, generated or drawn, with PIL and numpy only, so
that what the demo models produce can be scored without a model.
Import the judge as ``from dreamsight_demo.shapes.judge import judge``.
"""

from dreamsight_demo.shapes.scenes import (
    COLOURS,
    EXTRA_COLOURS,
    EXTRA_SHAPES,
    SHAPES,
    Scene,
    render,
    sample_scene,
)

__all__ = [
    "COLOURS",
    "EXTRA_COLOURS",
    "EXTRA_SHAPES",
    "SHAPES",
    "Scene",
    "render",
    "sample_scene",
]
