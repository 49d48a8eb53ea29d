"""mrl runs without sentence-transformers: nothing in the library, or in train.py, imports it."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "mrl").rglob("*.py")) + [REPO / "train.py"]

PROBE = """
import importlib, json, pkgutil, sys
import mrl
names = ["mrl"] + [m.name for m in pkgutil.walk_packages(mrl.__path__, "mrl.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in %r)}))
"""


def probe(packages):
    result = subprocess.run([sys.executable, "-c", PROBE % (tuple(packages),)], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fresh_import():
    """In a fresh interpreter: import mrl and every submodule, then list what of these packages got loaded."""
    return probe(["sentence_transformers", "accelerate"])


def test_importing_every_mrl_module_does_not_import_sentence_transformers(fresh_import):
    expected = {".".join(("mrl",) + p.relative_to(REPO / "mrl").with_suffix("").parts).removesuffix(".__init__")
                for p in (REPO / "mrl").rglob("*.py")}
    assert set(fresh_import["modules"]) == expected
    assert [m for m in fresh_import["loaded"] if m.startswith("sentence_transformers")] == []


BACKBONE_ONLY = """
import json, sys
from transformers import AutoConfig, AutoModel, AutoTokenizer
print(json.dumps({"loaded": sorted(m for m in sys.modules if m.split(".")[0] == "accelerate")}))
"""


def test_the_library_does_not_import_accelerate(fresh_import):
    """Only train.py uses Accelerate, so research code can import mrl without it. Some transformers releases
    (before 5.21) load accelerate themselves when AutoModel is imported; mrl must add nothing to that."""
    result = subprocess.run([sys.executable, "-c", BACKBONE_ONLY], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    by_transformers = set(json.loads(result.stdout.strip().splitlines()[-1])["loaded"])
    by_mrl = [m for m in fresh_import["loaded"] if m.startswith("accelerate") and m not in by_transformers]
    assert by_mrl == []


def imported_modules(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(
                node.args[0].value, str) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__"):
            yield node.args[0].value


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_source_file_imports_sentence_transformers(path):
    if not path.is_file():
        pytest.skip(f"{path.name} does not exist (yet)")
    imports = [m for m in imported_modules(path) if m.split(".")[0] == "sentence_transformers"]
    assert imports == [], f"{path.name} imports {imports}"
    # nor any textual form the AST walk could miss
    assert not re.search(r"^\s*(from|import)\s+sentence_transformers\b", path.read_text(encoding="utf-8"),
                         flags=re.MULTILINE)
