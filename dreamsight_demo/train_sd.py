"""Train the diffusion demo model: a tiny Stable Diffusion that draws shapes.

    python -m dreamsight_demo.train_sd OUT [--threads N] [--seed N] [--set KEY=VALUE ...]

A diffusers Stable Diffusion directory (VAE, CLIP text encoder with a small
CLIP BPE vocabulary, UNet, DPM-Solver++ scheduler) making 64x64 images,
trained from scratch on the CPU in two stages:

1. the VAE, as an autoencoder (L1, latents lightly noised), on a *broad* world:
   circles, squares, triangles and stars, in the named colours and purple
   and sometimes any hue, plain or striped, one or two to an image, so that
   it can draw things the UNet has not learned (a DreamBooth subject, say);
2. the UNet and the text encoder together, on latents of the *base* world
   (one circle, square or triangle in red, green, blue or yellow on white)
   captioned "a red circle", "a photo of a blue square", "a yellow shape",
   "a triangle", "a shape", ... and 10% empty captions for classifier-free
   guidance; v-prediction on a zero-terminal-SNR schedule (so the prompt,
   not the starting noise, picks the colour); an EMA of the weights is what
   is saved.

Seeded, single-process, torch threads pinned: the same command on the same
machine writes the same weights. Quality is then measured with the
:mod:`dreamsight_demo.shapes.judge` on generated images and written, with the training
configuration and the sha256 of every file, into ``manifest.json``.
"""

from __future__ import annotations

import argparse
import colorsys
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dreamsight_demo.model_card import write_marker
from dreamsight_demo.sd import write_clip_tokenizer_files
from dreamsight_demo.shapes import scenes
from dreamsight_demo.shapes.judge import judge as judge_image
from dreamsight_demo.weights import overrides, write_manifest
from dreamsight_server import torch_compat

BUILDER = "python -m dreamsight_demo.train_sd"
TOKENIZER_MAX_LENGTH = 77
WORDS = (
    "a an of the photo drawing picture image red green blue yellow purple circle square "
    "triangle star shape shapes on white background with stripes striped sks"
).split()
CAPTION_TEMPLATES = (
    "a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a {colour} {shape} on a white background",
    "a drawing of a {colour} {shape}",
    "an image of a {colour} {shape}",
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (recorded in the manifest)."""

    seed: int = 0
    threads: int = 1
    resolution: int = 64
    vae_channels: tuple[int, ...] = (8, 16, 32)
    vae_norm_groups: int = 4
    """Few groups: one channel per group would normalise the colour away."""
    latent_channels: int = 4
    vae_steps: int = 1500
    vae_batch_size: int = 16
    vae_learning_rate: float = 2e-3
    vae_latent_noise: float = 0.1
    unet_channels: tuple[int, ...] = (32, 64)
    text_time_embedding: bool = True
    """Add the attention-pooled prompt to the timestep embedding, so every
    ResNet block (not only the cross-attention ones) hears it: colour is global."""
    text_hidden: int = 64
    text_layers: int = 2
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.995
    prediction_type: str = "v_prediction"
    zero_terminal_snr: bool = True
    """Rescale the betas so the last step is pure noise (Lin et al. 2023): with
    SD's schedule the faint signal left at the last step lets the starting
    noise pick the colour, whatever the prompt says."""
    snr_gamma: float = 0.0
    """Min-SNR loss weighting gamma for epsilon prediction; 0 is off."""
    uncond_fraction: float = 0.1
    partial_caption_fraction: float = 0.3
    """Captions naming only the colour, only the shape, or neither ("a shape")."""
    pool_images: int = 6000
    """Distinct base-world images whose latents the UNet trains on."""
    eval_images_per_prompt: int = 16
    eval_steps: int = 20
    eval_guidance: float = 7.5


def write_tokenizer(out_dir: Path) -> Any:
    """A CLIP BPE tokenizer: every byte, and merges that spell WORDS whole."""
    from transformers import CLIPTokenizer

    tok_dir = out_dir / "tokenizer"
    write_clip_tokenizer_files(tok_dir, WORDS)
    return CLIPTokenizer(
        str(tok_dir / "vocab.json"),
        str(tok_dir / "merges.txt"),
        model_max_length=TOKENIZER_MAX_LENGTH,
    )


def build_parts(tokenizer: Any, config: TrainConfig) -> dict[str, Any]:
    """Untrained VAE, text encoder and UNet, and the noise schedules."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(config.seed)
    levels = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=config.vae_norm_groups,
        sample_size=config.resolution,
        mid_block_add_attention=False,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden,
            intermediate_size=2 * config.text_hidden,
            num_hidden_layers=config.text_layers,
            num_attention_heads=4,
            max_position_embeddings=TOKENIZER_MAX_LENGTH,
            projection_dim=config.text_hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Cross-attention only below the top level: where the shape is decided.
    down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (len(config.unet_channels) - 1)
    up = ["CrossAttnUpBlock2D"] * (len(config.unet_channels) - 1) + ["UpBlock2D"]
    unet = UNet2DConditionModel(
        sample_size=config.resolution // 2 ** (levels - 1),
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        cross_attention_dim=config.text_hidden,
        attention_head_dim=4,
        addition_embed_type="text" if config.text_time_embedding else None,
        addition_embed_type_num_heads=4,
        norm_num_groups=min(32, min(config.unet_channels)),
    )
    schedule: dict[str, Any] = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": config.prediction_type,
        "rescale_betas_zero_snr": config.zero_terminal_snr,
        # Sampling must start at the last (pure noise) step.
        "timestep_spacing": "trailing" if config.zero_terminal_snr else "leading",
    }
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "unet": unet,
        "noise": DDPMScheduler(**schedule, clip_sample=False),
        "sampler": DPMSolverMultistepScheduler(**schedule, steps_offset=1),
    }


def broad_image(rng: np.random.Generator, size: int) -> Any:
    """One or two shapes of any kind, plain or striped, mostly in the named
    colours and sometimes in any hue: what the VAE learns to draw. (Named
    colours alone train worse: the decoder collapses some of them.)"""
    count = 1 if rng.random() < 0.8 else 2
    drawn = []
    for _ in range(count):
        if rng.random() < 0.7:
            palette = scenes.ALL_COLOURS
        else:
            hue, sat, val = rng.random(), rng.uniform(0.5, 1), rng.uniform(0.45, 0.95)
            r, g, b = (round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val))
            palette = {"any": (r, g, b)}
        scene = scenes.sample_scene(
            rng, shapes=scenes.ALL_SHAPES, colours=palette, min_size=0.2, max_size=0.8,
            stripes=bool(rng.random() < 0.25),
        )  # fmt: skip
        drawn.append(scene)
    return scenes.render_all(drawn, size)


def to_tensor(images: list[Any]) -> Any:
    """PIL images to an N x 3 x H x W float tensor in [-1, 1]."""
    import torch

    array = np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) for i in images])
    return torch.from_numpy(array / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def train_vae(vae: Any, config: TrainConfig, rng: np.random.Generator) -> float:
    """Autoencoder training; returns the final mean L1 error (0..2 scale).

    The latent is the encoder's mean plus a little noise (``vae_latent_noise``
    of its spread), so that the decoder forgives the diffusion model's small
    errors. No KL term: with Adam even a tiny one drives the log-variance up
    until sampling noise hides the colour from the decoder. The log-variance
    output is set afterwards to a constant, small spread.
    """
    import torch

    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.vae_steps)
    vae.train()
    recent: list[float] = []
    started = time.monotonic()
    for step in range(config.vae_steps):
        images = [broad_image(rng, config.resolution) for _ in range(config.vae_batch_size)]
        x = to_tensor(images)
        mean = vae.encode(x).latent_dist.mean
        spread = mean.detach().std()
        recon = vae.decode(mean + config.vae_latent_noise * spread * torch.randn_like(mean)).sample
        l1 = (recon - x).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        l1.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        decay.step()
        recent = [*recent[-49:], float(l1.detach())]
        if (step + 1) % 100 == 0:
            took = time.monotonic() - started
            print(
                f"vae step {step + 1}/{config.vae_steps} l1 {np.mean(recent):.4f} ({took:.0f} s)",
                flush=True,
            )
    vae.eval()
    with torch.no_grad():
        # The last layer before the (mean, log-variance) split.
        last = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
        logvar = slice(config.latent_channels, 2 * config.latent_channels)
        last.weight[logvar].zero_()
        std = config.vae_latent_noise * float(spread) / 4
        last.bias[logvar].fill_(2 * math.log(std))
    return float(np.mean(recent))


class Pool:
    """Base-world scenes and their latent distributions (the VAE is frozen)."""

    def __init__(self, vae: Any, config: TrainConfig, rng: np.random.Generator) -> None:
        import torch

        self.scenes = [scenes.sample_scene(rng) for _ in range(config.pool_images)]
        means, stds = [], []
        with torch.no_grad():
            for start in range(0, len(self.scenes), 64):
                chunk = self.scenes[start : start + 64]
                x = to_tensor([scenes.render(s, config.resolution) for s in chunk])
                dist = vae.encode(x).latent_dist
                means.append(dist.mean)
                stds.append(dist.std)
        self.mean, self.std = torch.cat(means), torch.cat(stds)
        # Latents scaled to unit variance, as Stable Diffusion's 0.18215 does.
        self.scaling_factor = float(1.0 / self.mean.std())


def caption(scene: scenes.Scene, rng: np.random.Generator, config: TrainConfig) -> str:
    """A caption for one training example (sometimes partial or empty)."""
    draw = rng.random()
    if draw < config.uncond_fraction:
        return ""
    if draw < config.uncond_fraction + config.partial_caption_fraction:
        form = int(rng.integers(3))
        return (f"a {scene.colour} shape", f"a {scene.shape}", "a shape")[form]
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    return template.format(colour=scene.colour, shape=scene.shape)


class Ema:
    """An exponential moving average of some modules' parameters."""

    def __init__(self, modules: list[Any], decay: float) -> None:
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    def update(self) -> None:
        import torch

        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for shadow, param in zip(self.shadow, self.params, strict=True):
                shadow.lerp_(param.detach(), 1 - decay)

    def copy_to(self, modules: list[Any]) -> list[Any]:
        """Copies of the modules holding the averaged weights."""
        import torch

        copies = [copy.deepcopy(m) for m in modules]
        params = [p for m in copies for p in m.parameters()]
        with torch.no_grad():
            for param, shadow in zip(params, self.shadow, strict=True):
                param.copy_(shadow)
        return copies


def train_diffusion(
    parts: dict[str, Any], tokenizer: Any, pool: Pool, config: TrainConfig, rng: np.random.Generator
) -> tuple[Any, Any, list[float]]:
    """UNet and text encoder from scratch; returns their EMA copies and losses."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    unet, text_encoder, noise_scheduler = parts["unet"], parts["text_encoder"], parts["noise"]
    modules = [unet, text_encoder]
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)

    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ema = Ema(modules, config.ema_decay)
    token_cache: dict[str, torch.Tensor] = {}

    def ids(text: str) -> torch.Tensor:
        if text not in token_cache:
            token_cache[text] = tokenizer(
                text, padding="max_length", max_length=TOKENIZER_MAX_LENGTH, return_tensors="pt"
            ).input_ids[0]
        return token_cache[text]

    for m in modules:
        m.train()
    losses: list[float] = []
    started = time.monotonic()
    for step in range(config.steps):
        index = torch.from_numpy(rng.integers(len(pool.scenes), size=config.batch_size))
        mean, std = pool.mean[index], pool.std[index]
        latents = (mean + std * torch.randn_like(mean)) * pool.scaling_factor
        prompts = torch.stack([ids(caption(pool.scenes[int(i)], rng, config)) for i in index])
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (config.batch_size,))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        encoded = text_encoder(prompts)[0]
        prediction = unet(noisy, timesteps, encoded).sample
        if config.prediction_type == "epsilon":
            target = noise
        else:
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        per_example = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
        if config.snr_gamma > 0 and config.prediction_type == "epsilon":
            snr = compute_snr(noise_scheduler, timesteps)
            per_example = per_example * torch.clamp(snr, max=config.snr_gamma) / snr
        loss = per_example.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.update()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            took = time.monotonic() - started
            mean_loss = float(np.mean(losses[-100:]))
            print(
                f"unet step {step + 1}/{config.steps} loss {mean_loss:.4f} ({took:.0f} s)",
                flush=True,
            )
    ema_unet, ema_text = ema.copy_to(modules)
    return ema_unet.eval(), ema_text.eval(), losses


def pipeline(parts: dict[str, Any], tokenizer: Any, unet: Any, text_encoder: Any) -> Any:
    """The Stable Diffusion pipeline around trained parts."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=parts["sampler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluate(pipe: Any, config: TrainConfig, seed: int = 10_000) -> dict[str, Any]:
    """Judge images drawn for every base prompt ("a red circle", ...)."""
    import torch

    colour_ok = shape_ok = total = 0
    per_prompt: dict[str, float] = {}
    for colour in scenes.COLOURS:
        for shape in scenes.SHAPES:
            prompt = f"a {colour} {shape}"
            n = config.eval_images_per_prompt
            generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
            with torch.no_grad():
                images = pipe(
                    [prompt] * n,
                    num_inference_steps=config.eval_steps,
                    guidance_scale=config.eval_guidance,
                    generator=generators,
                ).images
            verdicts = [judge_image(image) for image in images]
            colour_hits = sum(v.colour == colour for v in verdicts)
            shape_hits = sum(v.shape == shape for v in verdicts)
            both = sum(v.matches(colour, shape) for v in verdicts)
            colour_ok, shape_ok, total = colour_ok + colour_hits, shape_ok + shape_hits, total + n
            per_prompt[prompt] = both / n
    return {
        "images": total,
        "colour": colour_ok / total,
        "shape": shape_ok / total,
        "per_prompt_both": per_prompt,
        "steps": config.eval_steps,
        "guidance_scale": config.eval_guidance,
    }


def subject_reconstruction(vae: Any, config: TrainConfig) -> float:
    """Share of DreamBooth-subject photos the VAE gives back recognisably."""
    import torch

    photos = scenes.subject_images(seed=7, count=16, size=config.resolution)
    with torch.no_grad():
        latents = vae.encode(to_tensor(photos)).latent_dist.mean
        out = vae.decode(latents).sample
    pixels = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    from PIL import Image

    verdicts = [judge_image(Image.fromarray(p)) for p in pixels]
    hits = [v.matches(scenes.SUBJECT_COLOUR, scenes.SUBJECT_SHAPE) for v in verdicts]
    return sum(hits) / len(hits)


def save(
    pipe: Any, out_dir: Path, config: TrainConfig, results: dict[str, Any], took: float
) -> None:
    """The pipeline, the demo marker, a model card and the manifest."""
    pipe.save_pretrained(out_dir)
    quality = results["quality"]
    write_marker(
        out_dir,
        kind="stable-diffusion",
        seed=config.seed,
        builder=BUILDER,
        knows=(
            "how to draw one circle, square or triangle in red, green, blue or yellow on "
            'white, from prompts like "a red circle" (and "a shape", "a blue shape", "a '
            'triangle")'
        ),
        weights="trained",
        details={
            "resolution": config.resolution,
            "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
            "judged_colour_accuracy": round(quality["colour"], 4),
            "judged_shape_accuracy": round(quality["shape"], 4),
        },
        training=[
            f"VAE: {config.vae_steps} steps of {config.vae_batch_size} broad-world images "
            "(four shapes, any hue, plain or striped)",
            f"UNet + text encoder: {config.steps} steps of {config.batch_size} latents of "
            f"{config.pool_images} base-world images, EMA {config.ema_decay}",
            f"{config.threads} CPU thread(s), {took / 60:.1f} minutes in all, seed {config.seed}",
            f"judged on {quality['images']} images ({quality['steps']} steps, guidance "
            f"{quality['guidance_scale']}): colour {quality['colour']:.1%}, "
            f"shape {quality['shape']:.1%}",
        ],
    )
    write_manifest(out_dir, builder=BUILDER, config=dataclasses.asdict(config), results=results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the pipeline into")
    defaults = TrainConfig()
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    args = parser.parse_args(argv)
    config = dataclasses.replace(
        defaults, threads=args.threads, seed=args.seed, **overrides(TrainConfig, args.set)
    )
    torch_compat.install()
    import torch

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    started = time.monotonic()
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(out_dir)
    parts = build_parts(tokenizer, config)
    vae_l1 = train_vae(parts["vae"], config, rng)
    parts["vae"].requires_grad_(False)
    subject = subject_reconstruction(parts["vae"], config)
    print(f"vae l1 {vae_l1:.4f}; subject photos kept recognisable: {subject:.0%}")
    pool = Pool(parts["vae"], config, rng)
    parts["vae"].register_to_config(scaling_factor=pool.scaling_factor)
    unet, text_encoder, losses = train_diffusion(parts, tokenizer, pool, config, rng)
    took = time.monotonic() - started
    pipe = pipeline(parts, tokenizer, unet, text_encoder)
    quality = evaluate(pipe, config)
    results = {
        "quality": quality,
        "vae_l1": round(vae_l1, 5),
        "vae_subject_recognisable": subject,
        "final_loss": round(float(np.mean(losses[-200:])), 5),
        "train_seconds": round(took),
    }
    print(json.dumps(results))
    save(pipe, out_dir, config, results, took)


if __name__ == "__main__":
    main()
