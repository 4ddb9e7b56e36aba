"""The package's import graph: no cycle among its modules, and every import goes down the layers of
docs/design.md#layers. Imports are read from the source (ast), function-level ones included, so a lazy import
that would close a cycle counts as one."""

import ast
import os
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "llava_cot_jax"

# Layer of each top-level module or subpackage, lowest first; a module may import its own layer's modules
# and any layer below, except that train/ and generate/ never import each other.
LAYERS = {
    "ground": {"models", "data", "sharding", "config_schema", "config_file", "aot", "files", "cli_errors"},
    "resolution": {"checkpoint", "families", "loading"},
    "jobs": {"train", "generate"},
    "evaluation": {"eval", "serve"},
    "top": {"main", "demo", "study", "aot_compile"},
}
LEVEL = {part: level for level, parts in enumerate(LAYERS.values()) for part in parts}
NEVER = {("train", "generate"), ("generate", "train"), ("models", "data"), ("data", "models")}


def package_modules() -> dict[str, str]:
    modules = {}
    for directory, _, files in os.walk(os.path.join(REPO, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
                modules[module.removesuffix(".__init__")] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (at any level of its code)."""
    modules = package_modules()
    graph = defaultdict(set)
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import submodule` depends on the submodule; `from module import name` on the module.
                names = [
                    f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                    for alias in node.names
                ]
            else:
                continue
            graph[module].update(n for n in names if n in modules and n not in (module, PACKAGE))
    return graph


def part(module: str) -> str:
    return module.split(".")[1]


def test_no_import_cycle():
    graph = import_graph()
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in list(package_modules()):
        if module not in index:
            visit(module)
    assert not cycles, cycles


def test_imports_go_down_the_layers():
    graph = import_graph()
    unknown = sorted({part(m) for m in package_modules() if m != PACKAGE} - set(LEVEL))
    assert not unknown, f"modules with no layer in LAYERS (add them, and to docs/design.md): {unknown}"
    upward = [
        f"{a} -> {b}"
        for a, targets in graph.items()
        for b in targets
        if a != PACKAGE and (LEVEL[part(b)] > LEVEL[part(a)] or (part(a), part(b)) in NEVER)
    ]
    assert not upward, upward


def test_the_checker_sees_function_level_imports():
    """A lazy import inside a function is an edge (that is how a cycle used to hide)."""
    graph = import_graph()
    assert "llava_cot_jax.generate.cli" in graph["llava_cot_jax.eval.run"]  # imported inside eval.run._answer
