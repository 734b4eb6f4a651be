"""The layers of the design (../shared/DESIGN.md, "Layers") hold in the code: no import runs
upward, no cycle between packages, no two modules importing each other.

    storage (SQL only) <- the kernel (guildtune/ minus the application) <- trainer/ and bot/
    (never importing each other) <- the application (guildtune.cli*, guildtune.demo*,
    guildtune.report, guildtune.__main__, bot.runner, bot.console)

Every module of the four packages is parsed (not imported), and every import counts: at module
level, inside functions and under ``if TYPE_CHECKING:`` alike, since each is a dependency that a
reader and a refactoring have to follow.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("storage", "guildtune", "trainer", "bot")

# Modules at the top, which may import anything (prefixes of dotted names).
APPLICATION = ("guildtune.cli", "guildtune.demo", "guildtune.report", "guildtune.__main__",
               "bot.runner", "bot.console")

# What each layer may import (its own layer included); "discord" stands for discord.py.
ALLOWED = {
    "storage": {"storage"},
    "kernel": {"kernel", "storage"},
    "trainer": {"trainer", "kernel", "storage"},
    "bot": {"bot", "kernel", "storage", "discord"},
    "application": {"application", "bot", "trainer", "kernel", "storage", "discord"},
}

# Known violations, each with why it is still there and what removes it: (importer module,
# imported module) -> reason. A listed edge that no longer occurs fails the test too, so the
# list only shrinks.
ALLOWED_VIOLATIONS: dict[tuple[str, str], str] = {
    # Empty: the scheduler (which only enqueues and applies retention) is kernel code,
    # guildtune.schedule, so the Cog builds it without importing the trainer.
}


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int

    def __str__(self) -> str:
        return (f"{self.importer} ({layer(self.importer)}) imports {self.imported} "
                f"({layer(self.imported)}), line {self.line}")


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the four packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def layer(module: str) -> str:
    top = module.split(".")[0]
    if top == "discord":
        return "discord"
    if any(module == p or module.startswith(p) for p in APPLICATION):
        return "application"
    return "kernel" if top == "guildtune" else top


def _target(name: str, known: dict[str, Path]) -> str:
    """The most specific known module a dotted import name refers to."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in known:
            return ".".join(parts)
        parts.pop()
    return name


def imports(module: str, path: Path, known: dict[str, Path]) -> list[Edge]:
    """Every import of ``module`` that reaches one of the packages or discord."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    edges = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # ``from pkg import mod`` imports the module pkg.mod when there is one.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        for name in names:
            if name.split(".")[0] in (*PACKAGES, "discord"):
                edges.append(Edge(module, _target(name, known), node.lineno))
    return edges


def all_edges() -> list[Edge]:
    known = modules()
    return [e for m, p in known.items() for e in imports(m, p, known)]


def upward(edges: list[Edge]) -> list[Edge]:
    """Edges a layer may not have (ALLOWED)."""
    return [e for e in edges if layer(e.imported) not in ALLOWED[layer(e.importer)]]


def package_cycles(edges: list[Edge]) -> list[list[str]]:
    """Cycles in the graph of layers (storage, kernel, trainer, bot, application)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        a, b = layer(e.importer), layer(e.imported)
        if a != b and b != "discord":
            graph.setdefault(a, set()).add(b)
    cycles, seen = [], set()

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cyc = path[path.index(nxt):]
                key = frozenset(cyc)
                if key not in seen:
                    seen.add(key)
                    cycles.append(cyc + [nxt])
            else:
                walk(nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, [start])
    return cycles


def report() -> tuple[list[Edge], list[list[str]]]:
    edges = all_edges()
    return upward(edges), package_cycles(edges)


def test_the_walk_sees_every_package_and_function_level_imports() -> None:
    """The checker itself: it finds modules of each package and an import inside a function
    (guildtune.cli imports storage only inside ``_store``)."""
    known = modules()
    assert {m.split(".")[0] for m in known} == set(PACKAGES)
    edges = imports("guildtune.cli", known["guildtune.cli"], known)
    assert any(e.imported.startswith("storage") for e in edges)
    assert layer("guildtune.cli_train") == layer("bot.runner") == "application"
    assert layer("guildtune.config") == "kernel" and layer("trainer.fit") == "trainer"


def test_the_rules_catch_an_upward_edge_and_a_cycle() -> None:
    """The checker on made-up edges: each rule of the brief, and a cycle between packages."""
    bad = [Edge("storage.store", "guildtune.config", 1), Edge("guildtune.config", "bot.cog", 1),
           Edge("trainer.fit", "bot.engine", 1), Edge("trainer.fit", "discord", 1),
           Edge("bot.handlers", "trainer.schedule", 1),
           Edge("guildtune.models", "guildtune.cli", 1)]
    assert upward(bad) == bad
    fine = [Edge("bot.runner", "trainer.worker", 1), Edge("guildtune.cli", "bot.handlers", 1),
            Edge("trainer.fit", "guildtune.prompting", 1), Edge("bot.cog", "discord", 1)]
    assert upward(fine) == []
    assert package_cycles([Edge("trainer.fit", "bot.engine", 1),
                           Edge("bot.engine", "trainer.publish", 1)]) == [
        ["bot", "trainer", "bot"]]


def test_no_import_runs_upward() -> None:
    bad, _ = report()
    for e in bad:
        print("upward:", e, "(allow-listed)" if (e.importer, e.imported) in ALLOWED_VIOLATIONS
              else "")
    new = [str(e) for e in bad if (e.importer, e.imported) not in ALLOWED_VIOLATIONS]
    assert not new, "imports against the layers (README, Architecture):\n" + "\n".join(new)


def test_the_allow_list_only_shrinks() -> None:
    bad, _ = report()
    present = {(e.importer, e.imported) for e in bad}
    stale = [f"{a} -> {b}" for a, b in ALLOWED_VIOLATIONS if (a, b) not in present]
    assert not stale, "fixed: remove from ALLOWED_VIOLATIONS:\n" + "\n".join(stale)


def test_no_cycle_between_packages() -> None:
    edges = [e for e in all_edges()
             if (e.importer, e.imported) not in ALLOWED_VIOLATIONS]
    cycles = package_cycles(edges)
    for c in package_cycles(all_edges()):
        print("cycle:", " -> ".join(c))
    assert not cycles, "cycles between layers: " + "; ".join(" -> ".join(c) for c in cycles)


def module_cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected groups of modules (two or more that reach each other through
    imports), e.g. an engine and a client that import each other. An import of one's own parent
    package is not an edge: Python runs the package first anyway."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        a, b = e.importer, e.imported
        if a != b and not a.startswith(b + ".") and b.split(".")[0] in PACKAGES:
            graph.setdefault(a, set()).add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_no_two_modules_import_each_other() -> None:
    cycles = module_cycles(all_edges())
    assert not cycles, "modules that import each other:\n" + "\n".join(map(str, cycles))


def test_the_module_cycle_check_catches_a_pair() -> None:
    pair = [Edge("bot.engine.base", "bot.engine.local", 1),
            Edge("bot.engine.local", "bot.engine.base", 2),
            Edge("bot.engine.local", "bot.engine", 3)]  # its own package: not an edge
    assert module_cycles(pair) == [["bot.engine.base", "bot.engine.local"]]
    assert module_cycles(pair[1:]) == []
