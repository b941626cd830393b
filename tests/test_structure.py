"""The package's shape: imports point one way (import-linter contracts in pyproject.toml), no cycles."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_hold():
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    proc = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _cycle(graph, modules):
    """One import cycle among ``modules`` (a list of names), or None. Iterative DFS, three colours."""
    colour = {m: 0 for m in modules}
    for start in modules:
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child) == 1:
                return path[path.index(child):] + [child]
            elif colour.get(child) == 0:
                colour[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
    return None


def test_no_import_cycle_between_modules():
    import grimp

    graph = grimp.build_graph("byzerllm_spark", cache_dir=None)
    # The package's __init__ imports nothing of its own (PEP 562 lazy exports), so it is no hub.
    modules = sorted(graph.modules)
    cycle = _cycle(graph, modules)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    class Graph:
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}

        def find_modules_directly_imported_by(self, module):
            return self.edges[module]

    assert _cycle(Graph(), ["a", "b", "c", "d"]) == ["a", "b", "c", "a"]
    Graph.edges["c"] = set()
    assert _cycle(Graph(), ["a", "b", "c", "d"]) is None
