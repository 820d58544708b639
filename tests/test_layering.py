"""The dependency rule of DESIGN.md section 1, checked on the source with ``ast``.

* The core (``sgs_flower`` except ``app/``) never imports ``flwr``: the protocol, DP,
  ledger, audit and deployment code run without Flower (the deployment runs Flower's
  executables as subprocesses).
* The core does not import the Flower App ``sgs_flower.app`` (the app is glue on top);
  the digits data and models it trains (``sgs_flower.digits``, no flwr) are core.
* The core packages' import graph has no cycles (``dp`` uses ``ledger`` as storage and
  ``secagg`` for wire constants; ``ledger`` imports neither).
* The core packages never import the top-level modules built on them (``pipeline``,
  which chains ``dp`` and ``secagg``, and the ``dp_utility`` study, which drives
  ``pipeline``): such an import would loop back into the package.
* ``strategies`` and ``clients`` never import each other.
* The glue is thin (issue 30): no function of the Flower glue is over 80 lines, and the
  strategy module is at most 400 (the round itself is the driver's, ``sgs_flower/driver``).

Every import counts, also those inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE_PACKAGES = ("dp", "ledger", "secagg", "audit", "deploy", "validation", "driver", "site")
# top-level modules that import core packages (so no core package may import them)
ON_TOP_OF_PACKAGES = ("sgs_flower.pipeline", "sgs_flower.dp_utility")
# core packages built on those modules (the round driver runs the update pipeline): the
# rule above is for the packages below them, which never import these either
BUILT_ON_TOP = ("driver", "site")
# the Flower glue held to the function-length limit (issue 30: "the glue is thin")
GLUE_FOLDERS = ("strategies", "clients")
MAX_FUNCTION_LINES = 80
# glue modules with a line limit of their own
MAX_MODULE_LINES = {"strategies/secagg_strategy.py": 400, "clients/secagg_mod.py": 350}
# (module file, imported module) pairs that break the "core does not import the app"
# rule today. Remove an entry when its import goes; never add one without a reason.
ALLOWED_APP_IMPORTS: set[tuple[str, str]] = set()  # none left: the digits task lives in sgs_flower.digits


def _modules(folder: str) -> Iterator[Path]:
    yield from sorted((ROOT / folder).rglob("*.py"))


def _imports(path: Path, runtime_only: bool = False) -> set[str]:
    """Absolute names imported by ``path`` (``from a.b import c`` gives ``a.b`` and ``a.b.c``).
    ``runtime_only``: without the imports under ``if TYPE_CHECKING:`` (annotations only:
    they never run, so they make no cycle)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _is_core(path: Path) -> bool:
    return not _rel(path).startswith("sgs_flower/app/")


def _imports_pkg(names: set[str], pkg: str) -> set[str]:
    return {n for n in names if n == pkg or n.startswith(pkg + ".")}


def test_core_never_imports_flwr() -> None:
    offenders = {
        (_rel(p), n)
        for p in _modules("sgs_flower")
        if _is_core(p)
        for n in _imports_pkg(_imports(p), "flwr") | _imports_pkg(_imports(p), "flwr_datasets")
    }
    assert offenders == set()


def test_core_does_not_import_the_app() -> None:
    offenders = set()
    for p in _modules("sgs_flower"):
        if not _is_core(p):
            continue
        names = _imports_pkg(_imports(p), "sgs_flower.app")
        # report the app module (`sgs_flower.app.<module>`), whatever is taken from it;
        # a bare `import sgs_flower.app` stays `sgs_flower.app`.
        modules = {".".join(n.split(".")[:3]) for n in names}
        offenders |= {(_rel(p), m) for m in modules if m != "sgs_flower.app" or len(modules) == 1}
    assert offenders - ALLOWED_APP_IMPORTS == set()


def _package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {pkg: set() for pkg in CORE_PACKAGES}
    for pkg in CORE_PACKAGES:
        for p in _modules(f"sgs_flower/{pkg}"):
            for other in CORE_PACKAGES:
                if other != pkg and _imports_pkg(_imports(p), f"sgs_flower.{other}"):
                    graph[pkg].add(other)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_core_packages_have_no_import_cycle() -> None:
    graph = _package_graph()
    assert _find_cycle(graph) is None, f"import cycle {_find_cycle(graph)} in {graph}"
    # the direction DESIGN.md fixes: DP accounting uses the ledger, never the reverse
    assert "dp" not in graph["ledger"] and "secagg" not in graph["ledger"]


def test_cycle_finder_finds_a_cycle() -> None:
    """The checker itself can fail: a two-package loop is reported."""
    assert _find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_core_packages_do_not_import_the_modules_on_top_of_them() -> None:
    offenders = {
        (_rel(p), n)
        for pkg in CORE_PACKAGES
        if pkg not in BUILT_ON_TOP
        for p in _modules(f"sgs_flower/{pkg}")
        for top in (*ON_TOP_OF_PACKAGES, *(f"sgs_flower.{b}" for b in BUILT_ON_TOP))
        for n in _imports_pkg(_imports(p), top)
    }
    assert offenders == set()


def _long_functions(folder: str, limit: int) -> list[str]:
    """Functions and methods (nested ones too) of ``folder`` longer than ``limit`` lines,
    decorators and docstrings included."""
    out = []
    for path in _modules(folder):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = (node.end_lineno or node.lineno) - first + 1
                if lines > limit:
                    out.append(f"{_rel(path)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_of_the_glue_is_over_80_lines() -> None:
    long = [f for folder in GLUE_FOLDERS for f in _long_functions(folder, MAX_FUNCTION_LINES)]
    assert long == [], long


def test_the_function_length_check_can_fail() -> None:
    """The checker itself finds a long function (this test module has none that long)."""
    assert _long_functions("tests", 10_000) == []
    assert any("test_the_client_app_loads" in f for f in _long_functions("tests", 5))


def test_the_strategy_module_is_thin() -> None:
    sizes = {name: len((ROOT / name).read_text().splitlines()) for name in MAX_MODULE_LINES}
    assert {n: k for n, k in sizes.items() if k > MAX_MODULE_LINES[n]} == {}, sizes


def test_strategies_and_clients_do_not_import_each_other() -> None:
    for side, other in (("strategies", "clients"), ("clients", "strategies")):
        offenders = [_rel(p) for p in _modules(side) if _imports_pkg(_imports(p), other)]
        assert offenders == [], f"{side} imports {other}: {offenders}"


def test_the_client_app_loads_without_torch_opacus_or_dp_accounting():
    """In a deployment every message starts a new ``flwr-clientapp`` process that imports
    the ClientApp; the protocol-only messages (advertise, consistency, unmask) must not
    pay for torch, Opacus or dp-accounting (seconds each on a small machine). They are
    imported by the train function and the site accountant, when needed."""
    import subprocess
    import sys

    code = ("import sys, sgs_flower.app.client_app; "
            "print(sorted(m for m in ('torch', 'opacus', 'dp_accounting', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_glue_modules_import_each_other_without_a_cycle():
    """Issue 30: ``strategies/secagg_strategy.py`` and ``strategies/secure_eval.py`` used to
    import each other (lazily, inside functions); what both need lives in
    ``strategies/report.py``. No module of ``strategies`` or ``clients`` reaches itself
    through runtime imports (inside functions too)."""
    graph: dict[str, set[str]] = {}
    for folder in ("strategies", "clients"):
        for path in _modules(folder):
            if path.name == "__init__.py":
                continue
            mod = _rel(path)[:-3].replace("/", ".")
            graph[mod] = {n for n in _imports(path, runtime_only=True) if n.split(".")[0] in ("strategies", "clients")}
    edges = {m: {t for t in graph if any(n == t or n.startswith(t + ".") for n in deps) and t != m}
             for m, deps in graph.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges[start]:
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(m for m in edges if reaches(m, m, {m}))
    assert not cycles, cycles


def test_the_round_driver_runs_without_flower():
    """Issue 30: the round driver (and the protocol's stage sequence it shares with the
    in-process simulation) loads with no Flower module at all."""
    import subprocess
    import sys

    code = ("import sys, sgs_flower.driver, sgs_flower.secagg.simulate; "
            "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
