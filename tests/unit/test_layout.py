"""The package's layout holds: no import cycles among pipeline/ modules, and imports flow one way
(cli -> stages -> core -> runtime -> config/errors). The import graph is read from the source with `ast`,
imports inside functions included: an import hidden in a function is still a dependency."""
from __future__ import annotations

import ast
from pathlib import Path

from pipeline.config import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "pipeline"
# A layer may import its own layer and the ones below it, never one above.
LAYERS = {"cli": 4, "stages": 3, "core": 2, "runtime": 1}
BOTTOM = {"pipeline.config", "pipeline.errors"}  # imported by every layer; import nothing from pipeline/


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(tree: ast.AST, known: set[str]) -> set[str]:
    """The pipeline modules a module's source imports (at any depth: top level, functions, branches)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline.core import losses` imports the module pipeline.core.losses
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import pipeline.core.losses.x`: its deepest known module
                name = name.rpartition(".")[0]
            if name.startswith("pipeline"):
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    graph = {}
    for name, path in found.items():
        graph[name] = imported(ast.parse(path.read_text(), str(path)), known) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None. Depth-first search with three colours."""
    state = {}  # absent: unvisited, 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def layer(module: str) -> int | None:
    parts = module.split(".")
    if module in BOTTOM:
        return 0
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS[parts[1]]
    return None  # pipeline/__main__.py and the old command paths: the top, they may import anything


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is no cycle
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_the_graph_sees_imports_inside_functions():
    source = "import os\nfrom pipeline.core import losses\ndef f():\n    from pipeline.stages.train import run\n"
    known = {"pipeline", "pipeline.core", "pipeline.core.losses", "pipeline.stages", "pipeline.stages.train"}
    assert imported(ast.parse(source), known) == {"pipeline.core", "pipeline.core.losses", "pipeline.stages.train"}


def test_no_import_cycle_among_pipeline_modules():
    graph = import_graph()
    assert len(graph) > 30 and "pipeline.core.losses" in graph["pipeline.core.scoring"]  # the graph is the real one
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_flow_one_way_cli_stages_core_runtime():
    wrong = []
    for module, targets in import_graph().items():
        here = layer(module)
        for target in targets:
            there = layer(target)
            if here is not None and there is not None and there > here:
                wrong.append(f"{module} imports {target}")
            if module in BOTTOM and target != "pipeline":
                wrong.append(f"{module} imports {target} (config and errors import nothing from pipeline/)")
    assert not wrong, "imports against the layers (cli -> stages -> core -> runtime):\n" + "\n".join(sorted(wrong))


OPTIONAL = ("vllm", "deepspeed", "wandb", "huggingface_hub")  # installed only where they are used
MAX_FUNCTION_LINES = 60


def inner_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import inside a function."""
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    found += [(node.lineno, alias.name) for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    found.append((node.lineno, node.module or ""))
    return found


def test_imports_inside_functions_are_only_of_optional_packages():
    assert inner_imports(ast.parse("import os\ndef f():\n    import wandb\n    from pipeline import x\n")) == [(3, "wandb"), (4, "pipeline")]
    wrong = []
    for name, path in modules().items():
        for line, module in inner_imports(ast.parse(path.read_text())):
            if module.split(".")[0] not in OPTIONAL and not module.startswith("transformers.integrations.deepspeed"):
                wrong.append(f"{path.relative_to(PROJECT_ROOT)}:{line} imports {module} inside a function")
    assert not wrong, "move these imports to the top of the module:\n" + "\n".join(wrong)


def test_no_function_is_longer_than_sixty_lines():
    wrong = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    wrong.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not wrong, f"functions over {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(wrong)


def test_every_pipeline_import_names_a_module_of_this_package():
    """An old path (`from pipeline.evaluate import ...`) must fail here, not resolve to another checkout's copy
    through an editable install."""
    found = modules()
    sources = [*found.values(), *sorted((PROJECT_ROOT / "tests").rglob("*.py")), *sorted((PROJECT_ROOT / "benchmarks").glob("*.py"))]
    wrong = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
                targets = [node.module] if node.module in found else []
                if not targets:
                    wrong.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} from {node.module}")
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if node.module in found and found[node.module].name == "__init__.py" and full not in found:
                        wrong.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} from {node.module} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "pipeline" and alias.name not in found:
                        wrong.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} import {alias.name}")
    assert not wrong, "imports of modules this package does not have:\n" + "\n".join(wrong)
