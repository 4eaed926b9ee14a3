"""medjax's imports point down the layers of docs/ARCHITECTURE.md, with no cycles.

The graph is built statically (``ast``) from every ``import`` in medjax/, the ones inside
functions included (a lazy import is still a dependency). The layers are read from the table
in docs/ARCHITECTURE.md, so the page and the code cannot drift apart: a module the table does not
place fails the test, and so does an import of a higher layer or a cycle.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medjax"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module → the medjax modules it imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                candidates = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                              for a in node.names]
            else:
                continue
            for target in candidates:
                while target and target not in files:     # medjax.x.attr → medjax.x
                    target = target.rpartition(".")[0]
                if target.startswith("medjax") and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def documented_layers() -> list[tuple[str, list[str]]]:
    """``[(layer, [module prefixes])]`` from the dependency table of docs/ARCHITECTURE.md, top first."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("## Dependencies", 1)[1].split("\n## ", 1)[0]
    layers = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[1].startswith("`medjax"):
            layers.append((cells[0], re.findall(r"`(medjax[\w.]*)`", cells[1])))
    assert len(layers) >= 5, f"docs/ARCHITECTURE.md: no dependency table found ({layers})"
    return layers


def layer_of(module: str, layers) -> int | None:
    """Index of the layer whose longest prefix matches ``module``; ``medjax`` (the package's
    ``__init__``) matches only itself, so it places no other module."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            covers = module == prefix or (prefix != "medjax" and module.startswith(prefix + "."))
            if covers and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_documented_layer():
    layers = documented_layers()
    unplaced = sorted(m for m in import_graph() if layer_of(m, layers) is None)
    assert not unplaced, f"modules docs/ARCHITECTURE.md's dependency table does not place: {unplaced}"


def test_imports_point_down():
    layers = documented_layers()
    upward = []
    for module, targets in sorted(import_graph().items()):
        here = layer_of(module, layers)
        for target in sorted(targets):
            there = layer_of(target, layers)
            if here is not None and there is not None and there < here:
                upward.append(f"{module} ({layers[here][0]}) imports {target} ({layers[there][0]})")
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_ops_import_nothing_of_medjax():
    graph = import_graph()
    outside = {m: sorted(t for t in ts if not t.startswith("medjax.ops"))
               for m, ts in graph.items() if m.startswith("medjax.ops")}
    assert not {m: ts for m, ts in outside.items() if ts}


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checker_sees_cycles_and_upward_imports():
    """The checks above can fail: a made-up graph with a cycle and an upward import."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    layers = documented_layers()
    assert layer_of("medjax.ops.attention", layers) > layer_of("medjax.models.decoder", layers)
    assert layer_of("medjax.lora", layers) > layer_of("medjax.train.loop", layers)
    assert layer_of("medjax.not_in_the_table", layers) is None    # "medjax" places only __init__
    # config, data, train and eval are layers of their own, in this order (bottom up)
    order = [layer_of(m, layers) for m in ("medjax.config", "medjax.data.pipeline", "medjax.train.loop",
                                           "medjax.eval.runner", "medjax.run", "medjax.train.__main__")]
    assert order == sorted(order, reverse=True) and len(set(order)) == len(order), order
    # an import inside a function is a dependency too (sources reads tfds only when asked)
    assert "medjax.data.tfds_builders" in import_graph()["medjax.data.sources"]


def test_no_module_imports_a_cli():
    """Every CLI is ``medjax/<command>/__main__.py`` and nothing of medjax imports one: what two
    commands share is a library module."""
    graph = import_graph()
    clis = {m for m in graph if m.endswith(".__main__")}
    assert {"medjax.train.__main__", "medjax.plan.__main__", "medjax.recipes.__main__"} <= clis
    importers = {m: sorted(t for t in ts if t in clis) for m, ts in graph.items()}
    assert not {m: ts for m, ts in importers.items() if ts}
    tops = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert not {"train", "eval", "export", "generate", "bench", "plan", "recipes", "arena"} & tops, \
        "a command is a package with a __main__.py, not a top-level module"
