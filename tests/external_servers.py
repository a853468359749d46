"""Real Redis, PostgreSQL and Prometheus servers on loopback, for tests.

Each starts from the Debian package's binary (installed by
``scripts/install_system_deps.sh``, which ``make setup`` runs) and fails
loudly when the binary is missing: a test that needs one never skips.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary(name: str, *patterns: str) -> str:
    found = shutil.which(name) or next(
        (p for pattern in patterns for p in sorted(glob.glob(pattern))), None
    )
    if not found:
        raise RuntimeError(
            f"{name} is not installed: run scripts/install_system_deps.sh (make setup does)"
        )
    return found


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on {port}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server; yields its URL."""
    binary = _binary("redis-server")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster; yields its DSN.

    PostgreSQL refuses to run as root, so as root it runs as the ``postgres``
    user the Debian package creates.
    """
    bindir = Path(_binary("pg_ctl", "/usr/lib/postgresql/*/bin/pg_ctl")).parent
    datadir = Path(tempfile.mkdtemp(prefix="dreamsight-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(datadir, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(datadir / "data"), "-A", "trust",
         "-U", "postgres", "--no-sync"],
        check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        [*as_user, str(bindir / "postgres"), "-D", str(datadir / "data"), "-p", str(port),
         "-k", str(datadir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_port(port, proc, "postgres")
        dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        for _ in range(100):  # listening is not yet accepting
            try:
                import psycopg

                psycopg.connect(dsn).close()
                break
            except Exception:
                time.sleep(0.1)
        yield dsn
    finally:
        _stop(proc)
        shutil.rmtree(datadir, ignore_errors=True)


@contextlib.contextmanager
def prometheus_server(targets: list[str]) -> Iterator[str]:
    """A Prometheus scraping targets every second; yields its base URL."""
    binary = _binary("prometheus")
    workdir = Path(tempfile.mkdtemp(prefix="dreamsight-prom-"))
    config = workdir / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: dreamsight\n"
        f"    static_configs: [{{targets: [{', '.join(repr(t) for t in targets)}]}}]\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_port(port, proc, "prometheus", timeout=60)
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)
