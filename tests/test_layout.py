"""The layout's rules, read from the code's own imports (top-level and function-level alike):
compute/maths is pure (it imports nothing of the project but maths and errors), no module imports its way back
to itself, and open_clip's private helpers are touched by the traced forward alone."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("compute", "dashboard")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, resolved to modules (a name imported from a package that is itself a
    module, such as `from compute.store import readers`, counts as that module)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def test_maths_imports_only_maths_and_errors():
    graph = _graph()
    allowed = re.compile(r"^compute(\.maths(\..*)?|\.errors)$")
    bad = {m: sorted(t for t in deps if not allowed.match(t))
           for m, deps in graph.items() if m.startswith("compute.maths")}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, " | ".join(" -> ".join(c) for c in cycles)


def test_private_open_clip_helpers_live_in_the_trace_alone():
    users = sorted(str(p.relative_to(ROOT)) for p in _modules().values()
                   if re.search(r"\._(embeds|pool)\(", p.read_text()))
    assert users == ["compute/maths/tower_openclip.py"], users


def test_the_import_rules_catch_a_circle_and_an_impure_import(tmp_path, monkeypatch):
    """The checks above can fail: a made-up tree with a circle and a maths module importing the store."""
    for rel, text in {"compute/__init__.py": "", "compute/errors.py": "",
                      "compute/maths/__init__.py": "", "compute/maths/a.py": "from compute.store import b\n",
                      "compute/store/__init__.py": "", "compute/store/b.py": "def f():\n    from compute.maths import a\n",
                      "dashboard/__init__.py": ""}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    graph = _graph()
    assert graph["compute.maths.a"] == {"compute.store.b"} and graph["compute.store.b"] == {"compute.maths.a"}
    try:
        test_maths_imports_only_maths_and_errors()
    except AssertionError:
        pass
    else:
        raise AssertionError("an impure maths import went unnoticed")
    try:
        test_no_import_circle()
    except AssertionError:
        pass
    else:
        raise AssertionError("an import circle went unnoticed")
