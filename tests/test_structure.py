"""The package's floors, read from its imports: no import circle inside `siren/`, and the lower floors (models, metrics,
data, coding, config, checkpoints) never import the trainer (`siren.train`). Every import counts, also the ones inside
functions: a lazy import still ties two modules together."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOWER_FLOORS = ("siren.models", "siren.metrics", "siren.data", "siren.coding", "siren.config", "siren.checkpoints")
# The floors of the house, bottom first (docs/architecture.md draws them): a module imports only from its own floor or
# below. `siren` itself (the package's __init__) holds the version and lazy names only.
FLOORS = (
    ("siren", "siren.errors", "siren.config", "siren.ranks", "siren.report_html", "siren.install_check"),
    ("siren.models",),
    ("siren.data", "siren.coding", "siren.metrics", "siren.checkpoints"),
    ("siren.codec", "siren.info", "siren.transcode"),
    ("siren.train", "siren.importer"),
    ("siren.verify", "siren.evaluation", "siren.sweep", "siren.demo", "siren.cli", "siren.__main__"),
)


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """module → the modules of the same package it imports (any import, at any depth of the file)."""
    base = package_dir.name
    modules: dict[str, Path] = {}
    for path in package_dir.rglob("*.py"):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path

    def owner(name: str) -> str | None:
        """The module that `name` (a module or a name inside one) lives in."""
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod
                targets = [f"{source}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                if t == base or t.startswith(base + "."):
                    found = owner(t)
                    if found and found != mod:
                        deps.add(found)
        graph[mod] = deps
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                group = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    group.append(w)
                    if w == v:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def test_no_import_circle_inside_siren():
    assert circles(import_graph(ROOT / "siren")) == []


def test_lower_floors_never_import_the_trainer():
    graph = import_graph(ROOT / "siren")
    bad = {
        m: sorted(d for d in deps if d == "siren.train" or d.startswith("siren.train."))
        for m, deps in graph.items()
        if m.startswith(LOWER_FLOORS)
    }
    assert {m: d for m, d in bad.items() if d} == {}


def floor_of(module: str) -> int | None:
    """The floor whose longest matching prefix names `module`."""
    best: tuple[int, int] | None = None
    for i, prefixes in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


def test_every_module_has_a_floor_and_imports_only_downwards():
    graph = import_graph(ROOT / "siren")
    assert [m for m in graph if floor_of(m) is None] == []
    upward = [f"{m} → {d}" for m, deps in graph.items() for d in deps if floor_of(d) > floor_of(m)]
    assert upward == []


def test_the_checker_sees_circles_and_lazy_imports(tmp_path):
    """Control: a package whose circle closes through an import inside a function, and one through `from . import`."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub.b import f\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg import a\n    return a\n")
    (pkg / "c.py").write_text("from . import d\n")
    (pkg / "d.py").write_text("from .c import x\n")
    (pkg / "e.py").write_text("import pkg.a\n")
    graph = import_graph(pkg)
    assert sorted(circles(graph)) == [["pkg.a", "pkg.sub.b"], ["pkg.c", "pkg.d"]]
    assert graph["pkg.e"] == {"pkg.a"}


# How a citation of the design brief that lives outside the repository reads (spelled in pieces, joined at run time
# so that neither this file nor its byte-compiled copy, where `"a" + "b"` is folded into one constant, matches itself).
OUTSIDE_DOC = tuple("".join(parts) for parts in (("DESIGN", ".md"), ("DESIGN", " §")))


def test_no_source_file_cites_a_document_outside_the_repository():
    """Comments and docstrings point into docs/; a design document that is not in the repository helps no one."""
    offenders = []
    for folder in ("siren", "tests", "benchmarks", "experiments", "configs", "launch", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".md", ".yaml", ".yml", ".sh", ".sbatch", ".cfg", ".toml"):
                text = path.read_text(errors="replace")
                if any(mark in text for mark in OUTSIDE_DOC):
                    offenders.append(str(path.relative_to(ROOT)))
    for name in ("README.md", "Makefile", "setup.cfg", "BENCHMARKS.md"):
        text = (ROOT / name).read_text()
        if any(mark in text for mark in OUTSIDE_DOC):
            offenders.append(name)
    assert offenders == []


def _anchors(page: Path) -> set[str]:
    """GitHub-style anchors of a markdown page's headings."""
    import re

    out = set()
    for line in page.read_text().splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def test_every_docs_reference_names_a_page_and_heading_that_exist():
    """Source comments, configs, the README and the docs point into docs/: each such reference must resolve."""
    import re

    ref = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+))?")
    broken = []
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    for folder in ("siren", "tests", "benchmarks", "configs", "launch", "experiments"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml", ".md") and p.is_file()]
    for path in files:
        for page, anchor in ref.findall(path.read_text(errors="replace")):
            target = ROOT / "docs" / page
            if not target.is_file() or (anchor and anchor not in _anchors(target)):
                broken.append(f"{path.relative_to(ROOT)}: docs/{page}{'#' + anchor if anchor else ''}")
    assert broken == []
