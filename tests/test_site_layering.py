"""The site without Flower, beyond the source rules of tests/test_layering.py (which
holds ``clients/`` to 80-line functions and ``secagg_mod.py`` to 350 lines, and keeps
``flwr`` out of ``sgs_flower/site`` and the site out of the packages below it):

* importing ``sgs_flower.site`` in a fresh interpreter loads no ``flwr`` module, through
  whatever it imports;
* the site's modules import each other without a cycle.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_layering import _imports

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_site_loads_no_flwr() -> None:
    code = ("import sys; import sgs_flower.site; "
            "bad = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')); print(bad); "
            "sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


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
