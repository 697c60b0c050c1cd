"""Structural rules of the monorepo: layers import only downward, every module says its layer,
provider SDKs are imported lazily, and the namespace stays implicit.

Layer: tests-shared. Imports: pytest and the standard library (reads sources, imports nothing).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "metaflow_extensions.sandbox"
SDKS = {"daytona", "daytona_sdk", "e2b", "modal"}

# part -> the parts of ours it may import, and the third-party top-level modules it may import.
ALLOWED = {
    "core": (set(), set()),
    "core.conformance": (set(), {"pytest"}),  # the suite backends' tests inherit
    "daytona": ({"core"}, {"daytona", "daytona_sdk"}),
    "e2b": ({"core"}, {"e2b"}),
    "modal": ({"core"}, {"modal"}),
    # boto3/botocore: Metaflow's own S3 dependency, for remote datastores (imported lazily).
    "plugins": ({"core"}, {"metaflow", "click", "boto3", "botocore"}),
}


def modules() -> list[tuple[str, Path]]:
    found = []
    for src in sorted(ROOT.glob("packages/*/src")):
        for path in sorted(src.rglob("*.py")):
            parts = path.relative_to(src).parts
            assert parts[:2] == ("metaflow_extensions", "sandbox"), f"{path} lives outside {NAMESPACE}"
            part = ".".join(parts[2:4]).removesuffix(".py")
            found.append((part if part in ALLOWED else parts[2], path))
    return found


def imported(path: Path, part: str) -> list[tuple[str, bool]]:
    """(absolute module name, imported at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.with_suffix("").parts[path.parts.index("metaflow_extensions") :][:-1])
    if path.name == "__init__.py":
        package = ".".join(path.parent.parts[path.parts.index("metaflow_extensions") :])
    top_level = {id(node) for node in tree.body} | {
        id(n) for node in tree.body if isinstance(node, (ast.If, ast.Try)) for n in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                names = [".".join([*base, node.module] if node.module else base)]
            else:
                names = [node.module or ""]
        else:
            continue
        found += [(name, id(node) in top_level) for name in names]
    return found


MODULES = modules()


def test_there_are_modules():
    assert {part for part, _ in MODULES} >= {"core"}


@pytest.mark.parametrize(("part", "path"), MODULES, ids=[str(p.relative_to(ROOT)) for _, p in MODULES])
def test_module_docstring_names_its_layer(part, path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{path} has no module docstring"
    assert "Layer:" in doc and "Imports:" in doc, f"{path}: the docstring must name its layer and what it may import"


@pytest.mark.parametrize(("part", "path"), MODULES, ids=[str(p.relative_to(ROOT)) for _, p in MODULES])
def test_imports_only_go_downward(part, path):
    ours, third_party = ALLOWED[part]
    for name, _ in imported(path, part):
        top = name.split(".")[0]
        if name.startswith(f"{NAMESPACE}."):
            target = name.split(".")[2]
            assert target == part.split(".")[0] or target in ours, (
                f"{path} imports {name}: {part} may import only {ours or 'itself'}"
            )
        elif top == "metaflow_extensions":
            pytest.fail(f"{path} imports {name}, outside {NAMESPACE}")
        elif top not in sys.stdlib_module_names and top != "__future__":
            assert top in third_party, (
                f"{path} imports {name}: {part} may import {third_party or 'no third-party module'}"
            )


@pytest.mark.parametrize(("part", "path"), MODULES, ids=[str(p.relative_to(ROOT)) for _, p in MODULES])
def test_provider_sdks_are_imported_lazily(part, path):
    for name, at_module_level in imported(path, part):
        if name.split(".")[0] in SDKS:
            assert not at_module_level, f"{path} imports the SDK {name} at module level: import it inside a function"


def test_plugins_never_name_a_backend_module():
    for part, path in MODULES:
        if part == "plugins":
            for name, _ in imported(path, part):
                assert not name.startswith((f"{NAMESPACE}.daytona", f"{NAMESPACE}.e2b", f"{NAMESPACE}.modal")), path


def test_namespace_levels_have_no_init():
    for src in ROOT.glob("packages/*/src"):
        assert not (src / "metaflow_extensions" / "__init__.py").exists()
        assert not (src / "metaflow_extensions" / "sandbox" / "__init__.py").exists()


def test_only_the_integration_ships_plugins():
    for package in ROOT.glob("packages/*"):
        if (package / "src/metaflow_extensions/sandbox/plugins").exists():
            assert package.name == "metaflow-sandbox", f"{package.name} ships plugins/: it needs its own mfextinit"


def test_only_tests_import_the_conformance_suite():
    # It imports pytest, which no installed code may need.
    for _, path in MODULES:
        if path.name != "conformance.py":
            assert all("conformance" not in name for name, _ in imported(path, "")), path
