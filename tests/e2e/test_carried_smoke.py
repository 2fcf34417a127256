import select
import psycopg2
import pytest


def test_smoke_listen(make_proxy):
    h = make_proxy(pool_size=2)
    a = psycopg2.connect(**h.kwargs()); a.autocommit = True
    b = psycopg2.connect(**h.kwargs()); b.autocommit = True
    ca, cb = a.cursor(), b.cursor()
    ca.execute("LISTEN ch")
    assert ca.statusmessage == "LISTEN"
    cb.execute("NOTIFY ch, 'hello'")
    select.select([a], [], [], 5)
    a.poll()
    assert [(n.channel, n.payload) for n in a.notifies] == [("ch", "hello")]
    ca.execute("NOTIFY ch, 'self'")
    select.select([a], [], [], 5)
    a.poll()
    assert [n.payload for n in a.notifies][-1] == "self"
    ca.execute("PREPARE q (int) AS SELECT $1 + 1")
    ca.execute("EXECUTE q(41)")
    assert ca.fetchone() == (42,)
    cb.execute("PREPARE q (int) AS SELECT $1 + 2")
    for _ in range(5):
        ca.execute("EXECUTE q(1)"); assert ca.fetchone() == (2,)
        cb.execute("EXECUTE q(1)"); assert cb.fetchone() == (3,)
    with pytest.raises(psycopg2.errors.DuplicatePreparedStatement):
        ca.execute("PREPARE q AS SELECT 1")
    ca.execute("DEALLOCATE q")
    with pytest.raises(psycopg2.errors.InvalidSqlStatementName):
        ca.execute("EXECUTE q(1)")
    assert h.call(lambda: sum(1 for c in h.proxy.clients if c.relay is not None and c.relay.pinned)) == 0
