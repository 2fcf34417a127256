"""unpinned/sql/kinds.py: every Kind member under its own name (code compares with `is`)."""
from __future__ import annotations

from unpinned.sql import kinds as K
from unpinned.sql.effects import Kind


def test_every_kind_is_there_as_itself():
    assert {name: getattr(K, name, None) for name in Kind.__members__} == dict(Kind.__members__)
    assert all(getattr(K, k.name) is k for k in Kind)
