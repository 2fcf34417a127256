"""`make compat` in small: PostgreSQL's regression scripts that lean on session state (SET
and RESET, sequences, temp tables, prepared statements, cursors, two-phase commit, advisory
locks, \\c), run the pg_regress way directly and through a smart-mode proxy with a pool of 3,
on two fresh clusters. Any difference compat/expected_differences.toml does not list fails."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))   # compat/ sits beside the package, like bench/

from compat import run as compat  # noqa: E402

# A few seconds in all; test_setup is put first, as for every run.
SUBSET = ["guc", "sequence", "prepare", "portals", "transactions", "prepared_xacts", "temp",
          "advisory_lock", "plancache", "event_trigger_login"]


@pytest.fixture(scope="module")
def source() -> Path:
    found = compat.find_source()
    if found is None:
        pytest.skip(f"PostgreSQL's regression scripts are not here: no {REPO.parent / 'shared'} "
                    f"and ${compat.ENV_SOURCE} unset")
    return found


def test_subset_differs_only_where_listed(source, tmp_path):
    expectations = compat.load_expectations()
    results = compat.run(["test_setup", *SUBSET], source, tmp_path, 3, expectations, progress=None)

    assert [r.name for r in results] == ["test_setup", *SUBSET]
    # Identical output from two sides that never reached a server would prove nothing.
    failed = [(r.name, r.direct_rc, r.proxy_rc) for r in results if r.direct_rc or r.proxy_rc]
    assert not failed, f"psql exited non-zero (script, direct, proxy): {failed}"
    for side in ("direct", "proxy"):
        assert "(1 row)" in (tmp_path / side / "sequence.out").read_text()   # answered, not only echoed
    unexpected = {r.name: r.diff for r in results if r.status == compat.UNEXPECTED}
    assert not unexpected, "differences not listed in compat/expected_differences.toml:\n" + \
        "\n".join(unexpected.values())
