"""Regenerate the Python code for protos/ into the client package.

    python scripts/gen_protos.py [OUT_DIR]

Writes ``*_pb2.py``, ``*_pb2_grpc.py`` and their ``.pyi`` stubs (mypy-protobuf)
for every file under protos/, plus the ``__init__.py`` files of the package
tree, into OUT_DIR (default: client/src). Proto packages map to import paths:
``dreamsight.vision.v1`` becomes ``dreamsight/vision/v1/``. The output depends
only on protos/ and the pinned grpcio-tools and mypy-protobuf versions, so a
test regenerates into a temporary directory and compares byte for byte.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = ROOT / "client" / "src"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
INIT_TEXT = '"""Generated protobuf package; regenerate with scripts/gen_protos.py."""\n'


def proto_files() -> list[Path]:
    """Every .proto file of the contract, in a stable order."""
    return sorted(PROTO_ROOT.rglob("*.proto"))


def _plugin(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = path if path.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: install mypy-protobuf")
    return str(found)


def generate(out_dir: Path) -> list[Path]:
    """Generate code for all protos into out_dir; return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = generated_files(out_dir)
    for package_dir in {p.parent for p in written}:
        directory = package_dir
        while directory != out_dir:
            init = directory / "__init__.py"
            if not init.exists():
                init.write_text(INIT_TEXT)
            directory = directory.parent
    return written


def generated_files(out_dir: Path) -> list[Path]:
    """The generated modules and stubs under out_dir, in a stable order."""
    root = out_dir / "dreamsight"
    return sorted(p for p in root.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def main() -> None:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for stale in generated_files(out_dir) if (out_dir / "dreamsight").exists() else []:
        stale.unlink()
    written = generate(out_dir)
    print(f"generated {len(written)} files into {out_dir}")


if __name__ == "__main__":
    main()
