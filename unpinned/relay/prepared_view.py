"""What a client sees of its SQL-prepared statements when smart mode carries them under the
proxy's own names (relay/carried.py): PostgreSQL's output, as if the names were the client's.

- An error about a text the proxy renamed: its cursor position (field P) moved back to the
  client's text, and the server-side names it quotes (`wrong number of parameters for
  prepared statement "U_7"`) given back as the client's (`CarriedRun`, `carried_error`).
- `pg_prepared_statements` in a simple Query: the view becomes a derived table of the same
  columns holding the client's own statements only, SQL-level and protocol-level, under its
  names and with the statement text PostgreSQL would show (the client's query string); its
  SQL-level ones are prepared on the server connection first, so that the rows exist.
  Rows come in the order the client prepared them.
Pure: the relay calls these with itself.
"""
from __future__ import annotations

import re

from pglast.parser import scan

from unpinned.relay import pending
from unpinned.relay.pending import FORWARD, R_QUERY, StatementRun
from unpinned.relay.restore import unshift_position
from unpinned.sql.effects import Classification, Kind
from unpinned.sql.text import quote_literal
from unpinned.wire import messages as m

_QUOTED_OWN = re.compile(rb'"(U_\d+)"')
_SQL_KINDS = frozenset((Kind.PREPARE, Kind.EXECUTE, Kind.DEALLOCATE))


class CarriedRun(StatementRun):
    """The queue entry of a simple Query whose SQL-prepared statement names the proxy
    renamed: `names` maps each server-side name in it to the client's."""

    __slots__ = ("names",)


pending._FIELDS[CarriedRun] = pending._FIELDS[StatementRun] + CarriedRun.__slots__     # (its == and repr)


def carried_run(c: Classification, names: dict[str, str], shifts: list) -> CarriedRun:
    run = CarriedRun()
    run.kind = R_QUERY
    run.action = FORWARD
    run.payload = c
    run.count = 0
    run.protocol = "simple"
    run.restored = set()    # (not None: errors go through carried_error)
    run.own_after = None
    run.shifts = shifts
    run.names = names
    return run


def carried_error(msg: bytes, run: CarriedRun) -> bytes:
    """An ErrorResponse to a renamed text, as PostgreSQL would word it for the client's text."""
    msg = unshift_position(msg, run.shifts)
    names = run.names
    if not names or b'"U_' not in msg:
        return msg

    def back(found: re.Match) -> bytes:
        name = names.get(found.group(1).decode())
        return found.group(0) if name is None else b'"' + name.encode() + b'"'
    fields = msg[5:].split(b"\x00")
    for k, f in enumerate(fields):
        if f[:1] in (b"M", b"D"):
            fields[k] = f[:1] + _QUOTED_OWN.sub(back, f[1:])
    return m.message(b"E", b"\x00".join(fields))


# ---------------------------------------------------------------------- pg_prepared_statements

# The view's columns, by server major version (result_types since 16, plan counters since 14).
_COLUMNS_16 = ("name", "statement", "prepare_time", "parameter_types", "result_types", "from_sql",
               "generic_plans", "custom_plans")
_COLUMNS_14 = tuple(c for c in _COLUMNS_16 if c != "result_types")
_COLUMNS_OLD = _COLUMNS_14[:5]
# Where a relation may follow (FROM a, b JOIN c): the clause ends at these.
_FROM_ENDS = frozenset(("WHERE", "GROUP_P", "HAVING", "ORDER", "LIMIT", "OFFSET", "WINDOW", "UNION", "EXCEPT",
                        "INTERSECT", "FETCH", "FOR", "RETURNING", "SELECT", "ON", "USING"))
_ALIAS_KINDS = frozenset(("UNRESERVED_KEYWORD", "COL_NAME_KEYWORD"))
_VIEW = "pg_prepared_statements"


def view_query(relay, c: Classification, raw: bytes, own=None):
    """A simple Query reading pg_prepared_statements (and no SQL PREPARE/EXECUTE/DEALLOCATE),
    in smart mode carrying SQL PREPARE: (prelude bytes, new text, queue entry, ops), as
    carried.sql_prepare_query returns, or None to forward it as it is. `own`: for the text
    of a Parse, the relay's way to run its own statements in an extended batch."""
    session = relay.session
    if session.rds or session.options.sql_prepare != "carry" or not c.parsed or \
            any(e.kind in _SQL_KINDS for e in c.effects):
        return None
    text = raw.decode("utf-8", "replace")
    try:
        tokens = list(scan(text))
    except Exception:
        return None
    spans = _view_references(text, tokens)
    if not spans:
        return None
    carried = relay.carried
    if carried is not None:
        carried.settle(relay.queue)
    prelude: list[str] = []
    table = _client_table(relay, prelude)
    parts = []
    shifts = []
    prev = 0
    for start, stop, alias in spans:
        new = table + ("" if alias else " AS " + _VIEW)
        parts += [text[prev:start], new]
        shifts.append((start, stop - start, len(new)))
        prev = stop
    parts.append(text[prev:])
    if not prelude or relay.status == b"E":
        pre = b""
    elif own is None:
        pre = m.query(";".join(prelude))
    else:
        pre = b"".join(own(sql) for sql in prelude)
    return pre, "".join(parts).encode(), carried_run(c, {}, shifts), []


def _view_references(text: str, tokens) -> list[tuple[int, int, bool]]:
    """(start, end, has an alias) of each use of the view as a relation (after FROM, JOIN, or
    a comma in a FROM list), unqualified or as pg_catalog.pg_prepared_statements."""
    out = []
    in_from = [False]
    prev = ""
    for i, tok in enumerate(tokens):
        name = tok.name
        if name == "ASCII_40":
            in_from.append(False)
        elif name == "ASCII_41":
            if len(in_from) > 1:
                in_from.pop()
        elif name == "FROM":
            in_from[-1] = True
        elif name in _FROM_ENDS:
            in_from[-1] = False
        elif name == "IDENT" and in_from[-1] and _name(text, tok) == _VIEW:
            start = tok.start
            before = prev
            if prev == "ASCII_46" and i >= 2 and _name(text, tokens[i - 2]) == "pg_catalog":
                start = tokens[i - 2].start
                before = tokens[i - 3].name if i >= 3 else ""
            if before in ("FROM", "JOIN", "ASCII_44"):
                nxt = tokens[i + 1] if i + 1 < len(tokens) else None
                alias = nxt is not None and (nxt.name in ("AS", "IDENT") or nxt.kind in _ALIAS_KINDS)
                out.append((start, tok.end + 1, alias))
        prev = name
    return out


def _name(text: str, tok) -> str:
    raw = text[tok.start:tok.end + 1]
    if raw.startswith('"'):
        return raw[1:-1].replace('""', '"')
    return raw.lower()


def _client_table(relay, prelude: list[str]) -> str:
    """The derived table of the client's own statements (their SQL-level ones added to the
    server connection where missing, by statements put in `prelude`)."""
    rows = []
    carried = relay.carried
    prepared = relay.server.prepared
    if carried is not None:
        for name, (server_name, sql) in carried.names.items():
            if relay.status != b"E" and not prepared.has(server_name.encode()):
                evicted = prepared.add(server_name.encode())
                if evicted is not None:
                    prelude.append('DEALLOCATE "' + evicted.decode() + '"')
                prelude.append(sql)
            rows.append((server_name, name, carried.statements.get(name, sql)))
    for cname, st in relay.statements.items():
        body = st.parse_msg
        qstart = body.index(b"\x00", 5) + 1
        rows.append((st.name.decode(), cname.decode("utf-8", "replace"),
                     body[qstart:body.index(b"\x00", qstart)].decode("utf-8", "replace")))
    version = relay.server.reported.get("server_version", "")
    major = int(re.match(r"\d*", version).group(0) or 0)
    columns = _COLUMNS_16 if major >= 16 or not major else _COLUMNS_14 if major >= 14 else _COLUMNS_OLD
    if not rows:
        return f"(SELECT * FROM pg_catalog.{_VIEW} WHERE false)"
    values = ", ".join(f"({k}, {quote_literal(s)}, {quote_literal(n)}, {quote_literal(t)})"
                       for k, (s, n, t) in enumerate(rows))
    cols = ", ".join("c." + col if col in ("name", "statement") else "s." + col for col in columns)
    return (f"(SELECT {cols} FROM pg_catalog.{_VIEW} s JOIN (VALUES {values}) AS c(ord, server, name, statement) "
            f"ON s.name = c.server ORDER BY c.ord)")
