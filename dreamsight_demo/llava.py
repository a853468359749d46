"""Build the tiny LLaVA-Llama-3 demo model, offline and deterministically.

    python -m dreamsight_demo.llava DIR [--seed N]

The result is a Hugging Face directory that transformers and vLLM load like
xtuner/llava-llama-3-8b-v1_1-transformers: a CLIP vision tower, a two-layer
projector and a Llama text model, a byte-level BPE tokenizer with the Llama-3
special tokens and an ``<image>`` token, and the Llama-3 chat template. The
weights are random: it proves the plumbing and answers gibberish. The
directory carries a ``dreamsight_demo.json`` marker and a model card that say
so. Same seed, same bytes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dreamsight_demo.model_card import write_marker
from dreamsight_server import torch_compat

IMAGE_TOKEN = "<image>"
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|reserved_special_token_0|>",
    IMAGE_TOKEN,
]
IMAGE_SIZE = 112
PATCH_SIZE = 14
VOCAB_SIZE = 512
CONTEXT_LENGTH = 2048

# The Llama-3 chat template with images placed where the message puts them,
# as llava-llama-3 checkpoints ship it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

# A fixed corpus for the BPE merges, so the vocabulary is the same every time.
_CORPUS = [
    "What is in this image? Describe the picture in one sentence.",
    "The image shows a red circle, a green square and a blue triangle.",
    "A photo of a dog sitting on the grass next to a yellow ball.",
    "Read the text in the screenshot and answer the question.",
    "You are a helpful assistant that describes images accurately.",
    "There are two cats, one white and one black, on a wooden table.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    '{"answer": "yes", "colour": "red", "shape": "circle", "count": 3}',
]


def build_tokenizer() -> Any:
    """A byte-level BPE tokenizer with Llama-3's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(LLAMA3_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        additional_special_tokens=LLAMA3_SPECIAL_TOKENS,
        model_max_length=CONTEXT_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _nest_vision_keys(weights: Path) -> None:
    """Rename ``vision_tower.*`` to ``vision_tower.vision_model.*``.

    transformers 5 saves the CLIP tower's keys without the ``vision_model``
    level that llava-hf checkpoints have; vLLM's loader expects that level and
    transformers accepts both.
    """
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    renamed = {
        ("vision_tower.vision_model." + k[len("vision_tower.") :])
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
        else k: v
        for k, v in tensors.items()
    }
    save_file(renamed, weights, metadata={"format": "pt"})


def build(out_dir: Path, seed: int = 0) -> Path:
    """Write the demo model into out_dir and return it."""
    torch_compat.install()
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab_size = len(tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")]

    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32: the smallest vLLM's attention accepts
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=64,
        initializer_range=0.2,  # large enough that answers depend on the image
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=CONTEXT_LENGTH,
        rope_theta=500000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    image_seq_length = (IMAGE_SIZE // PATCH_SIZE) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=image_seq_length,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir)
    _nest_vision_keys(out_dir / "model.safetensors")

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    write_marker(
        out_dir,
        kind="llava",
        seed=seed,
        builder="python -m dreamsight_demo.llava",
        knows="nothing: random weights, the answers are gibberish",
        details={
            "image_size": IMAGE_SIZE,
            "image_tokens": image_seq_length,
            "context_length": CONTEXT_LENGTH,
            "vocab_size": vocab_size,
        },
    )
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = parser.parse_args(argv)
    out = build(args.out_dir, seed=args.seed)
    print(json.dumps({"model": str(out), "demo": True}))


if __name__ == "__main__":
    main()
