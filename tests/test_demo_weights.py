"""The trained demo models committed under models/: their files match the
manifest's hashes and the trainers' configuration, their layout is what vLLM
and diffusers load, and the services put them in place of random demo models.

CI does not retrain; ``python -m dreamsight_demo.train_llava models/llava-shapes``
and ``python -m dreamsight_demo.train_sd models/sd-shapes`` do.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from dreamsight_demo import train_llava as llava_train
from dreamsight_demo import train_sd as sd_train
from dreamsight_demo import weights as demo_weights
from dreamsight_server.demo_marker import read_marker

LLAVA = demo_weights.COMMITTED_ROOT / "llava-shapes"
SD = demo_weights.COMMITTED_ROOT / "sd-shapes"
TRAINERS: dict[Path, Any] = {LLAVA: llava_train, SD: sd_train}


@pytest.mark.parametrize("model_dir", [LLAVA, SD], ids=["llava-shapes", "sd-shapes"])
def test_committed_files_match_the_manifest(model_dir: Path) -> None:
    assert demo_weights.verify(model_dir) == []
    total = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    assert total < 8 * 1024 * 1024, "keep the committed weights small"


@pytest.mark.parametrize("model_dir", [LLAVA, SD], ids=["llava-shapes", "sd-shapes"])
def test_manifest_records_the_trainers_configuration(model_dir: Path) -> None:
    """Changing a trainer's defaults means retraining and committing again."""
    manifest = demo_weights.read_manifest(model_dir)
    trainer = TRAINERS[model_dir]
    expected = json.loads(json.dumps(dataclasses.asdict(trainer.TrainConfig())))
    assert manifest["config"] == expected
    assert manifest["builder"] == trainer.BUILDER


def test_recorded_quality_meets_the_targets() -> None:
    vision = demo_weights.read_manifest(LLAVA)["results"]["heldout_accuracy"]
    assert vision["all"] >= 0.98
    drawn = demo_weights.read_manifest(SD)["results"]["quality"]
    assert drawn["colour"] >= 0.95 and drawn["shape"] >= 0.85


@pytest.mark.parametrize(
    ("model_dir", "kind"), [(LLAVA, "llava"), (SD, "stable-diffusion")], ids=["llava", "sd"]
)
def test_trained_models_are_labelled_toys(model_dir: Path, kind: str) -> None:
    marker = read_marker(model_dir)
    assert marker is not None
    assert (marker["kind"], marker["weights"]) == (kind, "trained")
    card = (model_dir / "README.md").read_text()
    assert "toy" in card and "manifest.json" in card
    assert demo_weights.trained_model(kind) == model_dir


def test_llava_layout_is_what_vllm_loads() -> None:
    from safetensors import safe_open

    config = json.loads((LLAVA / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    text, vision = config["text_config"], config["vision_config"]
    assert text["head_dim"] >= 32
    assert vision["hidden_size"] // vision["num_attention_heads"] >= 32
    assert (vision["image_size"], vision["patch_size"]) == (112, 14)
    with safe_open(str(LLAVA / "model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    vision_keys = [k for k in keys if k.startswith("vision_tower.")]
    assert vision_keys and all(k.startswith("vision_tower.vision_model.") for k in vision_keys)
    template = (LLAVA / "chat_template.jinja").read_text()
    assert "<|start_header_id|>" in template and "<image>" in template


def test_sd_layout_is_what_diffusers_loads() -> None:
    index = json.loads((SD / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (SD / part).is_dir() and index[part][0] in ("diffusers", "transformers")
    vocab = json.loads((SD / "tokenizer" / "vocab.json").read_text())
    assert "sks</w>" in vocab, "the DreamBooth identifier is one token"


def _random_demo(path: Path, kind: str) -> Path:
    from dreamsight_demo.model_card import write_marker

    path.mkdir(parents=True)
    write_marker(path, kind=kind, seed=0, builder="b", knows="nothing", details={})
    return path


def test_install_and_refresh(tmp_path: Path) -> None:
    missing = tmp_path / "a" / "llava-demo"
    assert demo_weights.refresh(missing, "llava") == "installed"
    assert demo_weights.verify(missing) == []
    assert demo_weights.refresh(missing, "llava") == "kept"

    stale = _random_demo(tmp_path / "b" / "sd-demo", "stable-diffusion")
    assert demo_weights.refresh(stale, "stable-diffusion") == "replaced"
    marker = read_marker(stale)
    assert marker is not None and marker["weights"] == "trained"

    real = tmp_path / "c" / "llava-demo"
    real.mkdir(parents=True)
    (real / "config.json").write_text("{}")
    assert demo_weights.refresh(real, "llava") == "kept"
    assert not (real / demo_weights.MANIFEST_FILE).exists()

    # An installed copy from an older training run is updated.
    (missing / "README.md").write_text("older card")
    manifest = demo_weights.read_manifest(missing)
    manifest["files"]["README.md"] = demo_weights.sha256(missing / "README.md")
    (missing / demo_weights.MANIFEST_FILE).write_text(json.dumps(manifest))
    assert demo_weights.refresh(missing, "llava") == "replaced"
    assert demo_weights.verify(missing) == []


def test_install_refuses_damaged_weights(tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(LLAVA, root / "llava-shapes")
    (root / "llava-shapes" / "model.safetensors").write_text("version https://git-lfs...")
    problems = demo_weights.verify(root / "llava-shapes")
    assert problems and "model.safetensors" in problems[0]
    with pytest.raises(ValueError, match="damaged"):
        demo_weights.install("llava", tmp_path / "llava-demo", root)
    assert not demo_weights.install("llava", tmp_path / "x", tmp_path / "nowhere")


def test_install_puts_the_trained_models_in_place_or_builds_random_ones(tmp_path: Path) -> None:
    for name, kind in (("llava-demo", "llava"), ("sd-demo", "stable-diffusion")):
        assert demo_weights.put_in_place(tmp_path / name, kind) == "installed"
        marker = read_marker(tmp_path / name)
        assert marker is not None and (marker["kind"], marker["weights"]) == (kind, "trained")
        assert demo_weights.verify(tmp_path / name) == []
        assert demo_weights.put_in_place(tmp_path / name, kind) == "kept"
    nowhere = tmp_path / "no-trained-models"
    assert demo_weights.put_in_place(tmp_path / "random", "llava", nowhere) == "built"
    marker = read_marker(tmp_path / "random")
    assert marker is not None and marker["weights"] == "random"


def test_random_demo_builders_are_unchanged(tmp_path: Path) -> None:
    """Tests keep the fast random models: the builders still write random weights."""
    from dreamsight_demo import llava as demo_model

    marker = read_marker(demo_model.build(tmp_path / "llava-demo"))
    assert marker is not None and marker["weights"] == "random"


def test_installed_elsewhere_the_environment_names_the_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside a source checkout (the images) DREAMSIGHT_DEMO_MODELS says where they are."""
    root = tmp_path / "opt"
    shutil.copytree(LLAVA, root / "llava-shapes")
    monkeypatch.setenv(demo_weights.ROOT_ENV, str(root))
    assert demo_weights.trained_model("llava") == root / "llava-shapes"
    assert demo_weights.trained_model("stable-diffusion") is None
    assert demo_weights.install("llava", tmp_path / "llava-demo")
    assert not demo_weights.install("stable-diffusion", tmp_path / "sd-demo")


@pytest.mark.parametrize(
    ("image", "model"),
    [
        ("vision.cpu", "llava-shapes"),
        ("vision.cuda", "llava-shapes"),
        ("diffusion.cpu", "sd-shapes"),
        ("diffusion.cuda", "sd-shapes"),
    ],
)
def test_images_ship_the_trained_model(image: str, model: str) -> None:
    dockerfile = (demo_weights.COMMITTED_ROOT.parent / "docker" / f"{image}.Dockerfile").read_text()
    assert f"COPY models/{model} /opt/dreamsight/models/{model}" in dockerfile
    service = image.split(".")[0]
    base_env = demo_weights.COMMITTED_ROOT.parent / "k8s" / "base" / "config" / f"{service}.env"
    assert f"/opt/dreamsight/models/{model}" in base_env.read_text(), "the base serves it"
