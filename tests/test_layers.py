"""The layering of docs/design.md, enforced: no module imports a higher layer or another package's private module.

Every import of a ``curvature`` module, at the top of a file or inside a function, is read from the source with
``ast`` (nothing is imported), so a lazy import that breaks the layering fails here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "curvature"

# docs/design.md, "Layers": a module may import its own layer and the layers below it, never one above.
FOUNDATION, OPERATORS, LINALG, REFERENCE, JOBS, FACES = range(6)
LAYER_NAMES = ("foundation", "operators", "linalg", "reference", "jobs", "faces")
PACKAGE_LAYERS = {
    "operators": OPERATORS,
    "linalg": LINALG,
    "reference": REFERENCE,
    "sharpness": JOBS,
    "blocks": JOBS,
    "monitor": JOBS,
    "optim": JOBS,
    "regularizers": JOBS,
    "pruning": JOBS,
    "cli": FACES,
    "compat": FACES,
    "__main__": FACES,
    "_closure": JOBS,  # the closure contract of optimizers and regularizers: it builds operators
    "sampling": FOUNDATION,
    "plot": FOUNDATION,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """The top-level package or module of a ``curvature`` module (``operators``, ``_checks``, ...), or ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(module: str) -> int:
    package = package_of(module)
    if package == "":
        return FACES  # curvature/__init__.py: the public face that re-exports everything
    if package in PACKAGE_LAYERS:
        return PACKAGE_LAYERS[package]
    if package.startswith("_"):
        return FOUNDATION  # curvature/_checks.py, _modes.py, _func.py, ...: shared by every layer
    raise AssertionError(f"curvature.{package} has no layer: add it to docs/design.md and to PACKAGE_LAYERS here.")


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """Every ``(module, imported names, line)`` of a ``curvature`` module imported by the file at ``path``."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [alias.name for alias in node.names]
            if target.startswith("curvature"):
                # ``from . import x`` imports the module curvature.x: check it as such
                found.extend((f"{target}.{n}", [], node.lineno) for n in names
                             if (ROOT.parent / f"{target}.{n}".replace(".", "/")).with_suffix(".py").exists())
                found.append((target, names, node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names if alias.name.startswith("curvature"))
    return found


FILES = sorted(ROOT.rglob("*.py"))


def violations(path: Path) -> list[str]:
    module = module_name(path)
    layer, package = layer_of(module), package_of(module)
    problems = []
    for target, names, line in imports(path):
        where = f"{path.relative_to(ROOT.parent)}:{line} imports {target}"
        target_layer, target_package = layer_of(target), package_of(target)
        if target_layer > layer:
            problems.append(f"{where}: {LAYER_NAMES[layer]} may not import {LAYER_NAMES[target_layer]}")
        if {layer, target_layer} == {OPERATORS, LINALG}:
            problems.append(f"{where}: operators and linear algebra never import each other (an estimator only "
                            "needs @)")
        if target_package != package and not target_package.startswith("_"):
            private = [p for p in target.split(".")[2:] if p.startswith("_") and p != "__init__"]
            private += [n for n in names if n.startswith("_") and n != "__version__"]
            if private:
                problems.append(f"{where} ({', '.join(private)}): another package's private module or name; make "
                                "it public there, or move the shared helper to a foundation module curvature/_*.py")
    return problems


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_no_module_imports_a_higher_layer_or_another_package_private_module(path: Path) -> None:
    problems = violations(path)
    assert not problems, "\n".join(problems)


def test_the_check_catches_what_it_should(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rules fire on made-up modules (so that the test above cannot pass by reading nothing)."""
    root = tmp_path / "curvature"
    for relative, source in {
        "linalg/bad.py": "from ..operators.hessian import HessianOperator\n",
        "operators/worse.py": "def f():\n    from curvature.sharpness import sharpness\n",
        "regularizers/reach.py": "from ..optim._base import flatten\nfrom ..linalg.trace import _probe_blocks\n",
        "operators/fine.py": "from .._checks import check_scalar\nfrom .base import LinearOperator\n",
    }.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(source)
    monkeypatch.setattr(__import__(__name__), "ROOT", root)
    found = {p.name: violations(p) for p in root.rglob("*.py")}
    assert "operators and linear algebra never import each other" in found["bad.py"][0]
    assert "operators may not import jobs" in found["worse.py"][0]
    assert len(found["reach.py"]) == 2 and all("private" in p for p in found["reach.py"])
    assert found["fine.py"] == []
    assert len(FILES) > 40  # the real package was read
