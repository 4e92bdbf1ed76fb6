"""adatp_core's imports run one way: no circle (imports inside functions included), and no
module takes a ``_private`` name from another."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adatp_core"


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's __init__)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def imports(mods) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Every module's imports of adatp_core modules (name -> first line), wherever the import
    statement stands (module level, functions, TYPE_CHECKING blocks); and every
    ``from X import _name`` across modules."""
    edges, private = {}, []
    for name, (path, is_package) in mods.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        out = edges.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods:
                        out.setdefault(alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = here[:len(here) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                if target not in mods:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in mods:  # from package import module
                        out.setdefault(sub, node.lineno)
                        continue
                    out.setdefault(target, node.lineno)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and target != name:
                        private.append(f"{name}:{node.lineno} imports {alias.name} from {target}")
    return edges, private


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected parts with more than one module (Tarjan), each as its import lines."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1 or v in edges.get(v, {}):
                found.append([f"{a}:{line} -> {b}" for a in sorted(part) for b, line in edges[a].items() if b in part])

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_every_kind_of_import():
    """The checks below can fail: a circle made of a module-level import and one inside a
    function, and a private name, are found."""
    edges = {"a": {"b": 1}, "b": {"c": 3}, "c": {"a": 9}, "d": {"a": 2}}
    assert cycles(edges) == [["a:1 -> b", "b:3 -> c", "c:9 -> a"]]
    mods = modules()
    edges, _ = imports(mods)
    assert "adatp_core.caption.files" in edges["adatp_core.caption.plan"]  # from .files import ...
    assert "adatp_core.timing" in edges["adatp_core.report"]  # an import inside a function


def test_no_import_circle():
    assert cycles(imports(modules())[0]) == []


def test_no_private_name_crosses_modules():
    assert imports(modules())[1] == []


def reached(edges: dict[str, dict[str, int]], start: str) -> set[str]:
    """Every adatp_core module that importing ``start`` may import, itself included."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += list(edges.get(name, {}))
    return seen


def test_frames_in_pictures_out_stay_below_the_models_and_the_stages():
    """The synthetic videos (samples.py) and the token picture (preview.py) reach neither the model
    families nor the runtime nor the stages' state: a shared path helper and plain tensors instead."""
    edges, _ = imports(modules())
    above = ("adatp_core.models", "adatp_core.runtime", "adatp_core.state", "adatp_core.stages")
    assert reached({"a": {"b": 1}, "b": {"adatp_core.state": 2}}, "a") == {"a", "b", "adatp_core.state"}
    for module in ("adatp_core.samples", "adatp_core.preview"):
        wrong = sorted(m for m in reached(edges, module) if m.startswith(above))
        assert wrong == [], f"{module} reaches {wrong}"


def test_no_command_line_reaches_into_argparse_internals():
    """The clips command took the caption command's options from its parser's ``_actions`` with
    ``_add_action``; shared options have one public home, cli_options.py."""
    import re

    found = [f"{p.relative_to(PACKAGE.parent)}:{n}" for p in PACKAGE.rglob("*.py")
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"\._(actions|add_action|option_string_actions|action_groups)\b", line)]
    assert found == []
