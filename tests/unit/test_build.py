"""The compiled hot path and its interpreted twin (issue 17): which one a process runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import unpinned

PACKAGE = Path(unpinned.__file__).parent
REPORT = ("import json, sys, unpinned; names = [p[:-3].replace('/', '.') for p in unpinned._listed()]; "
          "[__import__(n) for n in names]; "
          "print(json.dumps({n: sys.modules[n].__file__ for n in names} | {'': unpinned.build_description()}))")


def _run(**env: str) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", REPORT], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True, cwd=PACKAGE.parent).stdout
    return json.loads(out)


def test_the_listed_modules_exist_as_sources():
    listed = unpinned._listed()
    assert "unpinned/sql/classifier.py" in listed
    assert all((PACKAGE.parent / p).is_file() for p in listed)


def test_pure_python_switch_loads_every_listed_module_from_its_source():
    files = _run(UNPINNED_PURE_PYTHON="1")
    assert files.pop("").startswith("hot path interpreted, pure Python (UNPINNED_PURE_PYTHON is set)")
    assert files and all(f.endswith(".py") for f in files.values()), files


def test_a_built_extension_beside_a_source_is_what_runs_unless_stale():
    files = _run(UNPINNED_PURE_PYTHON="")
    description = files.pop("")
    built = {n for n in files if any(PACKAGE.parent.joinpath(*n.split(".")[:-1]).glob(n.split(".")[-1] + ".*.so"))}
    if built and not unpinned._stale():
        assert {n for n, f in files.items() if not f.endswith(".py")} == built
        assert description == f"hot path compiled with mypyc ({len(built)} modules)"
    else:
        assert all(f.endswith(".py") for f in files.values())
        assert description.startswith("hot path interpreted, pure Python")


def test_version_says_which_build_runs():
    out = subprocess.run([sys.executable, "-m", "unpinned.cli", "--version"], capture_output=True, text=True,
                         check=True, env={**os.environ, "UNPINNED_PURE_PYTHON": "1"}).stdout
    assert "hot path interpreted, pure Python" in out
