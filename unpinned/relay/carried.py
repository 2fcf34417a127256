"""Session state smart mode carries instead of pinning: LISTEN/UNLISTEN and SQL PREPARE.
Pure: the relay calls these with itself; they answer with bytes or a rewrite.

LISTEN/UNLISTEN. A simple Query made only of LISTEN/UNLISTEN statements, and an
Execute of such a statement, are answered by the proxy (CommandComplete "LISTEN" /
"UNLISTEN", as PostgreSQL words it) and recorded in the client's subscriptions
(state/notifications.py): at once outside a transaction block, at its commit inside
one. The answer waits until the pool's listening connection listens on the channel
(`Relay.held`): a NOTIFY sent after the client's LISTEN returned always reaches it.
In an aborted transaction the statement goes to the server, which refuses it as it
would have. A LISTEN in a string with other kinds of statements reaches the server
and pins, as before (counted by the check of listened channels).

SQL PREPARE/EXECUTE/DEALLOCATE. Each client's names are its own: the proxy prepares
each distinct statement text under one server-side name (`U_<n>`, the same name space
as protocol-level statements, see relay/statements.py) and renames the client's name
in the text it forwards (locations from pglast's scanner). An EXECUTE of a statement
the server connection lacks has its PREPARE run first, in a Query of its own whose
answers are swallowed. PostgreSQL's PREPARE and DEALLOCATE are not transactional (a
rollback keeps them): the client's names change when the statement itself succeeds,
known once its CommandComplete has been counted (`SqlPrepared.settle`). Duplicate and
unknown names get PostgreSQL's own errors (42P05, 26000).
"""
from __future__ import annotations

import re
from dataclasses import replace

from pglast.parser import scan

from unpinned.relay.pending import R_QUERY, StatementRun, statement_run
from unpinned.relay.prepared_view import carried_run
from unpinned.sql.classifier import classify
from unpinned.sql import kinds as K
from unpinned.sql.effects import Classification, Kind, Reason
from unpinned.state.policy import only_listen
from unpinned.sql.text import quote_ident
from unpinned.state.notifications import LISTEN, UNLISTEN
from unpinned.wire import messages as m

_SQL_KINDS = frozenset((Kind.PREPARE, Kind.EXECUTE, Kind.DEALLOCATE))
OWN_NAME = re.compile(r"U_\d+")      # a server-side name the proxy gives (relay/statements.py)
_NAMEDATALEN = 63


# ---------------------------------------------------------------------- LISTEN / UNLISTEN



def listen_query(relay, c: Classification) -> bytes | None:
    """A simple Query of LISTEN/UNLISTEN statements: the proxy's answer (its CommandCompletes;
    the relay adds ReadyForQuery), or None to forward it. May set `relay.held`."""
    session = relay.session
    if session.rds or session.subscribe is None or not only_listen(c):
        return None
    if relay.status == b"E" and not relay.queue:
        return None     # refused by the server: "current transaction is aborted"
    subs = session.subscriptions()
    # Outside a transaction block: at once (the proxy's own requests may be queued ahead, such
    # as a parameter sync; a client's request pipelined ahead is taken as ending as it began).
    now = relay.status == b"I"
    answer = []
    wait = []
    for group in c.groups:
        e = group[0]
        if e.kind is K.LISTEN:
            subs.op(LISTEN, e.name, now)
            answer.append(m.command_complete("LISTEN"))
            if not subs.ready(e.name):
                wait.append(e.name)
        else:
            subs.op(UNLISTEN, e.name, now)
            answer.append(m.command_complete("UNLISTEN"))
    out = b"".join(answer)
    if any(g[0].kind is K.LISTEN for g in c.groups):
        session.carry(Reason.LISTEN, c, "simple", relay.server)
    barrier = now and subs.barrier_due
    if not now and any(g[0].kind is K.LISTEN for g in c.groups):
        subs.barrier_due = True     # what its transaction notifies reaches it before the COMMIT returns
    if wait or barrier:
        # None: ReadyForQuery of the moment (relay.READY_NOW). An UNLISTEN answers once what was
        # committed before it has reached the client.
        if barrier:
            subs.barrier_due = False
        relay.held = [out, None]
        _wait(subs, wait, barrier)
        return b""
    return out


def listen_mixed(relay, c: Classification, raw: bytes):
    """A simple Query with LISTEN among other kinds of statements: the server connection must
    not stay listening, so each LISTEN is followed, in the same string (the same transaction),
    by the proxy's UNLISTEN of that channel, whose answer the client never sees; the session
    engine records the client's LISTEN at its CommandComplete (state/session.py). Returns what
    sql_prepare_query returns, or None."""
    session = relay.session
    if session.rds or session.subscribe is None or not c.parsed or only_listen(c) or \
            not any(e.kind is K.LISTEN for e in c.effects):
        return None
    edits = []
    hidden = set()
    for i, group in enumerate(c.groups):
        channels = [e.name for e in group if e.kind is K.LISTEN]
        if len(channels) != 1:
            continue
        at = c.ends[i] if i < len(c.ends) else -1
        sql = ";UNLISTEN " + quote_ident(channels[0])
        if at < 0:
            edits.append((len(raw), b"\n" + sql.encode()))
        else:
            edits.append((at, sql.encode()))
        hidden.add(i)
    if not edits:
        return None
    parts = []
    shifts = []
    prev = 0
    for at, new in edits:
        parts += [raw[prev:at], new]
        prev = at
        shifts.append((len(raw[:at].decode("utf-8", "replace")), 0, len(new.decode())))
    parts.append(raw[prev:])
    session.carry(Reason.LISTEN, c, "simple", relay.server)
    run = statement_run(R_QUERY, c, "simple")
    run.restored, run.own_after, run.shifts = set(), hidden, shifts
    return b"", b"".join(parts), run, []


def listen_execute(relay, c) -> bytes | None:
    """An Execute of a portal whose statement is one LISTEN or UNLISTEN: the CommandComplete
    the proxy answers instead (recorded at the batch's end unless it fails), or None."""
    session = relay.session
    if c is None or session.rds or session.subscribe is None or not only_listen(c) or len(c.groups) != 1:
        return None
    e = c.groups[0][0]
    subs = session.subscriptions()
    subs.op(LISTEN if e.kind is K.LISTEN else UNLISTEN, e.name, False)
    if e.kind is K.LISTEN:
        session.carry(Reason.LISTEN, c, "extended", relay.server)
    if e.kind is K.LISTEN and not subs.ready(e.name):
        relay.held = []                 # the rest of the batch waits; the answer is queued in order
        _wait(subs, [e.name])
    return m.command_complete("LISTEN" if e.kind is K.LISTEN else "UNLISTEN")


def _wait(subs, channels: list, barrier: bool = False) -> None:
    left = [len(channels) + barrier]

    def one() -> None:
        left[0] -= 1
        if left[0] == 0:
            subs.client.notify_resume()

    def passed() -> None:
        subs.barrier_passed()
        one()
    for ch in channels:
        subs.hub.when_ready(ch, one)
    if barrier:
        subs.hub.barrier(passed)


def resume(relay) -> None:
    """The listening connection listens now: the held answer goes out in its place."""
    held, relay.held = relay.held, None
    for msg in held or ():
        relay._synth(msg)


# ---------------------------------------------------------------------- SQL PREPARE

class SqlPrepared:
    """One client's SQL-prepared statements: client name -> (server name, PREPARE text)."""

    __slots__ = ("names", "pending", "statements", "parsed")

    def __init__(self):
        self.names: dict[str, tuple[str, str]] = {}
        # client name -> the client's query string that prepared it (pg_prepared_statements shows it)
        self.statements: dict[str, str] = {}
        # (queue entry (a StatementRun), index in the string, op, name, server name,
        #  server connection state, PREPARE text, the client's query string)
        self.pending: list[tuple] = []
        # server name -> (client name, PREPARE text, the client's query string) of a PREPARE or
        # DEALLOCATE parsed through the extended protocol (relay/carried_extended.py)
        self.parsed: dict[str, tuple[str, str, str]] = {}

    def settle(self, queue) -> None:
        """Apply the PREPAREs/DEALLOCATEs whose outcome is known: a counted CommandComplete is
        success; an answered request without it, failure."""
        keep = []
        for p in self.pending:
            run, index, op, name, server_name, state, text, original = p
            if run.count > index:
                if op == "prepare" or op == "prepare_aborted":
                    self.names[name] = (server_name, text)
                    self.statements[name] = original
                else:
                    self.names.pop(name, None)
                    self.statements.pop(name, None)
                    state.prepared.discard(server_name.encode())
            elif any(x is run for x in queue):
                keep.append(p)
            elif op == "prepare":
                state.prepared.discard(server_name.encode())   # the server refused it
        self.pending = keep

    def known(self, name: str) -> bool:
        return name in self.names or any(p[2].startswith("prepare") and p[3] == name for p in self.pending)

    def settled(self) -> bool:
        """Nothing in flight: what `names` holds is the whole truth (a takeover may move it)."""
        return not self.pending and not self.parsed

    def export(self) -> list[list[str]]:
        """[client name, statement after its name, the client's query string], in the order they
        were prepared: the server names are this process's and stay behind."""
        out = []
        for name, (server_name, sql) in self.names.items():
            out.append([name, sql[len(f"PREPARE {_q(server_name)} "):], self.statements.get(name, sql)])
        return out

    @classmethod
    def imported(cls, registry, rows: list[list[str]]) -> "SqlPrepared":
        """`export`'s rows in another process: each statement gets this process's server name
        for its text (shared with its other clients), prepared on a server connection when first
        executed there, as after any hand-off."""
        carried = cls()
        for name, key, original in rows:
            server_name = registry.sql.get(key)
            if server_name is None:
                server_name = registry.private(b"").name.decode()
                registry.sql[key] = server_name
            sql = f"PREPARE {_q(server_name)} {key}"
            registry.sql_text[server_name] = sql
            carried.names[name] = (server_name, sql)
            carried.statements[name] = original
        return carried


def settled(relay) -> SqlPrepared:
    """The client's SQL-prepared statements, with the outcomes known by now applied."""
    carried = relay.carried
    if carried is None:
        carried = relay.carried = SqlPrepared()
    carried.settle(relay.queue)
    return carried


def tokens_of(raw: bytes) -> tuple[str, list | None]:
    """A statement's text and pglast's tokens of it (None: the scanner refused it)."""
    text = raw.decode("utf-8", "replace")
    try:
        return text, list(scan(text))
    except Exception:
        return text, None


def _spliced(text: str, edits: list[tuple[int, int, str]]) -> tuple[str, list[tuple[int, int, int]]]:
    """`text` with each (start, stop, new) edit applied, in order, and the shifts that map an
    error position back to the client's text (offset, old length, new length)."""
    parts = []
    shifts = []
    prev = 0
    for start, stop, new in edits:
        parts.append(text[prev:start])
        parts.append(new)
        shifts.append((start, stop - start, len(new)))
        prev = stop
    parts.append(text[prev:])
    return "".join(parts), shifts


def _ident(text: str, tok) -> str | None:
    """The name a token stands for, as PostgreSQL reads it."""
    raw = text[tok.start:tok.end + 1]
    if tok.name == "IDENT" or tok.kind != "NO_KEYWORD":
        if raw.startswith('"'):
            name = raw[1:-1].replace('""', '"')
        else:
            name = raw.lower() if tok.name != "IDENT" else "".join(
                ch.lower() if "A" <= ch <= "Z" else ch for ch in raw)
        b = name.encode()
        if len(b) > _NAMEDATALEN:
            name = b[:_NAMEDATALEN].decode("utf-8", "ignore")
        return name
    return None


def sql_prepare_query(relay, c: Classification, raw: bytes):
    """A simple Query with SQL PREPARE/EXECUTE/DEALLOCATE of named statements, in smart mode.

    Returns None (not carried: forward as usual), bytes (an answer: CommandComplete, or an
    ErrorResponse the relay raises on the server), or (prelude bytes, new text, queue entry, ops)
    for the relay to forward; the entry (a StatementRun) is the one it must queue."""
    session = relay.session
    if session.rds or session.options.sql_prepare != "carry" or not c.parsed or \
            not any(e.kind in _SQL_KINDS and e.name is not None for e in c.effects):
        return None
    carried = settled(relay)
    wanted = [(e.kind, e.name) for e in c.effects if e.kind in _SQL_KINDS and e.name is not None]
    # DEALLOCATE of one of the client's names, alone: the proxy forgets it (the server keeps
    # the statement for other clients).
    if len(wanted) == 1 and len(c.effects) == 1 and c.statements == 1 and wanted[0][0] is K.DEALLOCATE \
            and relay.status != b"E":
        name = wanted[0][1]
        if name in carried.names:
            carried.names.pop(name)
            carried.statements.pop(name, None)
            session.carry(Reason.SQL_PREPARE, c, "simple", relay.server)
            return m.command_complete("DEALLOCATE")
        if carried.known(name):
            return None
        if name.encode() in relay.statements:
            return None     # a protocol-level name: the relay's own handling
        return m.error_response("26000", f'prepared statement "{name}" does not exist')
    text, tokens = tokens_of(raw)
    if tokens is None:
        return None
    server = relay.server
    state_names = server.prepared
    edits: list[tuple[int, int, str]] = []
    names: dict[str, str] = {}     # server name -> the client's, for errors
    prelude: list[str] = []
    local: dict[str, tuple[str, str] | None] = {}    # names this string prepares / deallocates
    ops = []
    index = 0
    seen = False        # a token since the last ';' (PostgreSQL skips empty statements)
    w = 0
    i = 0
    aborted = relay.status == b"E"
    while i < len(tokens) and w < len(wanted):
        tok = tokens[i]
        if tok.name == "ASCII_59":
            index += seen
            seen = False
            i += 1
            continue
        seen = True
        kw = tok.name
        kind, name = wanted[w]
        j = i + 1
        if kw == "DEALLOCATE" and j < len(tokens) and tokens[j].name == "PREPARE":
            j += 1
        if j >= len(tokens) or kw not in ("PREPARE", "EXECUTE", "DEALLOCATE") or \
                Kind(kw.lower()) is not kind or _ident(text, tokens[j]) != name:
            i += 1
            continue
        w += 1
        name_tok = tokens[j]
        if kind is K.PREPARE:
            if (local[name] is not None if name in local else carried.known(name)) \
                    or name.encode() in relay.statements:
                return m.error_response("42P05", f'prepared statement "{name}" already exists')
            end = _statement_end(tokens, j, len(text))
            key = text[name_tok.end + 1:end].strip()
            server_name = relay.registry.sql.get(key)
            if server_name is None:
                server_name = relay.registry.private(b"").name.decode()
                relay.registry.sql[key] = server_name
            sql = f"PREPARE {_q(server_name)} {key}"
            relay.registry.sql_text[server_name] = sql
            if not aborted:
                if state_names.has(server_name.encode()):
                    prelude.append(f"DEALLOCATE {_q(server_name)}")    # the client's text is analyzed afresh
                evicted = state_names.add(server_name.encode())
                if evicted is not None:
                    prelude.append(f"DEALLOCATE {_q(evicted.decode())}")
            local[name] = (server_name, sql)
            # (In an aborted transaction the server refuses it untouched: nothing to undo then.)
            ops.append((index, "prepare" if not aborted else "prepare_aborted", name, server_name, sql, text))
        else:
            if name in local:
                have = local[name]
            else:
                have = carried.names.get(name)
            if have is None:
                if OWN_NAME.fullmatch(name):
                    # Shaped like the proxy's names: maybe another client's statement on this connection.
                    return m.error_response("26000", f'prepared statement "{name}" does not exist')
                i = j + 1
                continue        # forwarded as it is: the server answers 26000 with the client's name
            server_name, sql = have
            if not aborted and name not in local and not state_names.has(server_name.encode()):
                evicted = state_names.add(server_name.encode())
                if evicted is not None:
                    prelude.append(f"DEALLOCATE {_q(evicted.decode())}")
                prelude.append(sql)
            if kind is K.DEALLOCATE:
                local[name] = None
                ops.append((index, "deallocate", name, server_name, sql, text))
        edits.append((name_tok.start, name_tok.end + 1, _q(server_name)))
        names[server_name] = name
        i = j + 1
    if not edits:
        return None
    new_text, shifts = _spliced(text, edits)
    # What the session engine sees: the statement without the effects carried here.
    groups = tuple(tuple(e for e in g if e.kind not in _SQL_KINDS or e.name is None) for g in c.groups)
    effects = tuple(e for g in groups for e in g)
    # (Errors come back with positions and names for the client's text: relay/prepared_view.py.)
    run = carried_run(replace(c, effects=effects, groups=groups if effects else ()), names, shifts)
    pre = m.query(";".join(prelude)) if prelude else b""
    session.carry(Reason.SQL_PREPARE, c, "simple", server)
    return pre, new_text.encode(), run, ops


def record(relay, run: StatementRun, ops: list) -> None:
    """The queue entry of a carried Query is known: its PREPAREs/DEALLOCATEs settle with it."""
    if not ops:
        return
    carried = relay.carried
    for index, op, name, server_name, sql, original in ops:
        carried.pending.append((run, index, op, name, server_name, relay.server, sql, original))


def _q(server_name: str) -> str:
    return '"' + server_name + '"'      # U_<n> as it is, not folded to lower case


def parse_rewrite(relay, data: bytes, start: int, end: int):
    """A Parse whose text EXECUTEs the client's SQL-prepared statements (asyncpg runs
    `fetch("EXECUTE q")` so): the Parse with the server-side names, after the PREPAREs the
    server connection lacks (the proxy's own statements, answers swallowed). Returns None
    (not carried), (bytes to send first, new Parse message), or an error (code, text) to raise.
    (PREPARE and DEALLOCATE through the extended protocol: relay/carried_extended.py.)"""
    session = relay.session
    if session.rds or session.options.sql_prepare != "carry":
        return None
    nul = data.index(b"\x00", start)
    qend = data.index(b"\x00", nul + 1)
    raw = data[nul + 1:qend]
    c = classify(raw)
    if not c.parsed or not any(e.kind is K.EXECUTE for e in c.effects) or \
            any(e.kind is K.PREPARE or e.kind is K.DEALLOCATE for e in c.effects):
        return None
    carried = settled(relay)
    text, tokens = tokens_of(raw)
    if tokens is None:
        return None
    edits = []
    pre = []
    for i, tok in enumerate(tokens[:-1]):
        if tok.name != "EXECUTE":
            continue
        name = _ident(text, tokens[i + 1])
        have = carried.names.get(name) if name is not None else None
        if have is None:
            if name is not None and OWN_NAME.fullmatch(name):
                return ("26000", f'prepared statement "{name}" does not exist')
            continue
        server_name, sql = have
        pre.append(_ensure(relay, server_name, sql))
        edits.append((tokens[i + 1].start, tokens[i + 1].end + 1, _q(server_name)))
    if not edits:
        return None
    session.carry(Reason.SQL_PREPARE, c, "extended", relay.server)
    msg = m.message(b"P", data[start:nul + 1] + _spliced(text, edits)[0].encode() + data[qend:end])
    return b"".join(pre), msg


def ensure_statement(relay, st) -> bytes:
    """A protocol-level statement that EXECUTEs a SQL-prepared one (see parse_rewrite), about to
    be bound or described: that one too must exist on this server connection."""
    out = b""
    for e in st.classification.effects:
        if e.kind is K.EXECUTE and isinstance(e.name, str):
            sql = relay.registry.sql_text.get(e.name)
            if sql is not None:
                out += _ensure(relay, e.name, sql)
    return out


def _ensure(relay, server_name: str, sql: str) -> bytes:
    """The proxy's own PREPARE in an extended batch, if this server connection lacks it."""
    prepared = relay.server.prepared
    if relay.status == b"E" or prepared.has(server_name.encode()):
        return b""
    out = b""
    evicted = prepared.add(server_name.encode())
    if evicted is not None:
        out = relay._run_own(f"DEALLOCATE {_q(evicted.decode())}")
    return out + relay._run_own(sql)


def _statement_end(tokens, j: int, length: int) -> int:
    for tok in tokens[j:]:
        if tok.name == "ASCII_59":
            return tok.start
    return length


def forget_all(relay) -> None:
    """DEALLOCATE ALL / DISCARD ALL ran: the client has no SQL-prepared statement left."""
    if relay.carried is not None:
        relay.carried.names.clear()
        relay.carried.statements.clear()
        relay.carried.pending.clear()


# ---------------------------------------------------------------------- pg_listening_channels()

_ALIAS_BEFORE = frozenset(("SELECT", "ASCII_44", "FROM", "JOIN", "LATERAL_P"))
_ALIAS_AFTER = frozenset(("ASCII_44", "ASCII_59", "ASCII_41", "FROM", "WHERE", "ORDER", "GROUP_P", "LIMIT",
                          "UNION", "EXCEPT", "INTERSECT", "OFFSET", "HAVING", "WINDOW", "JOIN", "CROSS", "LEFT",
                          "RIGHT", "INNER_P", "FULL", "NATURAL", "INTO"))


def listening_query(data: bytes, channels) -> bytes:
    """Simple Queries calling pg_listening_channels(): the server connection listens on nothing
    (the proxy does), so the call becomes the client's own channels, as a set-returning
    unnest() of literals under the function's name. Other messages, and a message split across
    reads, go as they are."""
    out = []
    pos = 0
    n = len(data)
    while n - pos >= 5:
        end = pos + 1 + m.unpack_i32(data, pos + 1)[0]
        if end > n:
            break
        msg = data[pos:end]
        out.append(_listening_message(msg, channels) if msg[:1] == b"Q" and b"pg_listening_channels" in
                   msg.lower() else msg)
        pos = end
    out.append(data[pos:])
    return b"".join(out)


def _listening_message(data: bytes, channels) -> bytes:
    text, tokens = tokens_of(data[5:-1])
    if tokens is None:
        return data
    values = "ARRAY[" + ", ".join("'" + ch.replace("'", "''") + "'" for ch in channels) + "]::text[]"
    edits = []
    for i, tok in enumerate(tokens):
        if tok.name != "IDENT" or text[tok.start:tok.end + 1].lower() != "pg_listening_channels" or \
                i + 2 >= len(tokens) or tokens[i + 1].name != "ASCII_40" or tokens[i + 2].name != "ASCII_41":
            continue
        start = tok.start
        before = tokens[i - 1].name if i else "SELECT"
        if i >= 2 and before == "ASCII_46" and text[tokens[i - 2].start:tokens[i - 2].end + 1].lower() == "pg_catalog":
            start = tokens[i - 2].start
            before = tokens[i - 3].name if i >= 3 else "SELECT"
        after = tokens[i + 3].name if i + 3 < len(tokens) else "ASCII_59"
        alias = " AS pg_listening_channels" if before in _ALIAS_BEFORE and after in _ALIAS_AFTER else ""
        edits.append((start, tokens[i + 2].end + 1, f"pg_catalog.unnest({values}){alias}"))
    if not edits:
        return data
    return m.query(_spliced(text, edits)[0])
