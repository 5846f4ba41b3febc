"""The code's shape: layers only import downwards, each shared word is defined once, search only searches."""
from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("fsweep", "search", "fsmodels", "preprocessing", "cluster")  # top to bottom (docs/design.md, 'Layers')
RANK = {name: i for i, name in enumerate(LAYERS)}
SOURCES = sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))
# The shared vocabulary: each name is bound at module level in exactly one file.
VOCABULARY = ("FsweepError", "ConfigError", "VIEWS", "VIEW_CHOICES", "VIEW_ALIASES", "LABEL_NAMES", "LABEL_ALIASES",
              "SPLITS", "HE_MODES", "ASPECTS", "STN_MODES", "SELECTABLE_METRICS", "TRUE_WORDS", "FALSE_WORDS",
              "OFF_WORDS", "parse_flag", "is_off", "normalise_choice", "SPACE_KEYS")


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in the file, module level or inside a function."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def _module_bindings(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_go_down_a_layer(path):
    own = path.relative_to(ROOT).parts[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    upward = [f"line {line}: imports {package}" for line, package in _imports(tree)
              if package in RANK and RANK[package] < RANK[own]]
    assert not upward, f"{path.relative_to(ROOT)} ({own}) imports a higher layer: {upward}"


def test_cluster_imports_nothing_of_ours_but_itself():
    for path in (ROOT / "cluster").rglob("*.py"):
        packages = {package for _, package in _imports(ast.parse(path.read_text()))}
        assert not packages & (set(LAYERS) - {"cluster"}), path


def test_search_holds_only_the_sweep():
    modules = {p.stem for p in (ROOT / "search").glob("*.py")}
    assert not modules & {"cli", "demo", "export", "predict", "cam", "modelcard"}, modules
    assert {"cli", "demo", "export", "predict"} <= {p.stem for p in (ROOT / "fsweep").glob("*.py")}


def test_each_shared_word_is_defined_once():
    where: dict[str, list[str]] = {name: [] for name in VOCABULARY}
    for path in SOURCES:
        bound = _module_bindings(ast.parse(path.read_text()))
        for name in bound & set(VOCABULARY):
            where[name].append(str(path.relative_to(ROOT)))
    assert {name: files for name, files in where.items() if len(files) != 1} == {}


def test_the_vocabulary_is_not_spelled_out_again():
    """No literal ("left", "right") or HE/STN mode tuple outside the module that defines it."""
    from fsmodels.config import STN_MODES
    from preprocessing.vocab import HE_MODES, VIEW_CHOICES, VIEWS

    spelled = {VIEWS: "VIEWS", VIEW_CHOICES: "VIEW_CHOICES", HE_MODES: "HE_MODES", STN_MODES: "STN_MODES"}
    homes = {"VIEWS": "preprocessing/vocab.py", "VIEW_CHOICES": "preprocessing/vocab.py",
             "HE_MODES": "preprocessing/vocab.py", "STN_MODES": "fsmodels/config.py"}
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in node.elts):
                value = tuple(e.value for e in node.elts)
                name = spelled.get(value)
                if name and str(path.relative_to(ROOT)) != homes[name]:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} spells {name}")
    assert not found, found


def test_the_longest_first_module_order_names_only_modules_that_exist():
    from conftest import LONGEST_MODULES

    tests = Path(__file__).resolve().parent
    missing = [name for name in LONGEST_MODULES if not (tests / name).is_file()]
    assert not missing, f"conftest.LONGEST_MODULES names modules that are gone: {missing}"
    assert len(set(LONGEST_MODULES)) == len(LONGEST_MODULES)


def test_make_lets_first_imports_write_the_bytecode_the_install_skips():
    """`make setup` installs without bytecode (--no-compile); under PYTHONDONTWRITEBYTECODE=1 every process of
    `make test` would then compile torch anew, so make's recipes must run without that variable."""
    makefile = (ROOT / "Makefile").read_text()
    assert "--no-compile" in makefile
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(["make", "-s", "-C", str(ROOT), "--eval", 'show-env: ; @echo "[$$PYTHONDONTWRITEBYTECODE]"',
                           "show-env"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr)
