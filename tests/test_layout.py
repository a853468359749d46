"""Who may import whom (DESIGN.md): the services never import the demo toolchain
or each other, and the client imports no server code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("gateway", "vision_service", "diffusion_service")
SERVER_PACKAGES = (*SERVICES, "dreamsight_server", "dreamsight_demo")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def top_level(module: str) -> str:
    return module.split(".")[0]


def imports_of(package_dir: Path) -> dict[str, set[str]]:
    files = sorted(package_dir.rglob("*.py"))
    assert files, f"{package_dir} holds no Python files"
    return {str(f.relative_to(ROOT)): {top_level(m) for m in imported_modules(f)} for f in files}


@pytest.mark.parametrize("package", [*SERVICES, "dreamsight_server"])
def test_runtime_packages_never_import_the_demo_toolchain(package: str) -> None:
    for path, modules in imports_of(ROOT / package).items():
        assert "dreamsight_demo" not in modules, f"{path} imports the demo package"
        others = set(SERVICES) - {package}
        assert not modules & others, f"{path} imports {modules & others}: services meet over gRPC"


def test_the_client_imports_no_server_code() -> None:
    for path, modules in imports_of(ROOT / "client" / "src" / "dreamsight").items():
        assert not modules & set(SERVER_PACKAGES), (
            f"{path} imports {modules & set(SERVER_PACKAGES)}"
        )


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from dreamsight_demo.weights import install\n    import x.y\n")
    assert imported_modules(sample) == {"dreamsight_demo.weights", "x.y"}


def test_the_old_demo_homes_are_gone() -> None:
    for old in (
        "vision_service/demo_model.py",
        "vision_service/train_demo.py",
        "diffusion_service/demo_model.py",
        "diffusion_service/train_demo.py",
        "dreamsight_server/demo_weights.py",
        "shapes",
    ):
        assert not (ROOT / old).exists(), f"{old} belongs in dreamsight_demo/"


def test_the_readme_table_matches_the_tree() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## What is here", 1)[1].split("\n## ", 1)[0]
    listed = {
        part.strip("` /")
        for row in table.splitlines()
        if row.startswith("| `")
        for part in row.split("|")[1].split(",")
    }
    ignored = {"node_modules"}  # npm's, made by make setup
    folders = {
        p.name
        for p in ROOT.iterdir()
        if p.is_dir() and not p.name.startswith(".") and not p.name.endswith(".egg-info")
    } - ignored
    assert folders <= listed, f"README's table lacks {folders - listed}"
    assert listed <= folders, f"README's table names what is gone: {listed - folders}"
