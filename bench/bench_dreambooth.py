"""DreamBooth trainer benchmark: our Lightning trainer alone, per step.

    python bench/bench_dreambooth.py [--model-dir DIR] [--steps N] [--resolution PX]
        [--batch-size N] [--threads N] [--class-images N] [--runs N] [--train-text-encoder]

Runs :func:`diffusion_service.dreambooth.trainer.run_job` (what a service
worker runs, minus the service) on a Stable Diffusion directory (default:
the tiny demo model, built into a temporary directory) with three synthetic
instance photos and prior preservation on ``--class-images`` class images,
drawn once by the model and then cached. Its settings mirror the diffusers
``train_dreambooth.py`` script's defaults, so the same model, steps,
resolution, batch size and thread count can be handed to that script for a
side-by-side figure: AdamW (lr 5e-6, betas 0.9/0.999, weight decay 1e-2,
eps 1e-8), constant learning rate, gradient clipping at norm 1.0, no
accumulation, fp32 on CPU, no checkpoint before step 500 (the job's end
still writes one), no validation images, the UNet trained and the text
encoder frozen unless ``--train-text-encoder``.

Three variants alternate run by run, each run in a fresh process (so its
peak RSS is its own): ``cached`` (a full tune with our default: the frozen
VAE encodes every image once and each step samples from the cached latent
distribution), ``encode`` (a full tune whose VAE encodes every batch at
every step, as the script does) and ``lora`` (the default kind of tune:
cached latents, rank-4 peft adapters on to_k/to_q/to_v/to_out.0 and the
UNet frozen, lr 1e-4, as diffusers' ``train_dreambooth_lora.py``).
Reported per variant: the median seconds per step, taken as the gap between
the ends of consecutive optimizer steps with the first gap (warm-up)
excluded, and the peak RSS. The last line is ``bench dreambooth:
s_per_step=X peak_rss_mb=Y lora_s_per_step=X lora_peak_rss_mb=Y``: the
median over all steps and the largest peak of the runs of the full tune
(cached) and of the LoRA tune.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from diffusion_service.jobs.worker_events import StepFinished, WorkerEvent

VARIANTS = ("cached", "encode", "lora")


def photo(index: int, size: int = 96) -> bytes:
    """A synthetic instance photo: a colored disc on a gradient."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 96)], axis=-1)
    pixels[(x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2] = rng.integers(0, 255, 3)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


class StepClock:
    """An Events sink that notes when each optimizer step ended."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def emit(self, event: WorkerEvent) -> None:
        if isinstance(event, StepFinished):
            self.ends.append(time.perf_counter())


class NoStop:
    """A Control that never asks to stop."""

    cancelled = False
    shutting_down = False


def child(args: argparse.Namespace) -> None:
    """One run in this process; prints a JSON line with step ends and peak RSS."""
    from dreamsight_server import torch_compat

    torch_compat.install()
    import torch

    torch.set_num_threads(args.threads)
    from diffusion_service.dreambooth.params import (
        DrawSettings,
        JobParams,
        TrainerOptions,
        WorkerRuntime,
        WorkerSpec,
    )
    from diffusion_service.dreambooth.trainer import run_job

    work = Path(args.work_dir)
    job_dir = Path(tempfile.mkdtemp(dir=work, prefix="job-"))
    instance = job_dir / "instance"
    instance.mkdir()
    for i in range(3):
        (instance / f"{i:02d}.png").write_bytes(photo(i))
    # The diffusers script's defaults (see the module docstring).
    trainer = TrainerOptions(
        train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        lr_scheduler="constant",
        lr_warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_weight_decay=1e-2,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        mixed_precision="no",
        offset_noise=0.0,
        snr_gamma=None,
        random_flip=True,
        cache_latents=args.variant != "encode",
        keep_checkpoints=1,
        log_every_n_steps=1,
    )
    lora = args.variant == "lora"
    params = JobParams(
        base_model="bench",
        instance_prompt="a photo of sks dog",
        class_prompt="a photo of a dog",
        validation_prompt="",
        num_class_images=args.class_images,
        prior_loss_weight=1.0,
        max_train_steps=args.steps,
        learning_rate=1e-4 if lora else 5e-6,
        train_text_encoder=args.train_text_encoder and not lora,
        resolution=args.resolution,
        seed=0,
        checkpoint_interval=500,
        num_instance_images=3,
        kind="lora" if lora else "full",
        rank=4 if lora else 0,
        lora_alpha=4.0 if lora else 0.0,
        lora_layers=("to_k", "to_q", "to_v", "to_out.0") if lora else (),
        train_text_encoder_lora=args.train_text_encoder and lora,
        trainer=trainer,
        class_images=DrawSettings(batch_size=4, inference_steps=args.class_steps),
        validation=DrawSettings(),
    )
    runtime = WorkerRuntime(
        job_id="bench",
        base_source=args.model_dir,
        instance_dir=str(instance),
        class_cache_dir=str(work / "class-images"),
        export_dir=str(job_dir / "export"),
        accelerator="cpu",
        torch_threads=args.threads,
    )
    clock = StepClock()
    outcome = run_job(WorkerSpec(params, runtime), job_dir, clock, NoStop())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"outcome": outcome, "ends": clock.ends, "peak_rss_mb": peak_mb}))


def gaps(ends: list[float]) -> list[float]:
    """Seconds between consecutive step ends, the first gap (warm-up) left out."""
    return [b - a for a, b in itertools.pairwise(ends)][1:]


def run_once(args: argparse.Namespace, variant: str, model_dir: Path, work: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        f"--variant={variant}",
        f"--model-dir={model_dir}",
        f"--work-dir={work}",
        f"--steps={args.steps}",
        f"--resolution={args.resolution}",
        f"--batch-size={args.batch_size}",
        f"--threads={args.threads}",
        f"--class-images={args.class_images}",
        f"--class-steps={args.class_steps}",
    ]
    if args.train_text_encoder:
        command.append("--train-text-encoder")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} run failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["outcome"] != "exported" or len(result["ends"]) != args.steps:
        raise RuntimeError(f"{variant} run ended early: {result['outcome']}")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default="", help="a diffusers SD directory (default: the demo)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--resolution", type=int, default=32, help="training resolution (pixels)")
    p.add_argument("--batch-size", type=int, default=1, help="instance images per step")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--class-images", type=int, default=4, help="class-prior images")
    p.add_argument("--class-steps", type=int, default=10, help="denoising steps per class image")
    p.add_argument("--runs", type=int, default=3, help="runs per variant, alternating")
    p.add_argument(
        "--train-text-encoder",
        action="store_true",
        help="train the text encoder too (its LoRA adapters for the lora variant)",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="cached", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--work-dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = Path(args.model_dir) if args.model_dir else None
        if model_dir is None:
            from dreamsight_demo import sd as demo_model

            model_dir = demo_model.build(work / "sd-demo")
        encoder = "trained" if args.train_text_encoder else "frozen"
        print(
            f"model {model_dir}, {args.steps} steps at {args.resolution}px, batch "
            f"{args.batch_size} + {args.batch_size} class, {args.class_images} class images, "
            f"{args.threads} thread(s), text encoder {encoder}"
        )
        # Draw the class images once, outside the timed runs.
        run_once(replace_steps(args, 2), "cached", model_dir, work)
        steps: dict[str, list[float]] = {v: [] for v in VARIANTS}
        peaks: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for run in range(args.runs):
            order = VARIANTS[run % 3 :] + VARIANTS[: run % 3]
            for variant in order:
                result = run_once(args, variant, model_dir, work)
                run_gaps = gaps(result["ends"])
                steps[variant] += run_gaps
                peaks[variant].append(result["peak_rss_mb"])
                print(
                    f"run {run + 1} {variant:>7}: median {statistics.median(run_gaps):.4f} s/step, "
                    f"peak RSS {result['peak_rss_mb']:.0f} MB"
                )
        for variant in VARIANTS:
            print(
                f"{variant:>7}: median {statistics.median(steps[variant]):.4f} s/step over "
                f"{len(steps[variant])} steps, peak RSS {max(peaks[variant]):.0f} MB"
            )
        ratio = statistics.median(steps["encode"]) / statistics.median(steps["cached"])
        print(f"encode/cached s/step ratio: {ratio:.3f}")
        lora_ratio = statistics.median(steps["lora"]) / statistics.median(steps["cached"])
        print(f"lora/full (cached) s/step ratio: {lora_ratio:.3f}")
        print(
            f"bench dreambooth: s_per_step={statistics.median(steps['cached']):.4f} "
            f"peak_rss_mb={max(peaks['cached']):.0f} "
            f"lora_s_per_step={statistics.median(steps['lora']):.4f} "
            f"lora_peak_rss_mb={max(peaks['lora']):.0f}"
        )


def replace_steps(args: argparse.Namespace, steps: int) -> argparse.Namespace:
    """The same arguments with another step count."""
    return argparse.Namespace(**{**vars(args), "steps": steps})


if __name__ == "__main__":
    main()
