"""The package layers, read from the source with `ast` (nothing is imported): no module
imports one from a higher layer, and no modules import each other in a cycle. Imports
inside functions count: they run as soon as the function does."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PACKAGE = os.path.join(ROOT, "lsp_jax")

# Lowest first. A module may import its own layer and those below it. Module names map
# to the longest prefix listed here.
LAYERS = (
    ("lsp_jax", "lsp_jax.errors"),
    ("lsp_jax.runtime", "lsp_jax.data"),
    ("lsp_jax.model",),
    ("lsp_jax.weights",),
    ("lsp_jax.sampling",),
    ("lsp_jax.game", "lsp_jax.rl"),
    ("lsp_jax.tpu", "lsp_jax.eval"),
    ("lsp_jax.train",),
    ("lsp_jax.commands", "lsp_jax.cli"),
)


def module_files(package_dir=PACKAGE) -> dict[str, tuple[str, bool]]:
    """Module name -> (file, is a package's __init__)."""
    modules = {}
    root = os.path.dirname(package_dir)
    for folder, _, files in os.walk(package_dir):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
            is_package = parts[-1] == "__init__"
            modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _imported(name: str, is_package: bool, node, modules) -> list[str]:
    """The lsp_jax modules an import statement loads (a module, not the names in it)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = name.split(".") if is_package else name.split(".")[:-1]
            here = here[: len(here) - (node.level - 1)]
            base = ".".join(here + ([node.module] if node.module else []))
        # `from package import module` loads the module; `from module import name` the module.
        targets = [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
            for alias in node.names
        ]
    found = []
    for target in targets:
        while target not in modules and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in modules and target != name:
            found.append(target)
    return found


def import_graph(package_dir=PACKAGE) -> dict[str, set[str]]:
    """Module -> the lsp_jax modules it imports anywhere in its source."""
    modules = module_files(package_dir)
    graph = {}
    for name, (path, is_package) in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        graph[name] = {
            target
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for target in _imported(name, is_package, node, modules)
        }
    return graph


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add its package to LAYERS.")
    return best


def upward_imports(graph) -> list[str]:
    return sorted(
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(module)
    )


def cycles(graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_module_imports_a_higher_layer():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def _write(root, relative, text=""):
    path = os.path.join(root, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


@pytest.mark.parametrize(
    "files, upward, cyclic",
    [
        (  # A function-local import from model/ up into train/.
            {"model/llama.py": "def f():\n    from lsp_jax.train import loop\n"},
            ["lsp_jax.model.llama (layer 2) imports lsp_jax.train.loop (layer 7)"],
            [],
        ),
        (  # Two modules of one layer importing each other, one of them relatively.
            {
                "weights/hf.py": "from lsp_jax.weights import sharded\n",
                "weights/sharded.py": "from .hf import load_hf\n",
            },
            [],
            [["lsp_jax.weights.hf", "lsp_jax.weights.sharded"]],
        ),
    ],
)
def test_the_checks_catch_bad_imports(tmp_path, files, upward, cyclic):
    """A bad import in a small tree of the same shape is reported."""
    package = os.path.join(tmp_path, "lsp_jax")
    for relative in ["__init__.py", "model/__init__.py", "weights/__init__.py"]:
        _write(package, relative)
    _write(package, "train/__init__.py")
    _write(package, "train/loop.py")
    for relative, text in files.items():
        _write(package, relative, text)
    graph = import_graph(package)
    assert upward_imports(graph) == upward
    assert cycles(graph) == cyclic


def test_the_train_loop_does_not_import_the_commands():
    code = (
        "import sys\n"
        "import lsp_jax.train.loop\n"
        "print(sorted(m for m in sys.modules if m.startswith('lsp_jax.commands')))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "[]"
