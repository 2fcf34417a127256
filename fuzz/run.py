"""Run one atheris target: python fuzz/run.py TARGET [libFuzzer options] [corpus dirs].

TARGET is a function of fuzz/targets.py (startup, backend_fields, auth, relay). The unpinned
package is instrumented for coverage; a crash (any exception out of the target) is written
where -artifact_prefix says, and the process exits non-zero."""
import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
with atheris.instrument_imports(include=["unpinned", "targets"]):
    import targets

TARGETS = ("startup", "backend_fields", "auth", "relay")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [corpus dirs]")
    target = getattr(targets, sys.argv.pop(1))
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
