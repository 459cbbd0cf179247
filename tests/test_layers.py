"""The package's layers never point back up: no import cycle between bridle_jax modules, and config.py (the
defaults every layer reads) imports nothing of bridle_jax but `validation`.

Read from the source with `ast`, so the imports inside functions count as well as the module-level ones (a lazy
import hides a cycle from Python, not from the layering): nothing is imported or executed.
"""

import ast
import pathlib

PACKAGE = "bridle_jax"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the package by dotted name (a package by its name, read from its __init__.py)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The package modules `name` imports anywhere in its source (`import a.b`, `from a import b`, relative)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module itself
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of an attribute path: its longest module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (an iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_config_imports_only_validation():
    assert import_graph()[f"{PACKAGE}.config"] <= {f"{PACKAGE}.validation"}


def test_the_graph_sees_function_level_and_relative_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    g = import_graph()
    assert f"{PACKAGE}.validation" in g[f"{PACKAGE}.data.audio_pipeline"]  # a module-level `from ... import`
    assert f"{PACKAGE}.data.sources" in g[f"{PACKAGE}.data.video_sources"]  # imported inside a function
    assert f"{PACKAGE}.fbank" in g[f"{PACKAGE}.models.bridle"]
