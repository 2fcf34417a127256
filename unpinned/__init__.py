"""unpinned: a PostgreSQL transaction-pooling proxy that carries session state instead of pinning."""
from __future__ import annotations

import os as _os
import sys as _sys

__version__ = "0.1.0"

# The hot path may be compiled with mypyc (setup.py, unpinned/compiled.txt). With
# UNPINNED_PURE_PYTHON=1 the package loads the .py sources even where the compiled modules
# sit beside them: `make test` runs the unit tests that way, so the interpreted code stays
# tested too. Set before the first import of unpinned (it is read once, here); child
# processes inherit it with the environment.
PURE_PYTHON = _os.environ.get("UNPINNED_PURE_PYTHON", "") not in ("", "0")


def _listed() -> list[str]:
    """compiled.txt: the modules setup.py compiles, as paths relative to the project."""
    try:
        with open(_os.path.join(_os.path.dirname(__file__), "compiled.txt")) as f:
            return [p for p in (line.split("#")[0].strip() for line in f) if p]
    except OSError:
        return []


def _stale() -> list[str]:
    """Compiled modules older than their source (an edited checkout not rebuilt yet): running
    them would run yesterday's code. Two seconds of slack: an install writes both at once."""
    root = _os.path.dirname(_os.path.dirname(__file__))
    out = []
    for rel in _listed():
        source = _os.path.join(root, rel)
        folder, leaf = _os.path.split(source)
        try:
            built = [e.path for e in _os.scandir(folder)
                     if e.name.startswith(leaf[:-3] + ".") and e.name.endswith((".so", ".pyd"))]
            if built and _os.path.getmtime(source) > min(map(_os.path.getmtime, built)) + 2:
                out.append(rel)
        except OSError:
            pass
    return out


# The whole set or nothing: compiled modules call each other directly, so one stale module
# means all of them run interpreted (`make install` rebuilds them).
STALE = [] if PURE_PYTHON else _stale()
PURE_PYTHON = PURE_PYTHON or bool(STALE)

if PURE_PYTHON:
    from importlib.machinery import SourceFileLoader as _SourceFileLoader
    from importlib.util import spec_from_file_location as _spec_from_file_location

    class _SourcesFirst:
        """A meta-path finder for unpinned's own modules that takes the .py over an extension."""

        @staticmethod
        def find_spec(name, path, target=None):
            if not name.startswith("unpinned.") or not path:
                return None
            leaf = name.rpartition(".")[2]
            for folder in path:
                source = _os.path.join(folder, leaf + ".py")
                if _os.path.isfile(source):
                    return _spec_from_file_location(name, source, loader=_SourceFileLoader(name, source))
            return None     # a package, or not ours: the usual finders decide

    _sys.meta_path.insert(0, _SourcesFirst())


def compiled_modules() -> list[str]:
    """The modules listed in compiled.txt that this process runs compiled, by name."""
    names = [path.removesuffix(".py").replace("/", ".") for path in _listed()]
    out = []
    for name in names:
        try:
            __import__(name)
        except ImportError:
            continue
        if not getattr(_sys.modules[name], "__file__", "").endswith(".py"):
            out.append(name)
    return out


def build_description() -> str:
    """One line for the start-up log and `unpinned --version`: compiled or interpreted."""
    done = compiled_modules()
    if done:
        return f"hot path compiled with mypyc ({len(done)} modules)"
    why = (f"compiled modules older than their source, e.g. {STALE[0]}: run make install" if STALE
           else "UNPINNED_PURE_PYTHON is set" if PURE_PYTHON else "no compiled build installed")
    return f"hot path interpreted, pure Python ({why})"
