"""The trained demo models committed with the source, and their manifests.

    python -m dreamsight_demo.weights verify [DIR ...]
    python -m dreamsight_demo.weights install DIR=KIND [DIR=KIND ...]

``models/llava-shapes`` and ``models/sd-shapes`` at the top of the source
tree are small models trained on synthetic shapes (see ``shapes``). Each has
a ``manifest.json``: the command and configuration that trained it, its
measured quality, and the sha256 of every other file. ``install`` (which
``dreamsight up`` runs before it starts the services; the services
themselves only run a model directory) copies the trained model of each kind
into a missing demo directory when the tree has one (and its files match the
manifest), replaces one that holds random weights from an older version, and
builds a random-weight one where there is no trained model at all.
Installed elsewhere than a source checkout, it looks under
``$DREAMSIGHT_DEMO_MODELS`` instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from dreamsight_server.demo_marker import read_marker

MANIFEST_FILE = "manifest.json"
COMMITTED_ROOT = Path(__file__).resolve().parents[1] / "models"
"""Where the trained demo models live in a source checkout."""
ROOT_ENV = "DREAMSIGHT_DEMO_MODELS"
"""Where they live otherwise (the images copy them to /opt/dreamsight/models)."""


def trained_root() -> Path:
    """``$DREAMSIGHT_DEMO_MODELS`` when set, else ``models/`` of the source tree."""
    configured = os.environ.get(ROOT_ENV)
    return Path(configured) if configured else COMMITTED_ROOT


TRAINED = {"llava": "llava-shapes", "stable-diffusion": "sd-shapes"}
"""The committed trained model of each demo kind (the marker's ``kind``)."""


def sha256(path: Path) -> str:
    """The hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(model_dir: Path) -> dict[str, str]:
    """sha256 of every file under model_dir except the manifest, by relative path."""
    return {
        p.relative_to(model_dir).as_posix(): sha256(p)
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


def write_manifest(
    model_dir: Path, *, builder: str, config: dict[str, Any], results: dict[str, Any]
) -> dict[str, Any]:
    """Record how a model was trained and the hash of each of its files."""
    manifest = {
        "builder": builder,
        "command": f"{builder} DIR (with the settings in config)",
        "config": config,
        "results": results,
        "files": file_hashes(model_dir),
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (model_dir / MANIFEST_FILE).write_text(text)
    return manifest


def overrides(config_class: type[Any], settings: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as typed fields of a training-config dataclass."""
    defaults = config_class()
    out: dict[str, Any] = {}
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep or not hasattr(defaults, key):
            raise SystemExit(f"bad setting {setting!r}: expected KEY=VALUE, KEY a config field")
        current = getattr(defaults, key)
        if isinstance(current, tuple):
            out[key] = tuple(type(current[0])(v) for v in text.split(","))
        elif isinstance(current, bool):
            out[key] = text.lower() in ("1", "true", "yes")
        else:
            out[key] = type(current)(text)
    return out


def read_manifest(model_dir: Path) -> dict[str, Any]:
    """The manifest of a trained model directory."""
    data: dict[str, Any] = json.loads((model_dir / MANIFEST_FILE).read_text())
    return data


def verify(model_dir: Path) -> list[str]:
    """What is wrong with a trained model directory (empty when its files
    are exactly those the manifest lists, with the recorded hashes)."""
    if not (model_dir / MANIFEST_FILE).is_file():
        return [f"{model_dir}: no {MANIFEST_FILE}"]
    expected: dict[str, str] = read_manifest(model_dir)["files"]
    actual = file_hashes(model_dir)
    problems = [f"{name}: missing" for name in sorted(set(expected) - set(actual))]
    problems += [f"{name}: not in the manifest" for name in sorted(set(actual) - set(expected))]
    problems += [
        f"{name}: sha256 {actual[name][:12]}... is not the recorded {digest[:12]}..."
        for name, digest in sorted(expected.items())
        if name in actual and actual[name] != digest
    ]
    return problems


def trained_model(kind: str, root: Path | None = None) -> Path | None:
    """The trained model of a demo kind under root (default :func:`trained_root`),
    or None when there is none."""
    root = trained_root() if root is None else root
    name = TRAINED.get(kind)
    path = root / name if name else None
    return path if path is not None and (path / MANIFEST_FILE).is_file() else None


def install(kind: str, dest: Path, root: Path | None = None) -> bool:
    """Copy the trained model of a kind to dest (which must not exist).

    Returns False when there is no trained model; raises ValueError when its
    files do not match its manifest (a partial checkout, or Git LFS pointers).
    """
    source = trained_model(kind, root)
    if source is None:
        return False
    problems = verify(source)
    if problems:
        raise ValueError(f"the trained demo model {source} is damaged: {'; '.join(problems)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    shutil.copytree(source, partial)
    partial.rename(dest)
    return True


def refresh(dest: Path, kind: str, root: Path | None = None) -> str:
    """Make a demo directory hold the trained model when it holds random weights.

    Returns what was done: ``installed`` (it was missing), ``replaced`` (it
    held a random-weight demo build, or an older trained one), ``kept``
    (anything else is left alone: the same trained model, a real model, or
    no trained model to replace it with).
    """
    source = trained_model(kind, root)
    if source is None:
        return "kept"
    if not dest.exists():
        install(kind, dest, root)
        return "installed"
    marker = read_marker(dest)
    if marker is None or marker.get("kind") != kind:
        return "kept"
    if marker.get("weights") == "trained":
        current = dest / MANIFEST_FILE
        if current.is_file() and read_manifest(dest)["files"] == read_manifest(source)["files"]:
            return "kept"
    elif marker.get("weights") != "random":
        return "kept"
    old = dest.with_name(dest.name + ".random")
    if old.exists():
        shutil.rmtree(old)
    dest.rename(old)
    install(kind, dest, root)
    shutil.rmtree(old)
    return "replaced"


def put_in_place(dest: Path, kind: str, root: Path | None = None) -> str:
    """What :func:`refresh` does, and where no trained model exists, a random one
    is built (``built``) so that the plumbing still runs."""
    done = refresh(dest, kind, root)
    if dest.exists():
        return done
    if kind == "llava":
        from dreamsight_demo import llava

        llava.build(dest)
    else:
        from dreamsight_demo import sd

        sd.build(dest)
    return "built"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="check trained models against their manifests")
    check.add_argument("dirs", nargs="*", type=Path)
    fresh = sub.add_parser(
        "install", help="put the trained demo models in place (random ones where none exist)"
    )
    fresh.add_argument("targets", nargs="+", metavar="DIR=KIND")
    args = parser.parse_args(argv)
    if args.command == "verify":
        dirs = args.dirs or [trained_root() / name for name in TRAINED.values()]
        failed = False
        for model_dir in dirs:
            problems = verify(model_dir)
            failed = failed or bool(problems)
            print(f"{model_dir}: {'; '.join(problems) or 'ok'}")
        sys.exit(1 if failed else 0)
    for target in args.targets:
        path, _, kind = target.rpartition("=")
        if not path or kind not in TRAINED:
            parser.error(f"bad target {target!r}: expected DIR=KIND, KIND one of {list(TRAINED)}")
        print(f"{path}: {put_in_place(Path(path), kind)}")


if __name__ == "__main__":
    main()
