"""The layering rule of docs/architecture.md, checked on every module of the package.

Layers, top to bottom: ``cli`` > services (``image``, ``oci``, ``netboot``, ``vnode``) >
protocol servers (``serve``) > ``subsys`` > ``core``. A module may import its own package and
any lower layer; services do not import each other. ``sidusctl/__init__.py`` (the version) is
importable from everywhere. Imports inside functions count as well as those at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "sidusctl"
RANK = {"cli": 4, "image": 3, "oci": 3, "netboot": 3, "vnode": 3, "serve": 2, "subsys": 1,
        "core": 0}


def _package(module: str) -> str | None:
    """``sidusctl.X.y`` -> ``X``; ``sidusctl`` itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "sidusctl" else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported sidusctl module) for every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("sidusctl")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.startswith("sidusctl"):
            if node.module == "sidusctl":  # from sidusctl import X: X may be a subpackage
                out += [(node.lineno, f"sidusctl.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; use absolute ones")
    return out


def violations() -> list[str]:
    """Every import that goes up or sideways, as ``file:line: a -> b``."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent)
        own = _package(".".join(rel.with_suffix("").parts))
        if own is None or own in ("__init__", "__main__"):
            continue
        assert own in RANK, f"{rel}: package {own!r} has no layer in this test (and the docs)"
        for line, mod in _imports(path):
            other = _package(mod)
            if other is None or other == own or other == "__version__":
                continue
            assert other in RANK, f"{rel}:{line}: imports {mod}, a package with no layer"
            if RANK[other] >= RANK[own]:
                bad.append(f"{rel}:{line}: {own} -> {mod}")
    return bad


def test_imports_go_downward_only() -> None:
    assert violations() == []


def test_the_check_sees_a_violation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself: a service importing another service is reported."""
    fake = tmp_path / "sidusctl"
    (fake / "vnode").mkdir(parents=True)
    (fake / "vnode" / "x.py").write_text("def f():\n    from sidusctl.netboot import lab\n")
    (fake / "serve").mkdir()
    (fake / "serve" / "y.py").write_text("from sidusctl.core import run\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PKG"]), "PKG", fake)
    assert violations() == ["sidusctl/vnode/x.py:2: vnode -> sidusctl.netboot"]
