"""The package's structure: imports form no circle and never climb back up.

Every `import` and `from ... import` of the package is read with `ast`, including
the ones inside functions (a lazy import is still a dependency). A module depends
on the modules it names; `from bireal_tf.x import y` names `bireal_tf.x.y` when
that is a module, else `bireal_tf.x`.
"""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bireal_tf"

# Floors, bottom up: a module may import its own floor's modules and lower ones only.
FLOORS = {
    "bireal_tf._keras_setup": 0, "bireal_tf.utils": 0, "bireal_tf.quantizers": 0,
    "bireal_tf.metrics": 0,
    "bireal_tf.data": 0,
    "bireal_tf.models": 1,
    "bireal_tf.export": 2,
    "bireal_tf.interop": 3, "bireal_tf.evaluate": 3,
    "bireal_tf.recipes": 4,
}


def _modules():
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name, path, modules):
    """The package modules that module `name` names in its imports."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    return out


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _floor(module):
    for prefix, floor in FLOORS.items():
        if module == prefix or module.startswith(prefix + "."):
            return floor
    return None  # the package's own __init__


def test_the_graph_is_read_from_real_imports():
    graph = _graph()
    # Edges we know exist, so a reader that finds nothing cannot pass the tests below.
    assert "bireal_tf.models.larq_zoo" in graph["bireal_tf.models.bireal"]
    assert "bireal_tf.models.int8" in graph["bireal_tf.export.convert"]
    assert "bireal_tf.models.int8" in graph["bireal_tf.recipes.int8"]
    assert "bireal_tf.export" in graph["bireal_tf.recipes.deploy"]  # a lazy import, inside a function
    assert sum(len(v) for v in graph.values()) > 60


def test_no_import_circles():
    graph = _graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_never_climb_to_a_higher_floor():
    climbs = [f"{a} -> {b}" for a, targets in _graph().items() for b in targets
              if _floor(a) is not None and _floor(b) is not None and _floor(b) > _floor(a)]
    assert not climbs, "imports that climb back up: " + ", ".join(sorted(climbs))


def test_the_int8_training_model_is_built_without_export():
    graph = _graph()
    for module in ("bireal_tf.models.int8", "bireal_tf.models.precision"):
        assert not any(t.startswith("bireal_tf.export") for t in graph[module]), module
    # recipes/int8 builds its model from models/; export only for --export's conversion
    tree = ast.parse((PACKAGE / "recipes" / "int8.py").read_text(encoding="utf-8"))
    top_level = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert "bireal_tf.models.int8" in top_level
    assert not any(m.startswith("bireal_tf.export") for m in top_level)


def test_old_import_paths_are_gone():
    for module, name in (("bireal_tf.export", "int8_model"), ("bireal_tf.interop", "from_larq_zoo")):
        assert not hasattr(importlib.import_module(module), name)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("bireal_tf.export.int8")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("bireal_tf.fake_quant")


def test_train_has_one_meaning_whatever_was_imported_first():
    """The CLI module first, then the function (a fresh interpreter, so nothing was imported
    before): `train_recipe` is the function, `bireal_tf.recipes.train` the CLI module."""
    code = (
        "import bireal_tf.recipes.train as cli\n"
        "from bireal_tf.recipes import train, train_recipe\n"
        "from bireal_tf.recipes.loop import train_recipe as loop_fn\n"
        "assert train is cli and hasattr(cli, 'main'), train\n"
        "assert callable(train_recipe) and train_recipe is loop_fn\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=900, cwd=PACKAGE.parent)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
