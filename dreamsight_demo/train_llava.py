"""Train the vision demo model: a tiny LLaVA-Llama-3 that knows shapes.

    python -m dreamsight_demo.train_llava OUT [--threads N] [--steps N] [--seed N] [--set K=V ...]

Starts from the layout of :mod:`dreamsight_demo.llava` (CLIP tower at
112 px, patch 14, 64 image tokens; tiny Llama; byte-level BPE with the
Llama-3 special tokens and ``<image>``; the Llama-3 chat template) and
teaches it, with plain PyTorch on the CPU, to answer questions about images
from :mod:`shapes`: one circle, square or triangle in red, green, blue or
yellow on white. It learns "What colour is the shape?", "What shape is it?"
and "Describe the image." (and a few paraphrases of each); it knows nothing
else. Seeded, single-process, with the torch thread count pinned: the same
command on the same machine writes the same bytes. The result carries the
demo marker, a model card and ``manifest.json`` (the training configuration,
held-out accuracy and the sha256 of every file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dreamsight_demo import llava as demo_model
from dreamsight_demo.model_card import write_marker
from dreamsight_demo.shapes import scenes
from dreamsight_demo.weights import overrides, write_manifest
from dreamsight_server import torch_compat

BUILDER = "python -m dreamsight_demo.train_llava"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (recorded in the manifest)."""

    seed: int = 0
    threads: int = 1
    steps: int = 1800
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    pool_images: int = 3000
    """Distinct training images (each asked several questions over training)."""
    degraded_fraction: float = 0.5
    """Share of training images blurred, noised and tinted like generated ones."""
    image_sizes: tuple[int, ...] = (48, 64, 96, 112, 128, 160)
    text_hidden: int = 64
    text_layers: int = 2
    vision_hidden: int = 64
    vision_layers: int = 3
    initializer_range: float = 0.02
    eval_seed: int = 1000
    eval_questions: int = 300


def build_model(out_dir: Path, config: TrainConfig) -> tuple[Any, Any]:
    """The untrained model and processor in the demo layout (files in out_dir)."""
    import torch
    from transformers import AutoProcessor, GenerationConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    # The random demo model's files give the tokenizer, processor and config
    # layout that vLLM loads; the sizes and initialisation are set here.
    demo_model.build(out_dir, seed=config.seed)
    llava = LlavaConfig.from_pretrained(out_dir)
    llava.initializer_range = config.initializer_range
    text, vision = llava.text_config, llava.vision_config
    text.hidden_size = config.text_hidden
    text.intermediate_size = 2 * config.text_hidden
    text.num_hidden_layers = config.text_layers
    text.head_dim = 32  # the smallest vLLM's attention accepts
    text.num_attention_heads = config.text_hidden // 32
    text.initializer_range = config.initializer_range
    vision.hidden_size = config.vision_hidden
    vision.intermediate_size = 2 * config.vision_hidden
    vision.num_hidden_layers = config.vision_layers
    vision.num_attention_heads = config.vision_hidden // 32
    vision.projection_dim = config.vision_hidden
    vision.initializer_range = config.initializer_range
    torch.manual_seed(config.seed)
    model = Llava(llava)
    processor = AutoProcessor.from_pretrained(out_dir)
    tok = processor.tokenizer
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")]
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=tok.pad_token_id
    )
    return model, processor


class Batches:
    """Training examples: a pool of processed images, questions drawn per step."""

    def __init__(self, processor: Any, config: TrainConfig) -> None:
        import torch

        self.rng = np.random.default_rng(config.seed)
        self.tokenizer = processor.tokenizer
        self.image_token = self.tokenizer.convert_tokens_to_ids(demo_model.IMAGE_TOKEN)
        self.image_tokens = (demo_model.IMAGE_SIZE // demo_model.PATCH_SIZE) ** 2
        self.scenes: list[scenes.Scene] = []
        images = []
        for _ in range(config.pool_images):
            scene = scenes.sample_scene(self.rng)
            size = config.image_sizes[int(self.rng.integers(len(config.image_sizes)))]
            image = scenes.render(scene, size)
            if self.rng.random() < config.degraded_fraction:
                image = scenes.degrade(image, self.rng, float(self.rng.uniform(0.3, 1.0)))
            self.scenes.append(scene)
            images.append(image)
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        self.pixels = pixels.to(torch.float16)
        self._prompts: dict[str, list[int]] = {}
        self._answers: dict[str, list[int]] = {}

    def prompt_ids(self, question: str) -> list[int]:
        """The chat prompt for one image and a question, image token expanded."""
        if question not in self._prompts:
            text = self.tokenizer.apply_chat_template(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": question}],
                    }
                ],
                add_generation_prompt=True,
                tokenize=False,
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            at = ids.index(self.image_token)
            self._prompts[question] = (
                ids[:at] + [self.image_token] * self.image_tokens + ids[at + 1 :]
            )
        return self._prompts[question]

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's tokens and the end-of-turn token."""
        if answer not in self._answers:
            ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            self._answers[answer] = [*ids, self.tokenizer.convert_tokens_to_ids("<|eot_id|>")]
        return self._answers[answer]

    def sample(self, batch_size: int) -> dict[str, Any]:
        """One batch: input ids, labels on the answers only, pixels."""
        import torch

        index = self.rng.integers(len(self.scenes), size=batch_size)
        rows, labels = [], []
        for i in index:
            kind = scenes.QUESTION_KINDS[int(self.rng.integers(3))]
            options = scenes.QUESTIONS[kind]
            # The canonical wording half the time, a paraphrase otherwise.
            pick = 0 if self.rng.random() < 0.5 else int(self.rng.integers(len(options)))
            prompt = self.prompt_ids(options[pick])
            answer = self.answer_ids(scenes.answer(self.scenes[int(i)], kind))
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([r + [-100] * (width - len(r)) for r in labels]),
            "pixel_values": self.pixels[torch.from_numpy(index)].float(),
        }


def train(model: Any, batches: Batches, config: TrainConfig, log_every: int = 100) -> list[float]:
    """AdamW with warm-up and cosine decay; returns the logged losses."""
    import torch

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )

    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    started = time.monotonic()
    for step in range(config.steps):
        loss = model(**batches.sample(config.batch_size)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if (step + 1) % log_every == 0:
            mean = sum(losses[-log_every:]) / log_every
            took = time.monotonic() - started
            print(f"step {step + 1}/{config.steps} loss {mean:.4f} ({took:.0f} s)", flush=True)
    model.eval()
    return losses


def evaluate(model: Any, processor: Any, config: TrainConfig) -> dict[str, float]:
    """Greedy answers (transformers) to held-out canonical questions, graded."""
    import torch

    held_out = scenes.questions(config.eval_seed, config.eval_questions)
    correct: dict[str, list[bool]] = {kind: [] for kind in scenes.QUESTION_KINDS}
    tokenizer = processor.tokenizer
    for q in held_out:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.text}]}
        ]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=q.image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct[q.kind].append(scenes.grade(q.scene, q.kind, reply))
    every = [c for kind in correct.values() for c in kind]
    result = {kind: sum(c) / len(c) for kind, c in correct.items()}
    result["all"] = sum(every) / len(every)
    return result


def save(
    model: Any, out_dir: Path, config: TrainConfig, accuracy: dict[str, float], took: float
) -> None:
    """Weights in the layout vLLM loads, marker, model card and manifest."""
    model.save_pretrained(out_dir)
    demo_model._nest_vision_keys(out_dir / "model.safetensors")
    write_marker(
        out_dir,
        kind="llava",
        seed=config.seed,
        builder=BUILDER,
        knows=(
            "one thing: the colour (red, green, blue, yellow) and shape (circle, square, "
            "triangle) of a single flat shape on white"
        ),
        weights="trained",
        details={
            "image_size": demo_model.IMAGE_SIZE,
            "image_tokens": (demo_model.IMAGE_SIZE // demo_model.PATCH_SIZE) ** 2,
            "context_length": demo_model.CONTEXT_LENGTH,
            "parameters": sum(p.numel() for p in model.parameters()),
            "questions": "; ".join(scenes.CANONICAL_QUESTIONS.values()),
            "heldout_accuracy": round(accuracy["all"], 4),
        },
        training=[
            f"{config.steps} AdamW steps of {config.batch_size} questions on "
            f"{config.pool_images} synthetic images (dreamsight_demo.shapes.scenes, "
            f"seed {config.seed}), "
            f"{config.threads} CPU thread(s), {took / 60:.1f} minutes",
            f"held-out accuracy (transformers, greedy, {config.eval_questions} questions): "
            + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()),
        ],
    )
    write_manifest(
        out_dir,
        builder=BUILDER,
        config=dataclasses.asdict(config),
        results={"heldout_accuracy": accuracy, "train_seconds": round(took)},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the model into")
    defaults = TrainConfig()
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    args = parser.parse_args(argv)
    config = dataclasses.replace(
        defaults,
        threads=args.threads,
        steps=args.steps,
        seed=args.seed,
        **overrides(TrainConfig, args.set),
    )
    torch_compat.install()
    import torch

    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    started = time.monotonic()
    model, processor = build_model(args.out_dir, config)
    batches = Batches(processor, config)
    print(f"{len(batches.scenes)} training images ready ({time.monotonic() - started:.0f} s)")
    train(model, batches, config)
    took = time.monotonic() - started
    accuracy = evaluate(model, processor, config)
    print(json.dumps({"heldout_accuracy": accuracy, "train_seconds": round(took)}))
    save(model, args.out_dir, config, accuracy, took)


if __name__ == "__main__":
    main()
