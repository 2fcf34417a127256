"""Rewrites that keep a client's startup values where a statement resets them: a server
connection's reset values are its own, not the client's. Also the way back for an error's
position in a text the proxy edited."""
from __future__ import annotations

from unpinned.relay.pending import StatementRun
from unpinned.sql import kinds as K
from unpinned.sql.text import quote_literal
from unpinned.wire import messages as m


class Restore:
    """Relay's rewrites of a Query or Parse text (a part of Relay: its state is Relay's)."""

    __slots__ = ()

    def _restore_query(self, c, raw: bytes, stmt: StatementRun) -> tuple[bytes | None, str | None]:
        """The client's startup values where a statement of this simple Query resets them (a
        server connection's reset values are its own): a literal NULL given to set_config
        becomes the startup value, and after a RESET / RESET ALL / SET ... TO DEFAULT the
        proxy's own set_config statement joins the string. A DISCARD ALL must be alone in its
        string: the proxy's statement follows as a Query of its own. Returns the new text (or
        None) and that Query's SQL (or None).

        Fills `stmt` (the queue entry's statement state) with the indexes of statements
        restored, those followed by the proxy's statement (whose answers are hidden), and the
        edits (character offset, old length, new length) to map error positions back."""
        session = self.session
        startup = session.startup
        edits: list[tuple[int, int, bytes]] = []
        restored: set[int] = set()
        hidden: set[int] = set()
        single = len(c.groups) == 1
        for i, group in enumerate(c.groups):
            for edit in value_edits(group, startup, raw):
                edits.append(edit)
                restored.add(i)
            if any(e.kind is K.DISCARD and e.name == "ALL" for e in group):
                if single and not edits:
                    sql = session.restore_sql(group)
                    if sql is not None:
                        stmt.restored, stmt.own_after, stmt.shifts = {0}, set(), []
                        return None, sql
                continue    # in a string of several it fails
            # Alone and outside a transaction, a SET LOCAL ends with the statement (and warns;
            # a second statement would make the string a transaction block, without the warning).
            sql = session.restore_sql(group, local=not (single and self.status == b"I"))
            if sql is None:
                continue
            at = c.ends[i] if i < len(c.ends) else -1
            if at < 0:
                edits.append((len(raw), len(raw), b"\n;" + sql.encode()))
            else:
                edits.append((at, at, b";" + sql.encode()))
            restored.add(i)
            hidden.add(i)
        if not edits:
            return None, None
        edits.sort(key=lambda x: x[0])
        parts = []
        prev = 0
        shifts = []
        for start, stop, new in edits:
            parts.append(raw[prev:start])
            parts.append(new)
            prev = stop
            shifts.append((len(raw[:start].decode("utf-8", "replace")),
                           len(raw[start:stop].decode("utf-8", "replace")),
                           len(new.decode("utf-8", "replace"))))
        parts.append(raw[prev:])
        stmt.restored, stmt.own_after, stmt.shifts = restored, hidden, shifts
        return b"".join(parts), None

    def _restore_parse(self, c, data: bytes, start: int, qstart: int, qend: int, end: int) -> bytes | None:
        """A Parse whose text gives set_config a value that may be NULL (a reset) for a
        parameter the client set at startup: see _value_edits. Returns the new Parse body
        (name, text, types), or None."""
        raw = data[qstart:qend]
        edits = sorted(value_edits(c.effects, self.session.startup, raw))
        if not edits:
            return None
        parts = [data[start:qstart]]
        prev = 0
        for at, stop, new in edits:
            parts += [raw[prev:at], new]
            prev = stop
        parts += [raw[prev:], data[qend:end]]
        return b"".join(parts)


def value_edits(effects, startup: dict, raw: bytes) -> list[tuple[int, int, bytes]]:
    """set_config(name, NULL, ...) resets to the server connection's own startup value: for a
    parameter the client gave at startup, its value argument becomes the client's startup
    value when it is a literal NULL, and COALESCE(argument, startup value) when it is a bound
    parameter or an expression (NULL there is a reset too). As (start, end, new bytes)."""
    out = []
    for e in effects:
        if e.kind is K.SET_CONFIG and e.span[0] >= 0 and isinstance(e.name, str) and e.name in startup:
            start, stop = e.span
            value = quote_literal(startup[e.name]).encode()
            if e.value is None:
                if raw[start:stop].lower() == b"null":
                    out.append((start, stop, value))
            else:
                out.append((start, stop, b"COALESCE(" + raw[start:stop] + b", " + value + b")"))
    return out


def unshift_position(msg: bytes, shifts: list[tuple[int, int, int]]) -> bytes:
    """An ErrorResponse about a query text the proxy edited, with its cursor position (field
    P, characters from 1) moved back to the client's text; dropped if it points into the
    proxy's own addition. `shifts`: (character offset, old length, new length), in order."""
    fields = msg[5:].split(b"\x00")
    for k, f in enumerate(fields):
        if f[:1] == b"P" and f[1:].isdigit():
            at = int(f[1:]) - 1      # in the edited text
            delta = 0
            for start, old, new in shifts:
                if at < start + delta:
                    break
                if at < start + delta + new:
                    if old == 0:
                        del fields[k]
                        return m.message(b"E", b"\x00".join(fields))
                    at, delta = start, 0    # inside a replaced value: its start
                    break
                delta += new - old
            fields[k] = b"P" + str(at - delta + 1).encode()
            return m.message(b"E", b"\x00".join(fields))
    return msg
