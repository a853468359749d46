"""Job stores for tests: a SQLite file, or a fresh database on a real PostgreSQL."""

from __future__ import annotations

import uuid
from pathlib import Path

from diffusion_service.dreambooth.params import JobParams

STORE_KINDS = ("sqlite", "postgresql")


def fresh_database(dsn: str) -> str:
    """A new, empty database on the server at dsn; returns its URL."""
    import psycopg

    name = f"jobs_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return dsn.rsplit("/", 1)[0] + f"/{name}"


def store_location(kind: str, tmp_path: Path, postgres_dsn: str) -> Path | str:
    """Where a test's store lives: a file under tmp_path or a fresh database."""
    if kind == "sqlite":
        return tmp_path / "store" / "jobs.sqlite3"
    return fresh_database(postgres_dsn)


def params(**fields: object) -> JobParams:
    """Job parameters good enough for the store (it never trains them)."""
    values: dict[str, object] = {
        "base_model": "sd-demo",
        "instance_prompt": "a photo of sks dog",
        "class_prompt": "",
        "validation_prompt": "",
        "num_class_images": 0,
        "prior_loss_weight": 1.0,
        "max_train_steps": 4,
        "learning_rate": 1e-4,
        "train_text_encoder": False,
        "resolution": 32,
        "seed": 0,
        "checkpoint_interval": 2,
        "num_instance_images": 3,
    }
    values.update(fields)
    return JobParams(**values)  # type: ignore[arg-type]
