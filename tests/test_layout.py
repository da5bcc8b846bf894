"""The house: packages follow the pipeline, imports only go down it, nothing is oversized.

Read from the code with ``ast`` (nothing is imported or run): every ``import`` and ``from ...
import``, at any depth (a lazy import inside a function is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("delg_geo", "index_builder")

#: The pipeline, bottom to top. A module may import its own layer and the layers below it.
LAYERS = {
    "delg_geo.core": 0,
    "delg_geo.features": 1,
    "delg_geo.index": 2,
    "delg_geo.retrieval": 3,
    "index_builder": 4,
    "delg_geo.evaluation": 5,
    "delg_geo.apps": 6,
}
#: Imports allowed to go up, with the reason (at most one may be listed).
EXCEPTIONS: dict[tuple[str, str], str] = {}

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 100


def _modules(root: Path = ROOT) -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (root / pkg).rglob("*.py"):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the first-party modules it imports (a package's ``__init__`` counts as a module)."""
    mods = _modules(root)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = m.split(".") if is_pkg else m.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                parts = t.split(".")
                for k in range(len(parts), 0, -1):
                    cand = ".".join(parts[:k])
                    if cand in mods:
                        if cand != m and not m.startswith(cand + "."):
                            edges[m].add(cand)
                        break
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def layer_of(module: str) -> int | None:
    best = None
    for prefix, rank in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, rank)
    return None if best is None else best[1]


def upward_imports(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    out = []
    for m, deps in edges.items():
        lm = layer_of(m)
        for d in deps:
            ld = layer_of(d)
            if lm is not None and ld is not None and ld > lm:
                out.append((m, d))
    return sorted(out)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    for pkg, files in {"delg_geo": {"a.py": "from delg_geo import b\n", "b.py": "def f():\n    from delg_geo.a import x\n"},
                       "index_builder": {"c.py": "import os\n"}}.items():
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
        for name, text in files.items():
            (tmp_path / pkg / name).write_text(text)
    assert cycles(import_graph(tmp_path)) == [["delg_geo.a", "delg_geo.b"]]


def test_lower_layers_never_import_higher_ones():
    edges = import_graph()
    unplaced = sorted(m for m in edges if layer_of(m) is None and m not in PACKAGES and m != "delg_geo.__main__")
    assert not unplaced, f"modules outside every layer: {unplaced}"
    up = [e for e in upward_imports(edges) if e not in EXCEPTIONS]
    assert not up, "imports that climb the pipeline: " + ", ".join(f"{a} -> {b}" for a, b in up)
    assert len(EXCEPTIONS) <= 1


def test_the_layer_check_sees_a_climb():
    assert upward_imports({"delg_geo.index.x": {"delg_geo.apps.cli"}, "delg_geo.apps.cli": {"delg_geo.index.x"}}) == [
        ("delg_geo.index.x", "delg_geo.apps.cli")]


@pytest.mark.parametrize("module", sorted(_modules()), ids=str)
def test_module_and_function_sizes(module):
    f = _modules()[module]
    text = f.read_text(encoding="utf-8")
    lines = text.count("\n") + 1
    assert lines <= MAX_MODULE_LINES, f"{f.relative_to(ROOT)}: {lines} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            assert n <= MAX_FUNCTION_LINES, f"{f.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines"


@pytest.mark.parametrize("pkg", [p for p in LAYERS if p.startswith("delg_geo.")])
def test_each_stage_says_what_it_does(pkg):
    init = ROOT / pkg.replace(".", "/") / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
    assert doc, f"{init}: no docstring"
    n = len(doc.strip().splitlines())
    assert 3 <= n <= 6, f"{init}: {n} lines of docstring"
    assert "first" in doc, f"{init}: say which module to open first"


def test_web_assets_are_files_shipped_with_the_package():
    static = ROOT / "delg_geo" / "apps" / "static"
    assert {"index.html", "app.js", "style.css"} <= {p.name for p in static.iterdir()}
    serve = (ROOT / "delg_geo" / "apps" / "serve.py").read_text() + (ROOT / "delg_geo" / "apps" / "serve_routes.py").read_text()
    assert "<!DOCTYPE html>" not in serve and "StaticFiles" in serve
    toml = (ROOT / "pyproject.toml").read_text()
    assert '"delg_geo.apps" = ["static/*"]' in toml


def test_the_public_api_is_where_it_was():
    import delg_geo

    for name in ("Geolocator", "Prediction", "Features", "get_extractor", "__version__"):
        assert getattr(delg_geo, name) is not None
