"""The embedded demo, end to end: what `make demo` runs.

    python scripts/demo.py [--home DIR]

Starts `dreamsight up` (gateway, vision and diffusion on loopback, building
the tiny demo models on first run), then, through the public client only:
a streamed chat about an image, a generated image saved to disk, a short
DreamBooth job with progress, a generation with the new subject identifier,
the caller's usage, and a clean shutdown. The models are toys with random
weights: the text is gibberish and the images are noise, by design; what the
demo shows is the system working.
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


def subject_photos(out: Path) -> list[Path]:
    """Three photos of the demo 'subject': a red circle on white, moved about."""
    from PIL import Image, ImageDraw

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (x, y) in enumerate([(10, 12), (22, 18), (16, 26)]):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).ellipse((x, y, x + 28, y + 28), fill=(220, 30, 30))
        path = out / f"subject-{i}.png"
        image.save(path)
        paths.append(path)
    return paths


def step(title: str) -> None:
    """A section heading."""
    print(f"\n== {title}", flush=True)


def run_demo(client: dreamsight.Client, out: Path) -> None:
    """The demo's calls, through the public client."""
    for model in client.models():
        print(f"model {model.name} ({model.kind}, {model.origin}, demo={model.demo})")
    photos = subject_photos(out / "subject")

    step("streamed chat about an image")
    print(">>> What is in this image?", flush=True)
    message = dreamsight.Message("user", "What is in this image?", (photos[0],))
    reply = None
    for chunk in client.chat("", [message], options={"max_tokens": 24}, stream=True):
        print(chunk.text, end="", flush=True)
        reply = chunk.response or reply
    assert reply is not None
    print(
        f"\n[{reply.completion_tokens} tokens, TTFT {reply.time_to_first_token * 1e3:.0f} ms, "
        f"{reply.gpu_seconds:.3f} GPU-s; random weights, so gibberish]"
    )

    step("generate an image")
    result = client.generate_image("a red circle on white", steps=10, seed=1)
    first = result.images[0].save(out / "generated.png")
    print(f"saved {first} (seed {result.images[0].seed}, {result.gpu_seconds:.2f} GPU-s)")

    step("DreamBooth: teach the model the subject 'sks circle'")
    job = client.train(
        photos,
        "a photo of sks circle",
        class_prompt="a photo of a circle",
        num_class_images=2,
        max_train_steps=12,
        checkpoint_interval=6,
        resolution=64,
        seed=0,
        output_model_name="sks-circle",
    )
    print(f"job {job.id}")
    for event in job.watch():
        if event.kind == "class_images":
            print(f"  class images {event.done}/{event.total}", flush=True)
        elif event.kind == "training_step":
            print(f"  step {event.step}/{event.total_steps} loss {event.loss:.4f}", flush=True)
        elif event.kind == "checkpoint_saved":
            print(f"  checkpoint at step {event.step}", flush=True)
        elif event.kind in ("succeeded", "failed", "cancelled"):
            print(f"  {event.kind} {event.model or event.reason}", flush=True)
    final = job.refresh()
    if final.state != "succeeded":
        raise SystemExit(f"training {final.state}: {final.reason}")

    step("generate with the subject identifier")
    tuned = client.generate_image(
        "a photo of sks circle on the beach", model=final.model, steps=10, seed=2
    )
    path = tuned.images[0].save(out / "sks-circle.png")
    print(f"saved {path} from {tuned.model}")

    step("usage")
    usage = client.usage()
    for window in usage.windows:
        print(
            f"  {usage.tenant} ({usage.tier}) {window.name}: "
            f"{window.used_gpu_seconds:.2f} of {window.limit_gpu_seconds:g} GPU-seconds"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", default=".dreamsight", help="state directory")
    args = parser.parse_args()
    home = Path(args.home).resolve()

    step("dreamsight up (builds the demo models on first run)")
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
    try:
        with dreamsight.Client(info["target"], api_key=info["api_key"]) as client:
            run_demo(client, home / "demo")
    finally:
        step("shutdown")
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=120)
        print(f"dreamsight up exited with {code}; the demo took {time.monotonic() - started:.0f} s")
    if code != 0:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
