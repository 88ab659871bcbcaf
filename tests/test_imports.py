"""The project's modules import one another in one direction only (sampler <- rewards <- toyworld <- train <-
evaluate, tools): no import cycle, counting imports inside functions too."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_imports() -> dict[str, set[str]]:
    """{module: the project modules it imports anywhere in its source}."""
    paths = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tools", "*.py"))
    modules = {os.path.splitext(os.path.basename(path))[0]: path for path in paths}
    graph = {}
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
        graph[name] = imported & modules.keys() - {name}
    return graph


def test_no_import_cycle_among_the_project_modules():
    graph = project_imports()
    assert "toyworld" not in graph["rewards"]  # the toy world may import rewards.py, never the reverse
    done, path = set(), []

    def visit(module):
        assert module not in path, f"import cycle: {' -> '.join([*path[path.index(module) :], module])}"
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
