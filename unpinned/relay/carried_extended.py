"""SQL PREPARE and DEALLOCATE sent through the extended protocol (a Parse of `PREPARE q AS ...`,
then Bind/Execute: drivers that send every statement so), carried in smart mode as
relay/carried.py carries them in a simple Query: the Parse gets the server-side name, and the
client's name changes when that statement's Execute has completed (`record_execute`).
Also pg_prepared_statements in an unnamed Parse (relay/prepared_view.py).
"""
from __future__ import annotations

from unpinned.relay import prepared_view
from unpinned.relay.carried import OWN_NAME, _ensure, _ident, _q, _statement_end, settled, tokens_of
from unpinned.sql.classifier import classify
from unpinned.sql import kinds as K
from unpinned.sql.effects import Reason
from unpinned.wire import messages as m


def parse_prepare(relay, data: bytes, start: int, end: int):
    """A Parse of one PREPARE or DEALLOCATE of a named statement, or of the unnamed statement
    reading pg_prepared_statements. Returns None (not carried), (bytes to send first, new
    Parse message), or an error (code, text) to raise, as carried.parse_rewrite does."""
    session = relay.session
    if session.rds or session.options.sql_prepare != "carry":
        return None
    nul = data.index(b"\x00", start)
    qend = data.index(b"\x00", nul + 1)
    raw = data[nul + 1:qend]
    c = classify(raw)
    if not c.parsed or c.statements != 1 or len(c.effects) != 1:
        return None
    e = c.effects[0]
    if e.kind is K.PREPARED_VIEW:
        if nul != start:
            return None     # a named statement outlives what it would list
        answer = prepared_view.view_query(relay, c, raw, own=relay._run_own)
        if answer is None:
            return None
        pre, text, _, _ = answer
        return pre, m.message(b"P", data[start:nul + 1] + text + data[qend:end])
    if e.kind is not K.PREPARE and e.kind is not K.DEALLOCATE or not isinstance(e.name, str):
        return None
    carried = settled(relay)
    text, tokens = tokens_of(raw)
    if tokens is None:
        return None
    j = 1 if e.kind is K.PREPARE else 2 if len(tokens) > 2 and tokens[1].name == "PREPARE" else 1
    if j >= len(tokens) or _ident(text, tokens[j]) != e.name:
        return None
    name = e.name
    name_tok = tokens[j]
    pre = b""
    if e.kind is K.PREPARE:
        if carried.known(name) or name.encode() in relay.statements:
            return ("42P05", f'prepared statement "{name}" already exists')
        key = text[name_tok.end + 1:_statement_end(tokens, j, len(text))].strip()
        server_name = relay.registry.sql.get(key)
        if server_name is None:
            server_name = relay.registry.private(b"").name.decode()
            relay.registry.sql[key] = server_name
        sql = f"PREPARE {_q(server_name)} {key}"
        relay.registry.sql_text[server_name] = sql
        if relay.status != b"E" and relay.server.prepared.has(server_name.encode()):
            pre = relay._run_own(f"DEALLOCATE {_q(server_name)}")   # the client's text is analyzed afresh
            relay.server.prepared.discard(server_name.encode())
        carried.parsed[server_name] = (name, sql, text)
    else:
        have = carried.names.get(name)
        if have is None:
            if OWN_NAME.fullmatch(name):
                return ("26000", f'prepared statement "{name}" does not exist')
            return None     # the server answers 26000 with the client's name
        server_name, sql = have
        pre = _ensure(relay, server_name, sql)
        carried.parsed[server_name] = (name, sql, text)
    new = text[:name_tok.start] + _q(server_name) + text[name_tok.end + 1:]
    session.carry(Reason.SQL_PREPARE, c, "extended", relay.server)
    return pre, m.message(b"P", data[start:nul + 1] + new.encode() + data[qend:end])


def record_execute(relay, run, c) -> bytes:
    """An Execute of a statement parse_prepare renamed, queued as `run`: the client's name
    changes when it completes. Returns the proxy's own statements to send right after it."""
    e = c.effects[0]
    if e.kind is not K.PREPARE and e.kind is not K.DEALLOCATE or len(c.effects) != 1 or \
            not isinstance(e.name, str) or relay.status == b"E":
        return b""
    got = relay.carried.parsed.get(e.name)
    if got is None:
        return b""
    name, sql, text = got
    server = relay.server
    if e.kind is K.PREPARE:
        if server.prepared.has(e.name.encode()):
            return b""      # (an Execute the server skips or refuses: a Parse before it failed)
        evicted = server.prepared.add(e.name.encode())
        relay.carried.pending.append((run, 0, "prepare", name, e.name, server, sql, text))
        return b"" if evicted is None else relay._run_own(f"DEALLOCATE {_q(evicted.decode())}")
    relay.carried.pending.append((run, 0, "deallocate", name, e.name, server, sql, text))
    return b""
