"""The embedded demo, end to end: what `make demo` runs.

    python -m dreamsight_demo.demo [--home DIR]

Starts `dreamsight up` (gateway, vision and diffusion on loopback, with the
small demo models trained on synthetic shapes that come with the source;
see docs/quality.md), then, through the public client only: generates "a
blue triangle", asks the vision model about that image in a streamed chat,
teaches the diffusion model a subject it has never seen (a striped purple
star, "a sks shape") with a DreamBooth job from four photos, draws the
subject and a base prompt with the new model, shows the caller's usage and
shuts down cleanly. Each step prints what it asked, what it got, and whether
the deterministic judge of the shapes world (``dreamsight_demo.shapes.judge``) agrees. The
models are toys: they know one flat shape on white, and nothing else.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import dreamsight

from dreamsight_demo.shapes import quality, scenes
from dreamsight_demo.shapes.judge import Verdict, judge

PROMPT = ("a blue triangle", "blue", "triangle")
STEPS = 20


def step(title: str) -> None:
    """A section heading."""
    print(f"\n== {title}", flush=True)


def mark(ok: bool) -> str:
    """yes / NO."""
    return "yes" if ok else "NO"


def describe(verdict: Verdict) -> str:
    """What the judge saw, in words."""
    striped = ", striped" if verdict.striped else ""
    return f"{verdict.colour or 'no colour'} {verdict.shape or 'unknown shape'}{striped}"


def generate_and_chat(client: dreamsight.Client, out: Path, checks: dict[str, bool]) -> None:
    """Draw the prompt, judge it, then ask the vision model about the image."""
    prompt, colour, shape = PROMPT
    step("generate an image")
    result = client.generate_image(prompt, steps=STEPS, seed=1)
    image = result.images[0]
    path = image.save(out / "generated.png")
    seen = judge(image.to_pil())
    checks["the image shows the prompt"] = ok = seen.matches(colour, shape)
    print(f"asked : {prompt!r}   (saved {path}, {result.gpu_seconds:.2f} GPU-s)")
    print(f"judge : {describe(seen)}   -> as prompted: {mark(ok)}")

    step("streamed chat about the generated image")
    prompted = scenes.Scene(shape, colour, scenes.COLOURS[colour], 0.5, 0.5, 0.5)
    for kind in scenes.QUESTION_KINDS:
        question = scenes.CANONICAL_QUESTIONS[kind]
        print(f">>> {question}", flush=True)
        message = dreamsight.Message("user", question, (image.png,))
        options: dreamsight.Options = {"temperature": 0.0, "max_tokens": 24}
        reply = None
        for chunk in client.chat("", [message], options=options, stream=True):
            print(chunk.text, end="", flush=True)
            reply = chunk.response or reply
        assert reply is not None
        right = scenes.grade(prompted, kind, reply.text)
        agrees = bool(seen.colour and seen.shape) and scenes.grade(
            scenes.Scene(seen.shape or "", seen.colour or "", (0, 0, 0), 0.5, 0.5, 0.5),
            kind,
            reply.text,
        )
        checks[f"chat: {question}"] = right
        print(
            f"\n    [{reply.completion_tokens} tokens, TTFT {reply.time_to_first_token * 1e3:.0f}"
            f" ms, {reply.gpu_seconds:.3f} GPU-s] right about the prompt: {mark(right)}; "
            f"the judge agrees: {mark(agrees)}"
        )


def dreambooth(client: dreamsight.Client, out: Path, checks: dict[str, bool]) -> None:
    """Teach the subject, then draw it and a base prompt with the new model."""
    step("DreamBooth: teach the model a subject it has never seen")
    photos = scenes.subject_images(seed=0, count=4)
    (out / "subject").mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(photos):
        photo.save(out / "subject" / f"subject-{i}.png")
    print(
        f"4 photos of a striped purple star in {out / 'subject'}; instance prompt "
        f"{quality.SUBJECT_PROMPT!r}, class prompt {quality.CLASS_PROMPT!r}, "
        f"a LoRA tune (rank {quality.DREAMBOOTH_LORA.rank}), "
        f"{quality.DREAMBOOTH_LORA.max_train_steps} steps "
        "(no class priors: docs/quality.md says why)"
    )
    before = client.generate_image(quality.SUBJECT_PROMPT, steps=STEPS, seed=5)
    print(f"before: {quality.SUBJECT_PROMPT!r} draws {describe(judge(before.images[0].to_pil()))}")
    job = client.train(
        [quality.png(p) for p in photos],
        quality.SUBJECT_PROMPT,
        class_prompt=quality.CLASS_PROMPT,
        output_model_name=free_name(client, "sks-star"),
        **quality.DREAMBOOTH_LORA.train_kwargs(),
    )
    print(f"job {job.id}")
    for event in job.watch():
        if event.kind == "class_images" and event.done == event.total:
            print(f"  class images {event.done}/{event.total}", flush=True)
        elif event.kind == "training_step" and event.step % 250 == 0:
            print(f"  step {event.step}/{event.total_steps} loss {event.loss:.4f}", flush=True)
        elif event.kind in ("succeeded", "failed", "cancelled"):
            print(f"  {event.kind} {event.model or event.reason}", flush=True)
    final = job.refresh()
    if final.state != "succeeded":
        raise SystemExit(f"training {final.state}: {final.reason}")

    step("generate with the subject identifier, and a base prompt, on the new model")
    tuned = client.generate_image(
        quality.SUBJECT_PROMPT, model=final.model, steps=STEPS, seed=5, num_images=4
    )
    hits = 0
    for i, drawn in enumerate(tuned.images):
        verdict = judge(drawn.to_pil())
        hit = verdict.matches(scenes.SUBJECT_COLOUR, scenes.SUBJECT_SHAPE)
        hits += hit
        drawn.save(out / f"sks-{i}.png")
        seen = describe(verdict)
        print(f"asked : {quality.SUBJECT_PROMPT!r} -> judge: {seen}; subject: {mark(hit)}")
    checks["DreamBooth: the subject in 3 of 4 images"] = hits >= 3
    base = client.generate_image("a red circle", model=final.model, steps=STEPS, seed=1)
    verdict = judge(base.images[0].to_pil())
    checks["DreamBooth: 'a red circle' still drawn"] = ok = verdict.matches("red", "circle")
    print(f"asked : 'a red circle' -> judge: {describe(verdict)}; as prompted: {mark(ok)}")


def free_name(client: dreamsight.Client, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``, ... when earlier demo runs took it."""
    taken = {model.name for model in client.models()}
    return next(n for n in (stem, *(f"{stem}-{i}" for i in range(2, 10_000))) if n not in taken)


def run_demo(client: dreamsight.Client, out: Path) -> dict[str, bool]:
    """The demo's calls, through the public client; returns its checks."""
    out.mkdir(parents=True, exist_ok=True)
    for model in client.models():
        print(f"model {model.name} ({model.kind}, {model.origin}, demo={model.demo})")
    checks: dict[str, bool] = {}
    generate_and_chat(client, out, checks)
    dreambooth(client, out, checks)

    step("usage")
    usage = client.usage()
    for window in usage.windows:
        print(
            f"  {usage.tenant} ({usage.tier}) {window.name}: "
            f"{window.used_gpu_seconds:.2f} of {window.limit_gpu_seconds:g} GPU-seconds"
        )
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", default=".dreamsight", help="state directory")
    args = parser.parse_args()
    home = Path(args.home).resolve()

    step("dreamsight up (puts the trained demo models in place on first run)")
    started = time.monotonic()
    up = subprocess.Popen(
        [sys.executable, "-m", "dreamsight.cli", "--json", "up", "--home", str(home),
         "--port", "0", "--http-port", "0"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert up.stdout is not None
    line = up.stdout.readline()
    if not line:
        raise SystemExit(f"dreamsight up failed (exit {up.wait()}); see {home / 'logs'}")
    info = json.loads(line)
    key = info["api_key"]
    print(f"gateway at {info['target']}, HTTP at {info['http']}, demo key {key[:16]}...")
    checks: dict[str, bool] = {}
    try:
        with dreamsight.Client(info["target"], api_key=info["api_key"]) as client:
            checks = run_demo(client, home / "demo")
    finally:
        step("shutdown")
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=120)
        print(f"dreamsight up exited with {code}; the demo took {time.monotonic() - started:.0f} s")
    step("summary")
    for name, ok in checks.items():
        print(f"  {mark(ok):3}  {name}")
    if code != 0:
        raise SystemExit(code)
    if not all(checks.values()):
        raise SystemExit("some answers or images were wrong (see above)")


if __name__ == "__main__":
    main()
