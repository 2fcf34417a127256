"""The compiled hot path (issue 17): the modules in `unpinned/compiled.txt` are compiled with
mypyc when the build can, and stay plain Python when it cannot. One source: the same .py files
run interpreted without a compiler, and `UNPINNED_PURE_PYTHON=1` makes an installed build load
them interpreted too (see unpinned/__init__.py).

Everything else about the package is in pyproject.toml; this file only adds the extensions.
The build never fails because of them: no mypy, a type error mypyc refuses, no C compiler
(`CC=/bin/false`, no gcc on PATH) or a compiler error all end in a pure-Python install, with a
warning in pip's output (`pip install -v` shows it). `UNPINNED_NO_COMPILE=1` asks for pure Python.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
# Relative paths: mypyc names the modules after them.
MODULES = [ln.split("#")[0].strip() for ln in (HERE / "unpinned" / "compiled.txt").read_text().splitlines()]
MODULES = [m for m in MODULES if m]
# The shared library of the compiled group lands inside the package (unpinned/hot__mypyc*.so),
# so an editable install finds it like any other module of the package.
GROUP = "unpinned.hot"


def _say(msg: str) -> None:
    print(f"unpinned build: {msg}", file=sys.stderr, flush=True)


def _extensions() -> list:
    if os.environ.get("UNPINNED_NO_COMPILE"):
        _say("UNPINNED_NO_COMPILE is set: pure Python")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as e:
        _say(f"mypyc is not available ({e}): pure Python")
        return []
    cwd = os.getcwd()
    os.chdir(HERE)
    try:
        # follow-imports=silent: only the compiled modules must type-check; the rest is read
        # for their types. mypyc exits (SystemExit) on a type error: caught like any failure.
        return mypycify(["--follow-imports=silent", "--ignore-missing-imports", *MODULES],
                        opt_level="3", debug_level="0", group_name=GROUP)
    except BaseException as e:   # noqa: BLE001 - SystemExit included: the fallback is the point
        _say(f"mypyc could not compile the hot path ({type(e).__name__}: {e}): pure Python")
        return []
    finally:
        os.chdir(cwd)


class OptionalBuildExt(build_ext):
    """build_ext that falls back to pure Python instead of failing the install."""

    def run(self) -> None:
        if not self.extensions:
            return
        if not self._compiler_works():
            self._give_up("no working C compiler")
            return
        try:
            super().run()
        except Exception as e:   # noqa: BLE001 - any compiler failure means: install pure Python
            self._give_up(f"{type(e).__name__}: {e}")
            return
        _say(f"compiled with mypyc: {len(MODULES)} modules")

    def _compiler_works(self) -> bool:
        from setuptools._distutils.ccompiler import new_compiler
        from setuptools._distutils.sysconfig import customize_compiler
        try:
            cc = new_compiler(compiler=self.compiler, force=True)
            customize_compiler(cc)
            with tempfile.TemporaryDirectory() as d:
                src = os.path.join(d, "probe.c")
                Path(src).write_text("int unpinned_probe(void) { return 0; }\n")
                cc.compile([src], output_dir=d)
            return True
        except Exception:   # noqa: BLE001 - CompileError, DistutilsExecError, missing executable
            return False

    def _give_up(self, why: str) -> None:
        _say(f"C extensions not built ({why}): pure Python")
        # A half-built set must not be imported: remove whatever landed (in place or in build/).
        for path in self.get_outputs():
            try:
                os.remove(path)
            except OSError:
                pass
        self.extensions = []

    def get_outputs(self) -> list[str]:
        return super().get_outputs() if self.extensions else []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
