"""The package's folders import one another one way only: common/ is beneath everything,
the engine and the data readers import nothing above them, and the memory code (budget,
planner) stands on the engine but imports no face, no training and no files. Within
data/, the modules import one way: idx -> folders -> datasets.

Every import counts, those inside functions too: a lazy import is still a dependency."""

import ast
from pathlib import Path

import pytest

import lowmem_cnn

PACKAGE = Path(lowmem_cnn.__file__).parent
ROOT = "lowmem_cnn"  # the package itself: its __init__ (the BLAS environment, the version)


def module_name(path: Path) -> str:
    """lowmem_cnn.common.reading for common/reading.py; a folder's __init__ is the folder."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((ROOT, *parts))


SOURCES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported_modules(source: str, name: str, is_package: bool = False) -> set[str]:
    """The package's modules that the module `name` (whose text is `source`) imports
    anywhere in it: `import lowmem_cnn.x`, `from lowmem_cnn.x import y`, `from lowmem_cnn
    import x` and relative imports, at module level or inside functions."""
    found = set()
    here = name if is_package else name.rpartition(".")[0]  # what a relative import starts from
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here.split(".")[: len(here.split(".")) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            # `from lowmem_cnn.data import folders` imports a module; `from x import name`, x
            found.update(f"{module}.{alias.name}" if f"{module}.{alias.name}" in SOURCES else module
                         for alias in node.names)
    return {module for module in found if module == ROOT or module.startswith(ROOT + ".")}


GRAPH = {name: imported_modules(path.read_text(), name, path.name == "__init__.py")
         for name, path in SOURCES.items()}


def folder(name: str) -> str:
    """Where a module stands: its folder (common, engine, ...), the face it is (cli,
    book, ...), or ROOT for the package's __init__."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ROOT


# What each folder may import, besides ROOT (which any import runs first).
ALLOWED = {
    "common": {"common"},
    "engine": {"engine", "common"},
    "data": {"data", "common"},
    "memory": {"memory", "engine", "common"},
    ROOT: {"engine", "common"},  # default_threads asks the engine's blas
}


@pytest.mark.parametrize("below", sorted(ALLOWED))
def test_a_folder_imports_nothing_above_it(below):
    modules = [name for name in GRAPH if folder(name) == below]
    assert modules, f"no module in {below}: the graph is not the package's"
    wrong = {f"{name} imports {module}" for name in modules for module in GRAPH[name]
             if folder(module) not in ALLOWED[below] | {ROOT}}
    assert not wrong, f"{below} may import only {', '.join(sorted(ALLOWED[below]))}: " + \
        "; ".join(sorted(wrong))


def test_the_graph_sees_module_and_function_level_imports():
    idx = GRAPH["lowmem_cnn.data.idx"]
    assert "lowmem_cnn.data.datasets" in idx  # at module level
    assert "lowmem_cnn.data.folders" in idx  # `from lowmem_cnn.data import folders`, in a function
    assert "lowmem_cnn.engine.blas" in GRAPH[ROOT]  # inside default_threads


def test_every_form_of_import_is_an_edge():
    source = ("import numpy\n"
              "from lowmem_cnn.common.errors import LowmemError\n"
              "from lowmem_cnn import __version__\n"
              "from . import augment\n"
              "from ..engine.layers import Affine\n"
              "def late():\n"
              "    import lowmem_cnn.memory.budget\n"
              "    from lowmem_cnn.files import params\n"
              "    class Inner:\n"
              "        from .. import cli\n")
    assert imported_modules(source, "lowmem_cnn.data.folders") == {
        "lowmem_cnn.common.errors", ROOT, "lowmem_cnn.data.augment", "lowmem_cnn.engine.layers",
        "lowmem_cnn.memory.budget", "lowmem_cnn.files.params", "lowmem_cnn.cli"}
    # from a folder's __init__, `.` is the folder itself
    assert imported_modules("from .reading import shown\n", "lowmem_cnn.common", is_package=True) == \
        {"lowmem_cnn.common.reading"}


DATA = ["lowmem_cnn.data.idx", "lowmem_cnn.data.folders", "lowmem_cnn.data.datasets"]


def reachable(start: str) -> set[str]:
    seen, todo = set(), list(GRAPH[start])
    while todo:
        name = todo.pop()
        if name not in seen and name in GRAPH:
            seen.add(name)
            todo.extend(GRAPH[name])
    return seen


@pytest.mark.parametrize("name", DATA)
def test_no_data_module_imports_itself_back(name):
    assert name not in reachable(name), f"{name} imports a module that imports {name}"


def test_the_shared_data_module_imports_neither_side():
    idx, folders, datasets = DATA
    assert not {idx, folders} & reachable(datasets)
    assert idx not in reachable(folders)
