"""Search DreamBooth settings on the shapes demo model: the sweep in docs/quality.md.

    python -m dreamsight_demo.sweep [--images N] [--jobs K] [--defaults FILE] SETTINGS_JSON...

Each SETTINGS_JSON overrides fields of ``quality.DREAMBOOTH_LORA`` (for
example ``'{"learning_rate": 1e-3, "rank": 8, "max_train_steps": 1000}'``).
Starts the diffusion service on ``models/sd-shapes`` behind the real gateway
(no vision service), trains every job through the public async client, ``--jobs``
at a time, and judges N images of "a sks shape" and N/8 of each base prompt
drawn through the tuned model. Prints one JSON line per job. ``--defaults`` gives
the diffusion service an operator's copy of ``dreambooth_defaults.yaml``, for the
trainer options a job cannot set (``trainer.snr_gamma``, ``trainer.lr_scheduler``);
it applies to every job of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import dreamsight

from dreamsight_demo.shapes import quality, scenes
from dreamsight_demo.weights import COMMITTED_ROOT

STEPS = 20


async def one_job(
    client: dreamsight.AsyncClient,
    settings: quality.DreamBoothSettings,
    name: str,
    images: int,
    base: dict[str, float],
) -> dict[str, Any]:
    photos = [quality.png(p) for p in scenes.subject_images(seed=0, count=4)]
    started = time.monotonic()
    job = await client.train(
        photos,
        quality.SUBJECT_PROMPT,
        class_prompt=quality.CLASS_PROMPT,
        output_model_name=name,
        **settings.train_kwargs(),
    )
    final = await job.wait()
    if final.state != "succeeded":
        return {"settings": dataclasses.asdict(settings), "state": final.state}
    trained_s = time.monotonic() - started
    after = await quality.draw(
        client, quality.subject_prompts(), per_prompt=images, model=final.model, steps=STEPS,
        seed=300,
    )  # fmt: skip
    kept = await quality.draw(
        client, quality.BASE_PROMPTS, per_prompt=max(1, images // 8), model=final.model,
        steps=STEPS, seed=100,
    )  # fmt: skip
    classes = quality.draw_accuracy(kept)
    return {
        "settings": dataclasses.asdict(settings),
        "train_seconds": round(trained_s),
        "subject": quality.draw_accuracy(after)["both"],
        "subject_seen": collections.Counter(
            f"{d.verdict.colour} {d.verdict.shape}" for d in after
        ).most_common(3),
        "base_prompts": classes,
        "kept_of_base": round(classes["both"] / base["both"], 3),
    }


async def sweep(target: str, key: str, args: argparse.Namespace) -> None:
    grid = [
        dataclasses.replace(quality.DREAMBOOTH_LORA, **json.loads(text)) for text in args.settings
    ]
    gate = asyncio.Semaphore(args.jobs)
    async with dreamsight.AsyncClient(target, api_key=key) as client:
        drawn = await quality.draw(
            client, quality.BASE_PROMPTS, per_prompt=max(1, args.images // 8), steps=STEPS,
            seed=100,
        )  # fmt: skip
        base = quality.draw_accuracy(drawn)
        print(json.dumps({"base": base}), flush=True)

        async def run(i: int, settings: quality.DreamBoothSettings) -> None:
            async with gate:
                result = await one_job(client, settings, f"sweep-{i}", args.images, base)
            print(json.dumps(result), flush=True)

        await asyncio.gather(*(run(i, s) for i, s in enumerate(grid)))


async def main_async(args: argparse.Namespace) -> None:
    # Test-side helpers start the real services in process, as tests/ does.
    from diffusion_service.config import BaseModel, DiffusionSettings, TrainingSettings
    from diffusion_service.server import start_service
    from dreamsight_server.lifecycle import ServerOptions
    from gateway.config import GatewaySettings
    from gateway.server import start_gateway

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        diffusion = await start_service(
            DiffusionSettings(
                models=(BaseModel("sd-shapes", str(COMMITTED_ROOT / "sd-shapes")),),
                device="cpu",
                training=TrainingSettings(
                    store=tmp / "jobs.sqlite3",
                    artifacts_dir=tmp / "training",
                    defaults_file=args.defaults,
                    concurrency=args.jobs,
                    stop_grace_s=5.0,
                ),
                server=ServerOptions(metrics_port=None, grace_s=1.0),
            )
        )
        await diffusion.load()
        gateway = await start_gateway(
            GatewaySettings(
                vision_target="127.0.0.1:1",
                diffusion_target=f"127.0.0.1:{diffusion.port}",
                database=str(tmp / "gw.sqlite3"),
                admin_token="sweep-admin-token",
                server=ServerOptions(metrics_port=None, grace_s=1.0),
            )
        )
        try:
            _, key = await gateway.core.keys.create("sweep", "max", "sweep")
            await sweep(f"127.0.0.1:{gateway.port}", key, args)
        finally:
            await gateway.stop(0)
            await diffusion.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="subject images per job")
    parser.add_argument("--jobs", type=int, default=2, help="jobs trained at once")
    parser.add_argument(
        "--defaults", type=Path, default=None,
        help="DreamBooth defaults file for the diffusion service (trainer options)",
    )  # fmt: skip
    parser.add_argument("settings", nargs="+", help="JSON overrides of DREAMBOOTH_LORA")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
