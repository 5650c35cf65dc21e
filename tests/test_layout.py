"""The package's rooms import one way: common <- stores <- trainer <- pipeline/analysis <- entropy,
features; pipeline/llm (loading causal LMs) imports only common and serves harvest, analysis and
features; pipeline/harvest only common, stores and llm; evaluate also cuts harvest's windows, and
features compare runs evaluate; no other stage imports another; interop (other tools' formats)
sits above the stages it reads and no stage imports it; ``cli`` and ``pipeline/run`` may import
anything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "common": {"common"},
    "stores": {"common", "stores"},
    "trainer": {"common", "stores", "trainer"},
    "pipeline.llm": {"common", "pipeline.llm"},
    "pipeline.harvest": {"common", "stores", "pipeline.llm", "pipeline.harvest"},
    "pipeline.analysis": {"common", "stores", "trainer", "pipeline.llm", "pipeline.analysis"},
    "pipeline.entropy": {"common", "stores", "trainer", "pipeline.analysis", "pipeline.entropy"},
    "pipeline.evaluate": {
        "common",
        "stores",
        "trainer",
        "pipeline.llm",
        "pipeline.analysis",
        "pipeline.harvest",
        "pipeline.evaluate",
    },
    "pipeline.features": {
        "common",
        "stores",
        "trainer",
        "pipeline.llm",
        "pipeline.analysis",
        "pipeline.evaluate",
        "pipeline.features",
    },
    "interop": {
        "common",
        "stores",
        "trainer",
        "pipeline.llm",
        "pipeline.analysis",
        "pipeline.features",
        "interop",
    },
}
OPEN = {"cli", "pipeline.run", "__init__", "pipeline"}  # may import every room


def room(module: str) -> str:
    """``pipeline.entropy.counts`` -> ``pipeline.entropy``; ``stores.sampler`` -> ``stores``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "pipeline" and len(parts) > 2 else parts[0]


def package_modules() -> list[Path]:
    skip = {".venv", ".typecheck", "tests", "benchmarks", "docker", ".git", "build"}
    return [p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts)]


def bae_imports(path: Path) -> set[str]:
    """Every ``bae.*`` module a file imports, at any depth (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bae."):
            found.add(node.module.removeprefix("bae."))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("bae.") for a in node.names if a.name.startswith("bae."))
    return found


def test_the_rooms_cover_the_package() -> None:
    rooms = {room(".".join(p.relative_to(ROOT).with_suffix("").parts)) for p in package_modules()}
    assert rooms <= set(ALLOWED) | OPEN, rooms - set(ALLOWED) - OPEN


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path: Path) -> None:
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    mine = room(module)
    if mine in OPEN:
        return
    bad = sorted(m for m in bae_imports(path) if room(m) not in ALLOWED[mine])
    assert not bad, f"{module} ({mine}) may not import {bad}"


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from bae.pipeline.entropy.counts import GroupCounts\n")
    assert room("pipeline.entropy.counts") not in ALLOWED["pipeline.features"]
    assert "pipeline.entropy.counts" in bae_imports(bad)
