"""The takeover's pure parts: a client's session as a snapshot and back, and frames with
descriptors over a unix socket."""
from __future__ import annotations

import json
import os
import socket
import struct
import threading

import pytest

from unpinned.config import load
from unpinned.frontend.handover import VERSION, restore, snapshot, why_not_movable
from unpinned.frontend.shared import Shared
from unpinned.ops.takeover import FrameReader, send_frame
from unpinned.relay import carried
from unpinned.telemetry.pinlog import PinLog


def _shared() -> Shared:
    return Shared(load(None, auth="trust"), None, PinLog(None))


def _parse(name: bytes, query: bytes, types: tuple[int, ...] = ()) -> bytes:
    body = name + b"\x00" + query + b"\x00" + struct.pack(f"!h{len(types)}I", len(types), *types)
    return b"P" + struct.pack("!i", len(body) + 4) + body


class _Transport:
    """What handover reads of a transport: whether it is closing and what it has not sent."""

    def __init__(self, buffered: int = 0):
        self.buffered = buffered

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.buffered


def _state(**over) -> dict:
    state = {"version": VERSION, "user": "app", "database": "shop", "application_name": "billing",
             "addr": "10.0.0.7:51000", "key": [1234, 5678], "connected_at": 1.5,
             "startup": {"application_name": "billing", "timezone": "UTC"},
             "params": {"application_name": "billing", "timezone": "Europe/Paris", "search_path": "shop, public"},
             "statements": {}}
    state.update(over)
    return state


def test_a_snapshot_survives_json_and_restores_the_session():
    old = _shared()
    shared_st = old.registry.get(_parse(b"", b"SELECT $1::int", (23,))[6:])
    private_st = old.registry.private(_parse(b"", rb"SELECT E'\\n'")[6:])
    state = _state()
    client = restore(old, state)
    client.relay.statements = {b"s1": shared_st, b"\xff odd name": private_st}
    snap = json.loads(json.dumps(snapshot(client)))

    new = _shared()
    new.registry.get(b"something else\x00\x00\x00")      # the new process numbers its statements itself
    again = restore(new, snap)
    assert (again.user, again.database, again.application_name, again.addr) == ("app", "shop", "billing",
                                                                                "10.0.0.7:51000")
    assert again.relay.session.startup == state["startup"], "RESET goes back to the startup values"
    assert again.relay.session.params == state["params"], "what the client SET since is carried"
    assert again.key == (1234, 5678) and new.by_key[(1234, 5678)] is again, "its cancel key still works"
    assert set(again.relay.statements) == {b"s1", b"\xff odd name"}
    moved_shared, moved_private = again.relay.statements[b"s1"], again.relay.statements[b"\xff odd name"]
    # Same text and types, under this process's own server-side names.
    assert moved_shared.parse_msg[5:].split(b"\x00", 1)[1] == shared_st.parse_msg[5:].split(b"\x00", 1)[1]
    assert moved_private.parse_msg[5:].split(b"\x00", 1)[1] == private_st.parse_msg[5:].split(b"\x00", 1)[1]
    assert moved_shared is new.registry.get(shared_st.parse_msg[5:].split(b"\x00", 1)[1]), \
        "shared with every client of the new process that prepares the same"
    assert moved_private.name != new.registry.get(private_st.parse_msg[5:].split(b"\x00", 1)[1]).name, \
        "a private statement stays private"


def test_a_snapshot_of_another_version_is_refused():
    with pytest.raises(ValueError, match="version"):
        restore(_shared(), _state(version=VERSION + 1))


def test_a_cancel_key_already_taken_here_is_not_stolen():
    shared = _shared()
    first = restore(shared, _state())
    second = restore(shared, _state())
    assert shared.by_key[(1234, 5678)] is first and second.key == (0, 0)


def test_only_a_client_at_rest_moves():
    shared = _shared()
    client = restore(shared, _state())
    client.transport = _Transport()
    assert why_not_movable(client) is None
    client.relay.status = b"T"
    assert why_not_movable(client) == "busy", "mid-transaction: it moves when the transaction ends"
    client.relay.status = b"I"
    client.pending.append(b"Q")
    assert why_not_movable(client) == "busy", "a request waiting for a server connection"
    client.pending.clear()
    client.relay.session.pins["temp_table"] = "CREATE TEMP TABLE t (a int)"
    assert why_not_movable(client) == "pinned"
    client.relay.session.pins.clear()
    # SQL-prepared statements move with the client (relay/carried.py export); one whose PREPARE
    # is still in flight waits for its outcome.
    client.relay.carried = carried.SqlPrepared()
    client.relay.carried.names["q"] = ("U_1", "PREPARE \"U_1\" AS SELECT 1")
    assert why_not_movable(client) is None
    client.relay.carried.pending.append(("run", 0, "prepare", "r", "U_2", None, "PREPARE \"U_2\" AS SELECT 2", ""))
    assert why_not_movable(client) == "busy"
    client.relay.carried = None
    assert client.relay.session.subscribe is not None, "a restored client carries LISTEN too"
    client.tls = True
    assert why_not_movable(client) == "tls"
    client.tls = False
    client.transport = _Transport(buffered=10)
    assert why_not_movable(client) == "busy", "its last answer must be out before another process writes"


def test_frames_carry_their_descriptors_in_order():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        big = "x" * 300_000         # more than one read, more than the socket buffer

        def send():
            send_frame(a, {"op": "one", "fds": 1}, [r1])
            send_frame(a, {"op": "none"})
            send_frame(a, {"op": "big", "fds": 1, "pad": big}, [r2])
        sender = threading.Thread(target=send)
        sender.start()
        reader = FrameReader(b)
        frames = [reader.read() for _ in range(3)]
        sender.join(10)
        assert [f["op"] for f, _ in frames] == ["one", "none", "big"]
        assert frames[2][0]["pad"] == big
        assert [len(fds) for _, fds in frames] == [1, 0, 1]
        os.write(w1, b"first")
        os.write(w2, b"second")
        assert os.read(frames[0][1][0], 10) == b"first" and os.read(frames[2][1][0], 10) == b"second"
        for _, fds in frames:
            for fd in fds:
                os.close(fd)
        a.close()
        with pytest.raises(ConnectionError):
            reader.read()
    finally:
        for fd in (r1, w1, r2, w2):
            try:
                os.close(fd)
            except OSError:
                pass
        a.close()
        b.close()


def test_sql_prepared_statements_move_under_this_processs_names():
    old_shared, shared = _shared(), _shared()
    old = restore(old_shared, _state())
    kept = old.relay.carried = carried.SqlPrepared.imported(old_shared.registry, [
        ["q1", "(int) AS SELECT $1 + 1", "PREPARE q1 (int) AS SELECT $1 + 1"],
        ["Q 2", "AS SELECT 'a;b'", 'PREPARE "Q 2" AS SELECT \'a;b\'; SELECT 1'],
    ])
    shared.registry.private(b"")        # this process has given out other names already
    snap = snapshot(old)
    assert [row[0] for row in snap["sql_prepared"]] == ["q1", "Q 2"]
    moved = restore(shared, snap).relay.carried
    assert list(moved.names) == ["q1", "Q 2"] and moved.statements == kept.statements
    for name, (server_name, sql) in moved.names.items():
        assert sql == f'PREPARE "{server_name}" {dict((r[0], r[1]) for r in snap["sql_prepared"])[name]}'
        assert shared.registry.sql_text[server_name] == sql
    assert moved.names["q1"][0] != kept.names["q1"][0], "this process's own name for the text"
    # Another client of the new process preparing the same text shares the server statement.
    again = carried.SqlPrepared.imported(shared.registry, [["other", "(int) AS SELECT $1 + 1", ""]])
    assert again.names["other"][0] == moved.names["q1"][0]

