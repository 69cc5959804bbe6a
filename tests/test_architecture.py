"""The import direction of docs/architecture.md, read from the source (every ``import``, lazy ones too):
``dinoserve`` (the command line) → ``service`` and ``training`` → ``core``. The gateway never imports the
trainer or torch, the trainer never imports the gateway, and ``core`` imports none of them."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = {"torch", "torchvision", "timm"}
FORBIDDEN = {
    "core": {"dinoserve", "service", "training", *TORCH},
    "service": {"dinoserve", "training", *TORCH},
    "training": {"dinoserve", "service"},
}


def imported_packages(path: Path):
    """(top-level package, line) of every absolute import in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno


@pytest.mark.parametrize("package", FORBIDDEN)
def test_imports_go_one_way(package):
    sources = sorted((ROOT / package).rglob("*.py"))
    assert sources, f"no Python files under {package}/"
    offending = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for path in sources for name, line in imported_packages(path) if name in FORBIDDEN[package]]
    assert not offending, offending


def test_relative_imports_stay_inside_their_package():
    escaping = [f"{path.relative_to(ROOT)}:{node.lineno}"
                for package in ("core", "dinoserve", "service", "training")
                for path in (ROOT / package).rglob("*.py")
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) and node.level > len(path.relative_to(ROOT / package).parts)]
    assert not escaping, escaping
