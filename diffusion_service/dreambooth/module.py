"""The DreamBooth LightningModule: the noise-prediction loss with class priors.

The loss of a batch is the diffusers script's: mean squared error between
the UNet's prediction and its target (the noise, or the velocity for
v-prediction models) on the instance half, optionally Min-SNR weighted,
plus ``prior_loss_weight`` times the plain error on the class half when
prior preservation is on.

A full tune trains every UNet weight, the text encoder's too when the job
asks for it. A LoRA tune freezes both and trains peft adapters added to
them (``add_adapter`` with a ``LoraConfig``, as diffusers'
``train_dreambooth_lora.py``: gaussian init, so the adapted model starts as
the base). The VAE is always frozen: no gradients, in eval mode, outside
the optimizer. Checkpoints hold only what is trained (the adapters of a
LoRA tune); frozen weights come from the base model on resume and export.

Both prompts are encoded once per step in one text-encoder pass and each
example takes its prompt's row: the same gradients as encoding every
example, at the cost of two.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from diffusion_service.dreambooth.params import JobParams


def add_lora(unet: Any, text_encoder: Any, params: JobParams) -> None:
    """Freeze the UNet (and text encoder) and give them trainable peft adapters."""
    from peft import LoraConfig

    from diffusion_service.dreambooth.params import TEXT_ENCODER_LORA_LAYERS

    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    config = {"r": params.rank, "lora_alpha": params.lora_alpha, "init_lora_weights": "gaussian"}
    unet.add_adapter(LoraConfig(target_modules=list(params.lora_layers), **config))
    if params.train_text_encoder_lora:
        text_encoder.add_adapter(
            LoraConfig(target_modules=list(TEXT_ENCODER_LORA_LAYERS), **config)
        )


# pytorch_lightning is untyped to mypy here (see pyproject): a subclass of Any.
class DreamBoothModule(pl.LightningModule):  # type: ignore[misc]
    """UNet (+ text encoder) fine-tuning with class-prior preservation."""

    def __init__(
        self,
        unet: Any,
        text_encoder: Any,
        vae: Any,
        noise_scheduler: Any,
        prompt_ids: torch.Tensor,
        params: JobParams,
    ) -> None:
        """``prompt_ids`` holds the tokenized instance prompt, then the class prompt."""
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.vae = vae
        self.noise_scheduler = noise_scheduler
        self.params = params
        self.register_buffer("prompt_ids", prompt_ids, persistent=False)
        self.vae.requires_grad_(False)
        if params.lora:
            add_lora(unet, text_encoder, params)
        else:
            self.text_encoder.requires_grad_(params.train_text_encoder)
            self.unet.requires_grad_(True)
        if params.trainer.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.trains_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()
        # Frozen weights stay out of checkpoints (see on_save_checkpoint).
        self.strict_loading = False
        self.scaling_factor = float(vae.config.scaling_factor)
        self.train()

    @property
    def trains_text_encoder(self) -> bool:
        """Whether the text encoder (or its adapters) is trained."""
        p = self.params
        return p.train_text_encoder_lora if p.lora else p.train_text_encoder

    def train(self, mode: bool = True) -> DreamBoothModule:
        """Lightning puts the module in train mode; the frozen parts stay in eval."""
        super().train(mode)
        self.vae.eval()
        if not self.trains_text_encoder:
            self.text_encoder.eval()
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates: the UNet (or its adapters), and the
        text encoder (or its adapters) if trained."""
        return [p for p in self.parameters() if p.requires_grad]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trained weights in checkpoints (frozen ones come from the base)."""
        if self.params.lora:
            trained = {name for name, p in self.named_parameters() if p.requires_grad}
            kept = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
        else:
            frozen = ("vae.",) if self.trains_text_encoder else ("vae.", "text_encoder.")
            kept = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(frozen)}
        checkpoint["state_dict"] = kept

    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """Scaled latents of the batch: sampled from the cached distribution,
        or encoded from pixels by the frozen VAE."""
        if "mean" in batch:
            mean, std = batch["mean"], batch["std"]
            sample: torch.Tensor = mean + std * torch.randn_like(mean)
        else:
            with torch.no_grad():
                sample = self.vae.encode(batch["pixels"].to(self.vae.dtype)).latent_dist.sample()
        return sample.float() * self.scaling_factor

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``loss`` (what is optimized), ``instance_loss`` and, with priors, ``prior_loss``."""
        latents = self.latents(batch)
        num_instance = int(batch["num_instance"])
        noise = torch.randn_like(latents)
        if self.params.trainer.offset_noise > 0:
            noise = noise + self.params.trainer.offset_noise * torch.randn(
                latents.shape[0], latents.shape[1], 1, 1, device=latents.device
            )
        config = self.noise_scheduler.config
        timesteps = torch.randint(
            0, config.num_train_timesteps, (latents.shape[0],), device=latents.device
        ).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        # Row 0 is the instance prompt, row 1 the class prompt.
        with torch.set_grad_enabled(self.trains_text_encoder and torch.is_grad_enabled()):
            encoded = self.text_encoder(self.prompt_ids)[0]
        which = torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device)
        which[num_instance:] = 1
        prediction = self.unet(noisy, timesteps, encoded[which]).sample
        if config.prediction_type == "epsilon":
            target = noise
        elif config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction type {config.prediction_type!r}")
        pred, pred_prior = prediction[:num_instance], prediction[num_instance:]
        tgt, tgt_prior = target[:num_instance], target[num_instance:]
        instance = self._instance_loss(pred.float(), tgt.float(), timesteps[:num_instance])
        out = {"instance_loss": instance, "loss": instance}
        if pred_prior.shape[0]:
            prior = F.mse_loss(pred_prior.float(), tgt_prior.float(), reduction="mean")
            out["prior_loss"] = prior
            out["loss"] = instance + self.params.prior_loss_weight * prior
        return out

    def _instance_loss(
        self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        gamma = self.params.trainer.snr_gamma
        if gamma is None:
            return F.mse_loss(pred, target, reduction="mean")
        # Min-SNR weighting (arXiv:2303.09556), as the diffusers scripts: min(SNR, gamma)
        # over the objective's own SNR weight, SNR for epsilon and SNR + 1 for v. Not
        # min(SNR, gamma) / SNR + 1 for v (their older form): a zero-terminal-SNR
        # schedule (the shapes model's) has SNR 0 at its last timestep, where that is 0/0.
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.noise_scheduler, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            weight = torch.clamp(snr, max=gamma) / (snr + 1)
        else:
            weight = torch.clamp(snr, max=gamma) / snr
        loss = F.mse_loss(pred, target, reduction="none")
        weighted: torch.Tensor = (loss.mean(dim=list(range(1, loss.ndim))) * weight).mean()
        return weighted

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch)
        size = int(batch["num_instance"])
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), on_step=True, batch_size=size)
        optimizer: Any = self.optimizers()
        self.log("train/lr", float(optimizer.param_groups[0]["lr"]), on_step=True, batch_size=size)
        return losses["loss"]

    def configure_optimizers(self) -> Any:
        from diffusers.optimization import get_scheduler

        t = self.params.trainer
        optimizer = torch.optim.AdamW(
            self.trainable_parameters(),
            lr=self.params.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.adam_weight_decay,
            eps=t.adam_epsilon,
        )
        scheduler = get_scheduler(
            t.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=self.params.warmup_steps,
            num_training_steps=self.params.max_train_steps,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
