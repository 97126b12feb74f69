"""The package's import graph, read from the source (AST; imports inside functions too).

Library modules (everything under tip_megatron/ except tip_megatron/testing/) never import
the test helpers in tip_megatron.testing.
"""
import ast
from pathlib import Path

import tip_megatron

PACKAGE_DIR = Path(tip_megatron.__file__).resolve().parent
TESTING = "tip_megatron.testing"


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, package_dir: Path = PACKAGE_DIR) -> set[str]:
    """Every module `path` imports, at any depth: `import a.b`, `from a import b` (as `a`
    and `a.b`: b may be a module), relative imports resolved, and
    `importlib.import_module("a.b")` with a literal name."""
    name = module_name(path, package_dir)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(str(node.args[0].value))
    return found


def library_modules() -> list[Path]:
    testing_dir = PACKAGE_DIR / "testing"
    return sorted(p for p in PACKAGE_DIR.rglob("*.py") if testing_dir not in p.parents)


def _is_testing(name: str) -> bool:
    return name == TESTING or name.startswith(TESTING + ".")


def test_library_modules_do_not_import_the_testing_package():
    offenders = {
        module_name(path): sorted(n for n in imported_modules(path) if _is_testing(n))
        for path in library_modules()
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"library modules import {TESTING}: {offenders}"


def test_the_walk_sees_nested_and_relative_imports(tmp_path):
    """The detector itself: an import inside a function, `from . import x` and
    import_module are all seen (else the test above could pass vacuously)."""
    pkg = tmp_path / "tip_megatron" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    mod = pkg / "mod.py"
    mod.write_text(
        "import importlib\n"
        "def f():\n    from ..testing import models\n"
        "def g():\n    from .. import testing\n"
        "def h():\n    return importlib.import_module('tip_megatron.testing.hf_models')\n")
    found = {n for n in imported_modules(mod, tmp_path / "tip_megatron") if _is_testing(n)}
    assert found == {"tip_megatron.testing", "tip_megatron.testing.models",
                     "tip_megatron.testing.hf_models"}
    assert len(library_modules()) > 30  # the real package's modules are walked
