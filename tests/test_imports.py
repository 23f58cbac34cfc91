"""The data modules import one another one way only: data -> folders -> datasets."""

import ast
from pathlib import Path

import pytest

import lowmem_cnn

PACKAGE = Path(lowmem_cnn.__file__).parent
MODULES = {path.stem for path in PACKAGE.glob("*.py")}


def imported_modules(name: str) -> set[str]:
    """The package's modules that module `name` imports anywhere in it, function-level
    imports included (a lazy import is still a dependency)."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("lowmem_cnn."))
        elif isinstance(node, ast.ImportFrom):
            # `from . import x` and `from .x import y` (level 1) are the package's too
            module = "lowmem_cnn" + (f".{node.module}" if node.module else "") if node.level else node.module
            if module.startswith("lowmem_cnn."):
                found.add(module.split(".")[1])
            elif module == "lowmem_cnn":  # x is a module, or a name the package itself defines
                found.update(alias.name if alias.name in MODULES else "__init__" for alias in node.names)
    return found & MODULES


GRAPH = {name: imported_modules(name) for name in MODULES}


def reachable(start: str) -> set[str]:
    seen, todo = set(), list(GRAPH[start])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(GRAPH[name])
    return seen


def test_the_graph_sees_module_and_function_level_imports():
    assert "datasets" in GRAPH["data"]  # at module level
    assert "folders" in GRAPH["data"]  # inside open_data: a lazy import is an edge too


@pytest.mark.parametrize("name", ["data", "folders", "datasets"])
def test_no_data_module_imports_itself_back(name):
    assert name not in reachable(name), f"{name} imports a module that imports {name}"


def test_the_shared_module_imports_neither_side():
    assert not {"data", "folders"} & reachable("datasets")
    assert "data" not in reachable("folders")
