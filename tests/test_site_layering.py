"""The client glue is thin (issue 30, "The glue is thin"), checked on the source with ``ast``.

* No function or method in ``clients/`` is over 80 lines, and ``clients/secagg_mod.py``
  is at most 350: the mod adapts Flower messages to the site, the site's logic lives in
  ``sgs_flower.site``.
* ``sgs_flower/site`` never imports ``flwr`` (also not in a fresh interpreter, through
  whatever it imports), and no core package below it imports it back.
* The site's modules import each other without a cycle.

The coordinator folds these into tests/test_layering.py.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80
MAX_MOD_LINES = 350
BELOW_SITE = ("secagg", "dp", "ledger", "confidential", "audit", "deploy", "validation")


def _functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(f"{path.relative_to(ROOT).as_posix()}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1)
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_function_in_clients_is_over_80_lines() -> None:
    long = [(name, n) for p in sorted((ROOT / "clients").rglob("*.py")) for name, n in _functions(p)
            if n > MAX_FUNCTION_LINES]
    assert long == []


def test_the_mod_is_at_most_350_lines() -> None:
    assert len((ROOT / "clients" / "secagg_mod.py").read_text().splitlines()) <= MAX_MOD_LINES


def test_the_site_never_imports_flwr() -> None:
    offenders = {(p.relative_to(ROOT).as_posix(), n) for p in sorted((ROOT / "sgs_flower" / "site").rglob("*.py"))
                 for n in _imports(p) if n == "flwr" or n.startswith("flwr.")}
    assert offenders == set()


def test_importing_the_site_loads_no_flwr() -> None:
    code = ("import sys; import sgs_flower.site; "
            "bad = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')); print(bad); "
            "sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_core_package_below_the_site_imports_it() -> None:
    offenders = {(p.relative_to(ROOT).as_posix(), n)
                 for pkg in BELOW_SITE for p in sorted((ROOT / "sgs_flower" / pkg).rglob("*.py"))
                 for n in _imports(p) if n == "sgs_flower.site" or n.startswith("sgs_flower.site.")}
    top = {(f, n) for f in ("pipeline.py", "evaluation.py", "errors.py") if (ROOT / "sgs_flower" / f).exists()
           for n in _imports(ROOT / "sgs_flower" / f) if n.startswith("sgs_flower.site")}
    assert offenders | top == set()


def test_the_site_modules_have_no_import_cycle() -> None:
    folder = ROOT / "sgs_flower" / "site"
    mods = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    graph = {m: {n.split(".")[2] for n in _imports(folder / f"{m}.py")
                 if n.startswith("sgs_flower.site.") and n.split(".")[2] in mods} - {m} for m in mods}
    done: set[str] = set()

    def visit(m: str, stack: tuple[str, ...]) -> None:
        assert m not in stack, f"import cycle: {' -> '.join((*stack, m))}"
        if m in done:
            return
        for n in sorted(graph[m]):
            visit(n, (*stack, m))
        done.add(m)

    for m in sorted(mods):
        visit(m, ())
