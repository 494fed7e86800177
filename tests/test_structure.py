"""Rules of the source layout (issue 13): small modules, no import cycle, model families dispatched in one place;
no unused import or undefined name (pyflakes); lines of at most 120 characters and PEP 8's blank lines
(pycodestyle).

`python tests/test_structure.py` prints the line counts over 300 and any import cycle."""

from __future__ import annotations

import ast
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE = SRC / "msdd"
MAX_LINES = 400


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the msdd package (a package is its `__init__`)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(name: str, node: ast.ImportFrom | ast.Import, modules: dict[str, Path]) -> set[str]:
    """The msdd modules an import statement in module `name` names (at module level or inside a function)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    if node.level:  # relative: from the package of `name`
        package = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        source = f"{base}.{node.module}" if node.module else base
    else:
        source = node.module or ""
    found = set()
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        if sub in modules:  # `from msdd.eval import metrics`: the submodule itself
            found.add(sub)
        elif source in modules:
            found.add(source)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the msdd modules it imports explicitly (parent packages that Python runs first are not edges)."""
    modules = module_files()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _imported(name, node, modules)
        graph[name] = edges - {name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every cycle lies in one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def line_counts() -> dict[str, int]:
    return {str(p.relative_to(SRC.parent)): len(p.read_text().splitlines()) for p in module_files().values()}


def test_import_graph_sees_the_package():
    graph = import_graph()
    assert "msdd.tokenizer" in graph["msdd"] and "msdd.families" in graph["msdd.tokenizer"]
    assert "msdd.config" in graph["msdd.families.base"]


def test_cycle_finder_finds_a_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert import_cycles(import_graph()) == []


def test_no_module_over_the_line_limit():
    assert {p: n for p, n in line_counts().items() if n > MAX_LINES} == {}


def test_family_dispatch_only_in_the_family_modules():
    """`family == "..."` is asked of the family object, not tested elsewhere (config/ validates the name)."""
    allowed = {*(PACKAGE / "config").glob("*.py"), *(PACKAGE / "families").glob("*.py")}
    hits = [f"{p.relative_to(SRC)}:{i}" for p in module_files().values() if p not in allowed
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"family\s*==", line)]
    assert hits == []


def pyflakes_messages(*paths: Path) -> str:
    """What pyflakes (a test extra) reports for the Python files under `paths`, one message per line."""
    from pyflakes.api import checkRecursive
    from pyflakes.reporter import Reporter

    out = io.StringIO()
    checkRecursive([str(p) for p in paths], Reporter(out, out))
    return out.getvalue()


def test_pyflakes_finds_nothing():
    """No unused import, undefined name or redefinition in src, tests or benchmarks: an undefined name is a
    NameError on a path no test takes, an unused import a dependency nothing needs."""
    assert pyflakes_messages(SRC, ROOT / "tests", ROOT / "benchmarks") == ""


def test_pyflakes_reports_what_it_should(tmp_path):
    (tmp_path / "bad.py").write_text("import os\n\n\ndef f():\n    return undefined_name\n")
    report = pyflakes_messages(tmp_path)
    assert "'os' imported but unused" in report and "undefined name 'undefined_name'" in report


LAYOUT_CHECKS = ["E301", "E302", "E303", "E305", "E501"]  # blank lines around definitions, line length
MAX_LINE = 120


def layout_messages(*paths: Path) -> list[str]:
    """What pycodestyle (a test extra) reports of `LAYOUT_CHECKS` for the Python files under `paths`."""
    import pycodestyle

    out = []

    class Collect(pycodestyle.StandardReport):
        def error(self, line_number, offset, text, check):
            code = super().error(line_number, offset, text, check)
            if code:
                out.append(f"{self.filename}:{line_number}: {text}")
            return code

    style = pycodestyle.StyleGuide(select=LAYOUT_CHECKS, max_line_length=MAX_LINE, reporter=Collect, quiet=True)
    style.check_files([str(p) for p in paths])
    return out


def test_lines_and_blank_lines_follow_the_layout():
    """At most 120 characters a line, two blank lines around top-level definitions and one between methods,
    in src, tests and benchmarks."""
    assert layout_messages(SRC, ROOT / "tests", ROOT / "benchmarks") == []


def test_the_layout_check_reports_what_it_should(tmp_path):
    at_limit, over = "x = '" + "a" * 114 + "'\n", "y = '" + "a" * 115 + "'\n"  # 120 and 121 characters
    (tmp_path / "bad.py").write_text("import os\n\ndef f():\n    return os.sep\n\n\n" + at_limit + over)
    report = layout_messages(tmp_path)
    assert [m.split(":", 1)[1] for m in report] == ["3: E302 expected 2 blank lines, found 1",
                                                    "8: E501 line too long (121 > 120 characters)"]


if __name__ == "__main__":
    for path, n in sorted(line_counts().items(), key=lambda kv: -kv[1]):
        if n > 300:
            print(f"{n:5d} {path}")
    print("import cycles:", import_cycles(import_graph()) or "none")
