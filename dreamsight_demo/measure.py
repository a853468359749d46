"""Measure the demo models end to end: the figures in docs/quality.md.

    python -m dreamsight_demo.measure [--home DIR] [--questions N] [--images N] [--skip-dreambooth]

Measures the judge on drawn ground truth, then starts the stack as
`dreamsight up` does (gateway, vLLM vision, diffusion, with the trained demo
models put in place) and, through the public async client, runs: held-out
questions to the vision model, images of every base prompt from the
diffusion model, and the DreamBooth subject job as a LoRA and as a full tune,
each with and without class-prior preservation, each followed by the subject
and base prompts on the tuned model, and last the base prompts again on the
base model (byte-identical to the first time?). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dreamsight
from dreamsight import _up

from dreamsight_demo.shapes import quality, scenes

STEPS = 20


async def measure(target: str, key: str, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"judge": quality.judge_accuracy(seed=7, total=800)}
    async with dreamsight.AsyncClient(target, api_key=key) as client:
        started = time.monotonic()
        questions = scenes.questions(seed=args.question_seed, count=args.questions)
        answered = await quality.ask(client, questions)
        results["vision"] = {
            "questions": len(answered),
            "accuracy": quality.answer_accuracy(answered),
            "seconds": round(time.monotonic() - started),
            "wrong": [
                (a.question.text, a.question.answer, a.reply) for a in answered if not a.correct
            ],
        }
        print(json.dumps({"vision": results["vision"]}), file=sys.stderr, flush=True)
        harder = scenes.questions(
            seed=args.question_seed + 1, count=args.questions, paraphrase=True, degrade_strength=1.0
        )
        answered = await quality.ask(client, harder)
        results["vision_harder"] = {
            "questions": len(answered),
            "accuracy": quality.answer_accuracy(answered),
        }
        print(json.dumps({"vision_harder": results["vision_harder"]}), file=sys.stderr)
        started = time.monotonic()
        drawn = await quality.draw(
            client, quality.BASE_PROMPTS, per_prompt=args.images, steps=STEPS, seed=100
        )
        results["diffusion"] = {
            "images": len(drawn),
            "accuracy": quality.draw_accuracy(drawn),
            "steps": STEPS,
            "seconds": round(time.monotonic() - started),
        }
        print(json.dumps({"diffusion": results["diffusion"]}), file=sys.stderr, flush=True)
        base = results["diffusion"]["accuracy"]
        if args.skip_dreambooth:
            return results
        photos = [quality.png(p) for p in scenes.subject_images(seed=0, count=4)]
        subject = quality.subject_prompts()
        before = await quality.draw(client, subject, per_prompt=args.images, steps=STEPS, seed=300)
        results["subject_before"] = quality.draw_accuracy(before)["both"]
        for name, settings in (
            ("lora_without_prior", quality.DREAMBOOTH_LORA),
            ("lora_with_prior", quality.DREAMBOOTH_LORA_WITH_PRIOR),
            ("full_without_prior", quality.DREAMBOOTH),
            ("full_with_prior", quality.DREAMBOOTH_WITH_PRIOR),
        ):
            started = time.monotonic()
            job = await client.train(
                photos,
                quality.SUBJECT_PROMPT,
                class_prompt=quality.CLASS_PROMPT,
                output_model_name=f"sks-{name.replace('_', '-')}",
                **settings.train_kwargs(),
            )
            final = await job.wait()
            if final.state != "succeeded":
                raise SystemExit(f"{name}: training {final.state}: {final.reason}")
            trained_s = time.monotonic() - started
            after = await quality.draw(
                client, subject, per_prompt=args.images, model=final.model, steps=STEPS, seed=300
            )
            kept = await quality.draw(
                client, quality.BASE_PROMPTS, per_prompt=max(1, args.images // 2),
                model=final.model, steps=STEPS, seed=100,
            )  # fmt: skip
            classes = quality.draw_accuracy(kept)
            results[name] = {
                "settings": dataclasses.asdict(settings),
                "train_seconds": round(trained_s),
                "subject": quality.draw_accuracy(after)["both"],
                "base_prompts": classes,
                "kept_of_base": {
                    k: round(classes[k] / base[k], 3) if base[k] else None for k in classes
                },
            }
            print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
        # After adapters ran on the loaded base pipeline, the base draws the same bytes.
        again = await quality.draw(
            client, quality.BASE_PROMPTS, per_prompt=args.images, steps=STEPS, seed=100
        )
        results["base_byte_identical_after"] = [d.png for d in again] == [d.png for d in drawn]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", help="state directory (default: a temporary one)")
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--question-seed", type=int, default=1000)
    parser.add_argument("--images", type=int, default=16, help="images per prompt")
    parser.add_argument("--skip-dreambooth", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(args.home or tmp)
        started = time.monotonic()
        stack = _up.start(home, 0, -1, quiet=True)
        try:
            results = asyncio.run(measure(stack.target, stack.api_key, args))
        finally:
            stack.stop(grace_s=5)
        results["seconds"] = round(time.monotonic() - started)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
