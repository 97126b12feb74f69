"""The folder tree is the architecture: layers import downward only, no module circles,
and an import inside a function says why (docs/design_notes.md, "Layers").

    runtime < ops, tip < models < checkpoint, data < rollout, distill < eval < config
            < train < apps

A module may import its own layer and the layers below it; packages of one layer may use
each other as long as no circle forms. `tip_megatron.testing` (test helpers) is outside the
order: it may import anything and nothing imports it (test_import_graph.py).
"""
import ast
from pathlib import Path

import pytest

from test_import_graph import PACKAGE_DIR, library_modules, module_name

LAYERS = (("runtime",), ("ops", "tip"), ("models",), ("checkpoint", "data"),
          ("rollout", "distill"), ("eval",), ("config",), ("train",), ("apps",))


def layer_of(name: str) -> int:
    """tip_megatron.<first>... -> its layer; the root package sits below everything."""
    parts = name.split(".")
    if len(parts) == 1:
        return -1
    for index, packages in enumerate(LAYERS):
        if parts[1] in packages:
            return index
    raise AssertionError(f"{name}: top-level name {parts[1]!r} is in no layer; add it to LAYERS "
                         "and to docs/design_notes.md")


def _modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    paths = library_modules() if package_dir == PACKAGE_DIR else sorted(package_dir.rglob("*.py"))
    return {module_name(p, package_dir): p for p in paths}


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The tip_megatron module a dotted import target names (`a.b.func` -> `a.b`)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def import_edges(path: Path, modules: dict[str, Path], package_dir: Path = PACKAGE_DIR):
    """(imported module, line) for every tip_megatron import of `path`, at any depth."""
    name = module_name(path, package_dir)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved and resolved != name:
                edges.append((resolved, node.lineno))
    return edges


def function_level_imports(path: Path):
    """(line, text) of every import statement inside a function body of `path`."""
    lines = path.read_text().splitlines()
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child.lineno, lines[child.lineno - 1]))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse("\n".join(lines), str(path)), False)
    return found


def says_why(lines: list[str], lineno: int) -> bool:
    """A comment on the import's line, or a comment line right above it."""
    above = lines[lineno - 2].strip() if lineno >= 2 else ""
    return "#" in lines[lineno - 1] or above.startswith("#")


def upward_imports(package_dir: Path = PACKAGE_DIR) -> list[str]:
    modules = _modules(package_dir)
    return [f"{path.relative_to(package_dir.parent)}:{line} imports {target}"
            for name, path in sorted(modules.items())
            for target, line in import_edges(path, modules, package_dir)
            if layer_of(target) > layer_of(name)]


def import_circles(package_dir: Path = PACKAGE_DIR) -> list[list[str]]:
    """Strongly connected components (Tarjan) of more than one module."""
    modules = _modules(package_dir)
    graph = {n: {t for t, _ in import_edges(p, modules, package_dir)} for n, p in modules.items()}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return circles


def silent_function_imports(package_dir: Path = PACKAGE_DIR) -> list[str]:
    silent = []
    for path in _modules(package_dir).values():
        lines = path.read_text().splitlines()
        silent += [f"{path.relative_to(package_dir.parent)}:{ln}: {text.strip()}"
                   for ln, text in function_level_imports(path) if not says_why(lines, ln)]
    return silent


def test_every_module_imports_only_its_layer_and_below():
    upward = upward_imports()
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_circles():
    circles = import_circles()
    assert not circles, f"import circles: {circles}"


def test_every_import_inside_a_function_says_why():
    silent = silent_function_imports()
    assert not silent, (f"{len(silent)} imports inside functions without a comment saying why "
                        "(an optional heavy dependency, --help start-up time, ...):\n"
                        + "\n".join(sorted(silent)))


def test_the_checks_find_what_they_look_for(tmp_path):
    """The detectors on a planted package: an upward import, a two-module circle, and a
    function-level import with and without its comment (else the tests above could pass
    vacuously)."""
    root = tmp_path / "tip_megatron"
    for sub in ("ops", "train"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "ops" / "low.py").write_text(
        "from tip_megatron.train.high import run\n"
        "def f():\n    import json\n"
        "def g():\n    # heavy: only this path needs it\n    import csv\n")
    (root / "train" / "high.py").write_text("from tip_megatron.ops import low\n")
    assert upward_imports(root) == ["tip_megatron/ops/low.py:1 imports tip_megatron.train.high"]
    assert import_circles(root) == [["tip_megatron.ops.low", "tip_megatron.train.high"]]
    assert silent_function_imports(root) == ["tip_megatron/ops/low.py:3: import json"]
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("tip_megatron.nowhere.mod")
