"""How compat/run.py judges a difference: only the listed changes, at the listed places, pass."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # compat/ sits beside the package
from compat import run as compat  # noqa: E402

LISTED = r"""
[[skip]]
reason = "needs regress.so"
scripts = ["misc"]

[scripts.seq]
bug = true
reason = "currval refused"

[[scripts.seq.hunks]]
context = "SELECT currval('s');"
direct = '''
ERROR:  currval of sequence "s" is not yet defined in this session
'''
proxy = '''
ERROR:  currval() is not available here
'''

[[scripts.seq.hunks]]
bug = false
context = "SELECT sessions"
direct = ' t'
proxy = ' f'

[scripts.oids]
reason = "OIDs shift"

[[scripts.oids.normalise]]
lines = '^ *\d+ \| \w+$'
pattern = '\d{5,}'
replace = '<oid>'
"""

DIRECT = """SELECT currval('s');
ERROR:  currval of sequence "s" is not yet defined in this session
SELECT 1;
 ?column?
 1
"""
PROXY = DIRECT.replace('ERROR:  currval of sequence "s" is not yet defined in this session',
                       "ERROR:  currval() is not available here")


@pytest.fixture
def listed(tmp_path):
    path = tmp_path / "expected.toml"
    path.write_text(LISTED)
    return compat.load_expectations(path)


def status(name, direct, proxy, expectations):
    return compat.compare(name, direct, proxy, expectations.scripts.get(name))[0]


def test_listed_change_at_its_place_passes_and_says_bug(listed):
    assert listed.skip == {"misc": "needs regress.so"}
    assert status("seq", DIRECT, PROXY, listed) == compat.BUG


def test_any_other_change_in_a_listed_script_fails(listed):
    assert status("seq", DIRECT, PROXY.replace(" 1\n", " 2\n"), listed) == compat.UNEXPECTED


def test_listed_lines_elsewhere_than_their_context_fail(listed):
    moved_d = DIRECT.replace("SELECT currval('s');", "SELECT currval('t');")
    moved_p = PROXY.replace("SELECT currval('s');", "SELECT currval('t');")
    assert status("seq", moved_d, moved_p, listed) == compat.UNEXPECTED


def test_pooler_change_alone_is_expected_not_bug(listed):
    d = "SELECT sessions > 0;\n ?column?\n t\n"
    assert status("seq", d, d.replace(" t\n", " f\n"), listed) == compat.EXPECTED


def test_unlisted_script_fails_and_identical_passes(listed):
    assert status("other", "a\n", "b\n", listed) == compat.UNEXPECTED
    assert status("other", "a\n", "a\n", listed) == compat.IDENTICAL
    st, note, _ = compat.compare("seq", DIRECT, DIRECT, listed.scripts["seq"])
    assert (st, "fixed?" in note) == (compat.IDENTICAL, True)
    listed.scripts["seq"].intermittent = True
    st, note, _ = compat.compare("seq", DIRECT, DIRECT, listed.scripts["seq"])
    assert (st, "intermittent" in note) == (compat.IDENTICAL, True)


def test_normalisation_only_on_its_lines(listed):
    d = " 33959 | pktable\nrows: 12345\n"
    assert status("oids", d, d.replace("33959", "33835"), listed) == compat.EXPECTED
    assert status("oids", d, d.replace("12345", "12346"), listed) == compat.UNEXPECTED


def test_the_repository_list_names_real_scripts():
    expectations = compat.load_expectations()
    source = compat.find_source()
    if source is None:
        pytest.skip(f"no pg_regress folder to check names against (${compat.ENV_SOURCE})")
    scheduled = set(compat.schedule(source))
    assert set(expectations.skip) <= scheduled
    assert set(expectations.scripts) <= scheduled
    assert all(e.reason for e in expectations.scripts.values())
