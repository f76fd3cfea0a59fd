"""The import graph of ``fedbench`` (its ``fedbench.methods`` live in the repository's methods/) has no cycle, counting imports inside functions (the usual way
to dodge one) and ignoring ``TYPE_CHECKING`` blocks and a module's imports of its own parent package."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_imports() -> dict[str, set[str]]:
    files = {".".join((prefix, *p.relative_to(ROOT / folder).with_suffix("").parts)).removesuffix(".__init__"): p
             for prefix, folder in (("fedbench", "fedbench"), ("fedbench.methods", "methods"))
             for p in (ROOT / folder).rglob("*.py")}

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        hidden = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                  for n in ast.walk(node)}
        targets = set()
        for node in ast.walk(tree):
            if id(node) in hidden:
                continue
            if isinstance(node, ast.Import):
                targets |= {known(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets |= {known(f"{node.module}.{a.name}") or known(node.module) for a in node.names}
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return graph


def test_no_import_cycles():
    graph, done, path = module_imports(), set(), []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
