"""Architecture rules that a change must not break silently: the engine never imports the
app and `models/` imports neither engine nor app (checked in fresh interpreters, so nothing
imported by another test hides it; the CLI's light start-up is tested in test_cli.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _modules(package: str) -> list[str]:
    root = REPO / package
    return sorted(
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for path in root.rglob("*.py"))


def _loaded_after_importing(modules: list[str]) -> set[str]:
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print('\\n'.join(sorted(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


@pytest.mark.parametrize(("package", "forbidden"), [
    ("engine", ("textual", "tui")),
    ("models", ("textual", "tui", "engine")),
])
def test_a_layer_never_imports_the_layers_above_it(package, forbidden):
    loaded = _loaded_after_importing(_modules(package))
    leaks = sorted(name for name in loaded
                   if any(name == top or name.startswith(top + ".") for top in forbidden))
    assert leaks == [], f"importing {package} loads {leaks}"

