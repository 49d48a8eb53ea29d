"""The package's layout: sub-packages by job whose imports point one way (down this order), no import cycles,
and an __init__ docstring in each that names every file it holds."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "mrl"
# each part may import only earlier ones; mteb: the launcher of python -m mrl.mteb (mrl/eval/mteb.py)
ORDER = ["cli", "sources", "loss", "model", "retrieval", "data", "eval", "run", "mteb"]
MODULES = sorted(p for p in ROOT.rglob("*.py"))


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def mrl_imports(path: pathlib.Path) -> set[str]:
    """Every mrl module `path` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (mrl uses absolute imports, mrl.<package>.<module>)")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mrl":
            names.add(node.module)
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "mrl")
    return names


def group(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""  # mrl.loss.base -> loss; mrl.cli -> cli


@pytest.mark.parametrize("path", [p for p in MODULES if p.parent != ROOT or p.name != "__init__.py"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_order(path):
    own = group(module_name(path))
    assert own in ORDER, f"{path}: not in a known part of the package {ORDER}"
    for imported in mrl_imports(path):
        other = group(imported)
        assert other in ORDER, f"{path} imports {imported}, which is in no part of {ORDER}"
        assert ORDER.index(other) <= ORDER.index(own), (
            f"{module_name(path)} imports {imported}: {other} comes after {own} in {ORDER} (imports point down)")


def test_no_import_cycles():
    graph = {module_name(p): {m for m in mrl_imports(p) if m != module_name(p)} for p in MODULES}
    done, active = set(), []

    def visit(module):
        if module in active:
            raise AssertionError("import cycle: " + " -> ".join(active[active.index(module):] + [module]))
        if module in done or module not in graph:
            return
        active.append(module)
        for imported in graph[module]:
            visit(imported)
        active.pop()
        done.add(module)

    for module in graph:
        visit(module)


@pytest.mark.parametrize("package", sorted(p.parent for p in ROOT.glob("*/__init__.py")), ids=lambda p: p.name)
def test_each_package_says_what_it_holds(package):
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text(encoding="utf-8")))
    assert doc, f"{package}/__init__.py: no docstring"
    missing = [p.name for p in package.glob("*.py") if p.name not in ("__init__.py", "__main__.py") and p.name not in doc]
    assert not missing, f"{package}/__init__.py: its docstring names no {missing}"


def test_the_top_level_holds_few_modules():
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["__init__.py", "cli.py", "mteb.py", "sources.py"]


def test_every_library_the_package_imports_is_bounded_in_pyproject():
    """A library imported at the top of an mrl module is a dependency of the package, with a lower and an upper
    bound: not one that arrives through another's requirements (numpy and pyarrow through datasets, say), whose
    next major a fresh install would take untested. Optional extras (peft, mteb, ...) are imported inside functions."""
    import re
    import sys
    import tomllib

    project = tomllib.loads((ROOT.parent / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    bounds = {re.split(r"[<>=!~ \[]", d)[0].lower(): d for d in project["dependencies"]}
    imported = {}
    for path in MODULES:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # the module's top level
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top != "mrl" and top not in sys.stdlib_module_names:
                    imported.setdefault(top, path.relative_to(ROOT.parent))
    distribution = {"yaml": "pyyaml"}
    for module, where in sorted(imported.items()):
        requirement = bounds.get(distribution.get(module, module))
        assert requirement is not None, f"{where} imports {module}, which pyproject.toml's dependencies do not list"
        assert ">=" in requirement and "<" in requirement, f"{requirement}: a lower and an upper bound"
