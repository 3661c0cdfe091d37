"""The layout rules of ``clipline/components``, read from the source with ``ast`` (nothing is imported).

- Components are plain library code: no module under ``clipline/components`` imports prefect.
- Imports between component packages go one way. A stage logs through ``tracking`` (the MLflow
  layer: runs, registry, comparison), so ``evaluate`` and ``train`` may import ``tracking``, and
  ``tracking`` imports no stage: not ``evaluate``, not ``train``.
- The checkpoint format has one owner, ``model.checkpoint``: no other module spells its file names.
- The graph of imports between component packages (``curate``, ``model``, ``config``... one node
  per package or top-level module under ``clipline/components``), counting imports at module level
  and inside functions alike, has no cycle.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = "clipline.components"
ROOT = Path(__file__).resolve().parent.parent / "clipline" / "components"


@cache
def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module under clipline/components."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


@cache
def _imports(module: str, path: Path) -> frozenset[str]:
    """Every module ``module`` imports anywhere in its body (module level, functions, classes),
    as absolute dotted names; ``from X import y`` yields both ``X`` and ``X.y`` (y may be a module)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return frozenset(found)


def _unit(name: str) -> str | None:
    """The component package (or top-level module) a dotted name belongs to, None outside components."""
    if not name.startswith(PACKAGE + "."):
        return None
    return name[len(PACKAGE) + 1 :].split(".")[0]


def _graph() -> dict[str, set[str]]:
    """Component package -> the component packages its modules import (itself left out)."""
    graph: dict[str, set[str]] = {}
    for module, path in _modules().items():
        src = _unit(module)
        if src is None:  # clipline/components/__init__.py itself
            continue
        deps = graph.setdefault(src, set())
        for name in _imports(module, path):
            dst = _unit(name)
            if dst is not None and dst != src:
                deps.add(dst)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path [a, b, ..., a], or None when it is acyclic."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_walk_sees_every_component_package_and_function_level_imports():
    graph = _graph()
    assert {"curate", "evaluate", "ingest", "model", "tracking", "train", "config"} <= set(graph)
    # evaluate.stage logs into MLflow through tracking.runs from inside a function
    assert "tracking" in graph["evaluate"]


def test_no_component_imports_prefect():
    offenders = sorted(
        module
        for module, path in _modules().items()
        if any(name == "prefect" or name.startswith("prefect.") for name in _imports(module, path))
    )
    assert offenders == [], f"components must not import prefect (flows wire them into Prefect): {offenders}"


def test_tracking_imports_no_stage():
    graph = _graph()
    assert graph["tracking"].isdisjoint({"evaluate", "train", "curate", "ingest"}), graph["tracking"]


def test_component_packages_import_each_other_without_cycles():
    graph = _graph()
    cycle = _cycle(graph)
    assert cycle is None, f"import cycle between component packages: {' -> '.join(cycle)}; graph: {graph}"


def test_only_the_checkpoint_module_names_checkpoint_files():
    """The checkpoint format has one owner: no other module of the package spells its file names
    (they use the constants of model.checkpoint)."""
    names = {
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "clipline.json",
        "open_clip_pytorch_model.bin",
        "open_clip_model.bin",
        "model.pt",
    }
    owner = ROOT / "model" / "checkpoint.py"
    spelled = sorted(
        str(path.relative_to(ROOT.parent.parent))
        for path in ROOT.parent.rglob("*.py")
        if path != owner
        and any(
            isinstance(node, ast.Constant) and node.value in names for node in ast.walk(ast.parse(path.read_text()))
        )
    )
    assert spelled == [], f"checkpoint file names spelled outside clipline/components/model/checkpoint.py: {spelled}"


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_options_shared_by_commands_read_the_same_everywhere():
    """--allow-host, --eval-set, --decontaminate and --from-model mean one thing in every command
    that takes them: the same help and metavar (declared once in cli.py)."""
    import typer.main

    from clipline.flows.cli import app

    group = typer.main.get_command(app)
    seen: dict[str, set] = {}
    for name, cmd in group.commands.items():
        for p in cmd.params:
            for opt in ("--allow-host", "--eval-set", "--decontaminate", "--from-model"):
                if opt in getattr(p, "opts", []) and not (name == "curate" and opt == "--eval-set"):
                    seen.setdefault(opt, set()).add((p.help, p.metavar, name))
    assert {o: len({(h, m) for h, m, _ in v}) for o, v in seen.items()} == dict.fromkeys(seen, 1), seen
    commands = {o: sorted(n for *_, n in v) for o, v in seen.items()}
    assert commands["--allow-host"] == ["ingest", "refresh", "run", "serve"], commands
    assert commands["--from-model"] == ["run", "train"], commands
