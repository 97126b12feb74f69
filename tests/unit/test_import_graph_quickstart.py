"""The trainer knows no demo: nothing under tip_megatron/train/, tip_megatron/config.py or
tip_megatron/models/ (the model-source registry) reaches tip_megatron.quickstart through imports, and the
quickstart uses the trainer like any user (one direction, no cycle).

The walk reads every import statement of a module (top level and inside functions, so the
lazy imports count), follows tip_megatron modules transitively, and counts a module's
parent packages too (importing `a.b.c` runs `a/__init__` and `a/b/__init__`).
"""
import ast
from collections import deque
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).parents[2] / "tip_megatron"


def _module_file(name: str):
    """tip_megatron.x.y -> its .py file (module or package __init__), None if not ours."""
    if name != "tip_megatron" and not name.startswith("tip_megatron."):
        return None
    base = PACKAGE_ROOT.parent.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imports_of(name: str) -> set[str]:
    """The tip_megatron modules `name`'s file imports anywhere in its body."""
    path = _module_file(name)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                anchor = package[:len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule when `sub` is one
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            found.update(m for m in _with_parents(target) if _module_file(m) is not None)
    found.discard(name)
    return found


def reach(start: str) -> dict[str, str]:
    """Every tip_megatron module `start` imports transitively -> the module importing it."""
    parent = {start: ""}
    queue = deque([start])
    while queue:
        current = queue.popleft()
        for nxt in sorted(imports_of(current)):
            if nxt not in parent:
                parent[nxt] = current
                queue.append(nxt)
    return parent


def _chain(parent: dict[str, str], end: str) -> str:
    links = [end]
    while parent[links[-1]]:
        links.append(parent[links[-1]])
    return " -> ".join(reversed(links))


def _modules_under(sub: str) -> list[str]:
    return sorted("tip_megatron." + ".".join(p.relative_to(PACKAGE_ROOT).with_suffix("").parts)
                  .removesuffix(".__init__") for p in (PACKAGE_ROOT / sub).rglob("*.py"))


DEMO_FREE = _modules_under("train") + ["tip_megatron.config"] + _modules_under("models")


@pytest.mark.parametrize("module", DEMO_FREE)
def test_no_import_reaches_the_quickstart(module):
    parent = reach(module)
    demo = sorted(m for m in parent if m == "tip_megatron.quickstart"
                  or m.startswith("tip_megatron.quickstart."))
    assert not demo, "imports reach the quickstart: " + _chain(parent, demo[0])


def test_the_walk_sees_lazy_imports_and_the_quickstart_uses_the_trainer():
    """The checker itself: quickstart/command.py imports the trainer inside a function,
    and the walk finds it (so an empty result above is a real finding)."""
    assert "tip_megatron.train.trainer" in imports_of("tip_megatron.quickstart.command")
    assert "tip_megatron.train.setup" in reach("tip_megatron.quickstart.command")  # transitively


def test_no_cycle_between_train_and_quickstart():
    train, quickstart = _modules_under("train"), _modules_under("quickstart")
    train_reaches_quickstart = any(q in reach(t) for t in train for q in quickstart)
    quickstart_reaches_train = any(t in reach(q) for q in quickstart for t in train)
    assert quickstart_reaches_train and not train_reaches_quickstart
