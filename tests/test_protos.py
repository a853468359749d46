"""The contract: buf lint and breaking, generated code fresh and typed."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_gen_protos() -> Any:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_protos = _load_gen_protos()

BUF = ROOT / "node_modules" / ".bin" / "buf"


def _buf(*args: str) -> subprocess.CompletedProcess[str]:
    assert BUF.exists(), "buf missing: run `make setup` (npm ci installs @bufbuild/buf)"
    return subprocess.run([str(BUF), *args], cwd=ROOT, capture_output=True, text=True)


def test_buf_lint_is_clean() -> None:
    result = _buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_catches_a_violation(tmp_path: Path) -> None:
    """The lint really runs the STANDARD + COMMENTS rules."""
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    bad = tmp_path / "protos" / "dreamsight" / "common" / "v1" / "common.proto"
    bad.write_text(bad.read_text() + "\nmessage undocumented_thing { string x = 1; }\n")
    result = subprocess.run([str(BUF), "lint"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert "undocumented_thing" in result.stdout + result.stderr


def _previous_protos_ref() -> str | None:
    """The newest commit before the working tree's protos, if any."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)

    if git("rev-parse", "--verify", "HEAD").returncode != 0:
        return None
    changed = git("status", "--porcelain", "--", "protos").stdout.strip()
    ref = "HEAD" if changed else "HEAD~1"
    if git("rev-parse", "--verify", ref).returncode != 0:
        return None
    has_protos = git("ls-tree", "-d", ref, "protos").stdout.strip()
    return ref if has_protos else None


def test_buf_breaking_against_previous_commit() -> None:
    ref = _previous_protos_ref()
    if ref is None:
        # The first commit with protos has nothing to break; compare with itself
        # so the command still runs and its setup stays checked.
        ref = "HEAD" if (ROOT / ".git").exists() else None
    assert ref is not None, "not a git checkout"
    result = _buf("breaking", "--against", f".git#ref={ref},subdir=protos")
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    gen_protos.generate(tmp_path)
    committed_root = ROOT / "client" / "src"
    fresh = {p.relative_to(tmp_path) for p in gen_protos.generated_files(tmp_path)}
    committed = {p.relative_to(committed_root) for p in gen_protos.generated_files(committed_root)}
    assert fresh == committed, "run `make protos`: generated file set differs"
    stale = [
        str(rel)
        for rel in sorted(fresh)
        if (tmp_path / rel).read_bytes() != (committed_root / rel).read_bytes()
    ]
    assert not stale, f"run `make protos`: stale generated files {stale}"


def test_every_proto_has_generated_modules_and_stubs() -> None:
    src = ROOT / "client" / "src"
    for proto in gen_protos.proto_files():
        stem = proto.relative_to(gen_protos.PROTO_ROOT).with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            assert (src / f"{stem}{suffix}").is_file(), f"{stem}{suffix} missing"


@pytest.mark.parametrize(
    ("module", "service", "rpcs"),
    [
        ("dreamsight.vision.v1.vision_pb2", "VisionService", {"Chat", "ListModels", "GetModel"}),
        (
            "dreamsight.diffusion.v1.diffusion_pb2",
            "DiffusionService",
            {
                "Generate",
                "CreateTrainingJob",
                "GetTrainingJob",
                "ListTrainingJobs",
                "WatchTrainingJob",
                "CancelTrainingJob",
                "ListModels",
                "DeleteModel",
            },
        ),
        ("dreamsight.gateway.v1.usage_pb2", "UsageService", {"GetUsage"}),
        ("dreamsight.gateway.v1.admin_pb2", "AdminService", {"CreateKey", "ListKeys", "RevokeKey"}),
    ],
)
def test_services_expose_the_contracted_rpcs(module: str, service: str, rpcs: set[str]) -> None:
    import importlib

    descriptor = importlib.import_module(module).DESCRIPTOR.services_by_name[service]
    assert {m.name for m in descriptor.methods} == rpcs


def test_streaming_rpcs_stream() -> None:
    from dreamsight.diffusion.v1 import diffusion_pb2
    from dreamsight.vision.v1 import vision_pb2

    vision = vision_pb2.DESCRIPTOR.services_by_name["VisionService"]
    diffusion = diffusion_pb2.DESCRIPTOR.services_by_name["DiffusionService"]
    streaming = {m.name for s in (vision, diffusion) for m in s.methods if m.server_streaming}
    assert streaming == {"Chat", "Generate", "WatchTrainingJob"}


def test_messages_round_trip() -> None:
    from dreamsight.common.v1 import common_pb2
    from dreamsight.vision.v1 import vision_pb2

    request = vision_pb2.ChatRequest(
        model="llava-demo",
        messages=[
            vision_pb2.Message(
                role=vision_pb2.ROLE_USER,
                content="What is this?",
                images=[common_pb2.Image(data=b"\x89PNG", mime_type="image/png")],
            )
        ],
        options=vision_pb2.ChatOptions(temperature=0.0, max_tokens=8, stop=["\n"]),
    )
    parsed = vision_pb2.ChatRequest.FromString(request.SerializeToString())
    assert parsed == request
    assert parsed.options.HasField("temperature")
    assert not parsed.options.HasField("top_p")
