"""The session-state engine alone (pure): feed it statements, completions and
ReadyForQuery as the relay would, and check what it believes."""
from __future__ import annotations

import pytest

from unpinned.sql.classifier import classify
from unpinned.telemetry.pinlog import ClientInfo, PinLog
from unpinned.state.server_state import ServerState
from unpinned.state.session import Session, SessionOptions


class Driver:
    """Plays the server's side of a simple-protocol conversation."""

    def __init__(self, startup=None, **options):
        self.log = PinLog(mode=options.get("mode", "smart"))
        self.session = Session(startup or {}, ClientInfo(1, "test", "u", "db"), self.log, SessionOptions(**options))
        self.server = ServerState()
        self.status = b"I"
        self.check_sql = None

    def run(self, sql: str, *, fail_at: int | None = None, tags: list[bytes] | None = None, status=None):
        """Run one simple Query: statements before `fail_at` complete, that one errors."""
        c = classify(sql)
        refusal = self.session.statement(c, "simple", self.server)
        if refusal is not None:
            return refusal
        for i in range(c.statements):
            if fail_at is not None and i == fail_at:
                self.session.failed()
                break
            tag = (tags or [b"SELECT 1"] * c.statements)[i]
            self.session.completed(c, i, tag, "simple", self.server)
        if status is None:
            status = self._status_after(sql, fail_at)
        self.status = status
        self.check_sql = self.session.ready(status, self.server)
        return None

    def _status_after(self, sql: str, fail_at) -> bytes:
        low = sql.strip().lower()
        if low.startswith(("begin", "start")) or self.status != b"I":
            if low.startswith(("commit", "rollback", "end", "abort")) and not low.startswith("rollback to"):
                return b"I"
            return b"E" if fail_at is not None or self.status == b"E" and not low.startswith("rollback to") else b"T"
        return b"I"

    @property
    def params(self):
        return self.session.params


def test_set_outside_transaction_commits():
    d = Driver()
    d.run("SET lock_timeout = 3000")
    assert d.params == {"lock_timeout": "3000"}
    assert d.server.params == {"lock_timeout": "3000"}
    assert not d.session.pinned


def test_set_in_failed_implicit_transaction_is_undone():
    d = Driver()
    d.run("SET work_mem = '8MB'; SELECT 1/0", fail_at=1)
    assert d.params == {}


def test_explicit_transaction_rollback_and_commit():
    d = Driver()
    d.run("BEGIN")
    d.run("SET work_mem = '8MB'")
    assert d.params == {}                      # not yet committed
    d.run("ROLLBACK", tags=[b"ROLLBACK"])
    assert d.params == {}
    d.run("BEGIN")
    d.run("SET work_mem = '9MB'")
    d.run("COMMIT", tags=[b"COMMIT"])
    assert d.params == {"work_mem": "9MB"}


def test_commit_of_aborted_transaction_is_a_rollback():
    d = Driver()
    d.run("BEGIN")
    d.run("SET work_mem = '8MB'")
    d.run("SELECT 1/0", fail_at=0)
    d.run("COMMIT", tags=[b"ROLLBACK"])
    assert d.params == {}


def test_savepoints():
    d = Driver()
    d.run("BEGIN")
    d.run("SET work_mem = '1MB'")
    d.run("SAVEPOINT a")
    d.run("SET work_mem = '2MB'")
    d.run("SAVEPOINT b")
    d.run("SET work_mem = '3MB'")
    d.run("ROLLBACK TO SAVEPOINT b")
    d.run("RELEASE SAVEPOINT a")
    d.run("COMMIT", tags=[b"COMMIT"])
    assert d.params == {"work_mem": "2MB"}


def test_set_local_and_set_transaction_never_outlive_the_transaction():
    d = Driver()
    d.run("BEGIN")
    d.run("SET LOCAL work_mem = '8MB'")
    d.run("SELECT set_config('lock_timeout', '1s', true)")
    d.run("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
    d.run("SET transaction_isolation = 'serializable'")
    d.run("COMMIT", tags=[b"COMMIT"])
    assert d.params == {}


def test_reset_goes_back_to_startup_value():
    d = Driver(startup={"statement_timeout": "5s"})
    d.run("SET statement_timeout = '1s'")
    assert d.params == {"statement_timeout": "1s"}
    d.run("RESET statement_timeout")
    assert d.params == {"statement_timeout": "5s"}
    # The server connection is back at its own default, so the startup value must be sent again.
    assert "statement_timeout" not in d.server.params


def test_reset_all_and_discard_all():
    d = Driver(startup={"application_name": "app"})
    d.run("SET work_mem = '8MB'; SET lock_timeout = 10")
    d.run("RESET ALL")
    assert d.params == {"application_name": "app"}
    assert d.server.params == {}
    d.run("SET work_mem = '8MB'")
    d.run("DISCARD ALL")
    assert d.params == {"application_name": "app"}


def test_set_config_is_read_back_and_set_default_resets():
    d = Driver()
    # Even literal set_config() calls may not run (WHERE false, CASE): the server is asked.
    d.run("SELECT set_config('search_path', 'a, b', false), set_config('myapp.tenant', '42', false)")
    assert "current_setting('myapp.tenant', true)" in d.check_sql
    assert "current_setting('search_path', true)" in d.check_sql
    d.session.checked(["42", None, "session", "a, b", '"$user", public', "session"], d.server)  # sorted names
    assert d.params == {"search_path": "a, b", "myapp.tenant": "42"}
    d.run("SET search_path TO DEFAULT")
    assert d.params == {"myapp.tenant": "42"}
    # NULL resets when it runs; the read-back's source tells a reset from a SET.
    d.run("SELECT set_config('myapp.tenant', NULL, false)")
    assert "current_setting('myapp.tenant', true)" in d.check_sql
    d.session.checked(["", None, "default"], d.server)
    assert d.params == {}
    # ... and when it does not run (WHERE false), the value the client set stays.
    d.run("SET work_mem = '12MB'")
    d.run("SELECT set_config('work_mem', NULL, false) WHERE false")
    d.session.checked(["12MB", "4MB", "session"], d.server)
    assert d.params == {"work_mem": "12MB"}


def test_session_authorization_resets_role_and_reset_all_keeps_both():
    d = Driver()
    d.run("SET ROLE r1")
    d.run("RESET ALL")
    assert d.params == {"role": "r1"}
    d.run("SET SESSION AUTHORIZATION u2")
    assert d.params == {"session_authorization": "u2"}
    d.run("DISCARD ALL")
    assert d.params == {}


def test_committed_readback_survives_a_later_rollback():
    d = Driver()
    d.run("BEGIN")
    d.run("SELECT set_config('work_mem', (SELECT '64MB'), false)")
    d.run("COMMIT AND CHAIN", tags=[b"COMMIT"], status=b"T")
    d.run("ROLLBACK", tags=[b"ROLLBACK"])
    assert d.check_sql is not None and "current_setting('work_mem', true)" in d.check_sql


def test_value_from_an_expression_is_read_back():
    d = Driver()
    d.run("SELECT set_config('work_mem', (SELECT '16MB'), false)")
    assert d.check_sql is not None and "current_setting('work_mem', true)" in d.check_sql
    d.session.checked(["16MB", "4MB", "session"], d.server)
    assert d.params == {"work_mem": "16MB"}
    # asyncpg's restore of jit to the value the server already had: still the server's own
    # value (source "default"), nothing recorded.
    d.run("SELECT set_config('jit', (SELECT 'on'), false)")
    d.session.checked(["on", "on", "default"], d.server)
    assert "jit" not in d.params


def test_read_back_reset_returns_to_the_startup_value():
    d = Driver(startup={"work_mem": "32MB"})
    d.run("SELECT set_config('work_mem', (SELECT NULL), false)")
    d.session.checked(["4MB", "4MB", "default"], d.server)
    assert d.params == {"work_mem": "32MB"} and "work_mem" not in d.server.params


def test_role_is_carried():
    d = Driver()
    d.run("SET ROLE reporting")
    assert d.params == {"role": "reporting"}
    d.run("RESET ROLE")
    assert d.params == {}


def test_pins_are_confirmed_by_the_server_and_unpinned():
    d = Driver()
    d.run("CREATE TEMP TABLE t (x int)")
    assert d.check_sql and "pg_my_temp_schema" in d.check_sql
    d.session.checked(["1"], d.server)
    assert d.session.pins.keys() == {"temp_object"}
    d.run("DROP TABLE t")
    d.session.checked(["0"], d.server)
    assert not d.session.pinned
    assert [e.event for e in d.log.recent if e.event in ("pin", "unpin")] == ["pin", "unpin"]


def test_failed_try_lock_leaves_no_pin():
    d = Driver()
    d.run("SELECT pg_try_advisory_lock(1)")
    d.session.checked(["0"], d.server)
    assert not d.session.pinned


def test_xact_lock_and_on_commit_drop_need_no_check():
    d = Driver()
    d.run("SELECT pg_advisory_xact_lock(1)")
    assert d.check_sql is None
    d.run("BEGIN")
    d.run("CREATE TEMP TABLE t (x int) ON COMMIT DROP")
    d.run("COMMIT", tags=[b"COMMIT"])
    assert d.check_sql is None


def test_load_and_unparsed_pin_for_good():
    d = Driver()
    d.run("LOAD 'auto_explain'")
    assert "load" in d.session.pins


def test_currval_is_never_refused_but_counted_where_the_values_are_elsewhere():
    # The server answers currval()/lastval(): the relay makes sure a connection never carries
    # another client's values (DISCARD SEQUENCES at hand-off). The session counts the answers
    # that cannot be its own values because they are on another server connection.
    d = Driver()
    assert d.run("SELECT currval('s')") is None                # no nextval yet: the server's own 55000
    assert d.session.currval_refusals == 0
    d.run("SELECT nextval('s')")
    assert d.server.seq_owner is d.session
    assert d.run("SELECT currval('s')") is None
    assert d.session.currval_refusals == 0
    d.server.seq_owner = None                                  # discarded when another client took it
    assert d.run("SELECT lastval()") is None
    assert d.session.currval_refusals == 1


def test_sequences_pin_option():
    d = Driver(sequences="pin")
    d.run("SELECT nextval('s')")
    assert "sequence" in d.session.pins


@pytest.mark.parametrize("sql, reason", [
    ("SET x.y = 1", "set"), ("SELECT nextval('s')", "sequence"), ("DISCARD ALL", "discard"),
    ("SELECT set_config('a.b', '1', true)", "set_config"),
])
def test_rds_mode_pins_at_first_sight_and_never_unpins(sql, reason):
    d = Driver(mode="rds")
    d.run(sql)
    assert list(d.session.pins) == [reason]
    assert d.check_sql is None
    d.run("SELECT 1")
    assert d.session.pinned


def test_smart_mode_records_would_pin():
    d = Driver()
    d.run("SET lock_timeout = 3000")
    assert [(e.event, e.reason) for e in d.log.recent] == [("would_pin_rds", "set")]


def test_restore_sql_gives_back_startup_values_a_statement_resets():
    d = Driver(startup={"work_mem": "32MB", "timezone": "Asia/Tokyo", "search_path": "a, b"})

    def restore(sql, **kw):
        return d.session.restore_sql(classify(sql).groups[0], **kw)
    assert restore("RESET work_mem") == "SELECT pg_catalog.set_config('work_mem', '32MB', false)"
    assert restore("SET TIME ZONE DEFAULT") == "SELECT pg_catalog.set_config('timezone', 'Asia/Tokyo', false)"
    assert restore("RESET ALL") == restore("DISCARD ALL") == (
        "SELECT pg_catalog.set_config('work_mem', '32MB', false), "
        "pg_catalog.set_config('timezone', 'Asia/Tokyo', false), pg_catalog.set_config('search_path', 'a, b', false)")
    assert restore("SET LOCAL work_mem TO DEFAULT") == "SELECT pg_catalog.set_config('work_mem', '32MB', true)"
    assert restore("SET LOCAL work_mem TO DEFAULT", local=False) is None
    assert restore("RESET lock_timeout") is None          # not a startup parameter
    assert restore("SET work_mem = '1MB'") is None
    assert Driver().session.restore_sql(classify("RESET ALL").groups[0]) is None


def test_restored_reset_leaves_the_startup_value_on_the_server():
    d = Driver(startup={"work_mem": "32MB"})
    d.run("SET work_mem = '1MB'")
    c = classify("RESET ALL")
    d.session.statement(c, "simple", d.server)
    d.session.completed(c, 0, b"RESET", "simple", d.server, restored=True)
    d.session.ready(b"I", d.server)
    assert d.params == {"work_mem": "32MB"}
    assert d.server.params == {"work_mem": "32MB"}       # the relay set it again right after
    assert d.session.resync_sql(d.server) is None


def test_resync_in_a_transaction_leaves_values_only_the_server_knows():
    # RESET ALL (without the relay's restore) then a set_config of the same startup parameter in
    # the same batch: the resync at the end of the batch must not put the startup value back
    # over the value the set_config gave it.
    d = Driver(startup={"timezone": "Asia/Tokyo", "work_mem": "32MB"})
    d.run("BEGIN")
    d.run("RESET ALL; SELECT set_config('TimeZone', 'UTC', false)")
    sql = d.session.resync_sql(d.server, b"T")
    assert sql is not None and "timezone" not in sql.lower() and "'32MB'" in sql


def test_backslash_value_is_read_back_while_standard_conforming_strings_is_unknown():
    d = Driver()
    d.run("BEGIN")
    d.run("SELECT set_config('standard_conforming_strings', 'off', false)")   # known only at the end
    d.run("SET application_name = 'back\\slash'")
    d.run("COMMIT", tags=[b"COMMIT"])
    assert d.check_sql is not None and "current_setting('application_name', true)" in d.check_sql
    assert "application_name" not in d.params

