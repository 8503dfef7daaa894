"""The benchmark scripts in ``tools/`` are not run by CI (they time real models), so their use of the
package is checked statically here: every ``malora_fx.a.b(...)`` they call resolves to a callable, and
every ``from malora_fx... import name`` names something that exists. A renamed or moved function
otherwise breaks a tool silently (``malora_fx.adapters.transform`` became a module once)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

TOOLS = sorted((Path(__file__).resolve().parents[1] / "tools").rglob("*.py"))


def _resolve(dotted: str):
    """``malora_fx.a.b`` as Python would see it after ``import malora_fx`` (submodules imported on demand)."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for part in parts[1:]:
        if not hasattr(obj, part) and hasattr(obj, "__path__"):
            importlib.import_module(f"{obj.__name__}.{part}")
        obj = getattr(obj, part)
    return obj


def _dotted(node: ast.expr) -> str | None:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "malora_fx":
        return ".".join(["malora_fx", *reversed(names)])
    return None


def _uses(path: Path) -> tuple[set[str], set[tuple[str, str]]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    calls = {d for n in ast.walk(tree) if isinstance(n, ast.Call) and (d := _dotted(n.func)) and "." in d}
    imports = {
        (n.module, alias.name)
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("malora_fx")
        for alias in n.names
    }
    return calls, imports


def test_the_tools_are_found():
    names = {p.name for p in TOOLS}
    assert {"bench_serving.py", "bench_train_step.py", "decode_ablation.py", "peft_lora.py"} <= names


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: p.name)
def test_tools_call_what_the_package_has(path):
    calls, imports = _uses(path)
    for dotted in sorted(calls):
        assert callable(_resolve(dotted)), f"{path.name}: {dotted}(...) is not callable"
    for module, name in sorted(imports):
        owner = importlib.import_module(module)
        assert hasattr(owner, name) or importlib.util.find_spec(f"{module}.{name}"), f"{path.name}: {module}.{name}"
