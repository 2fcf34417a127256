"""SQL text the proxy reads without the parser or writes itself: quoting, counting
statements, and the proxy's own statements (parameter syncs, raised errors)."""
from __future__ import annotations

from pglast import parser as _pg


def quote_ident(name: str) -> str:
    if name.replace("_", "a").replace(".", "a").isalnum() and name.islower() and not name[0].isdigit():
        return name
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def count_statements(text: str) -> int:
    """Number of statements in a string, without the parser."""
    return _count_statements(text, text.encode("utf-8", "surrogatepass"))


def _count_statements(text: str, raw: bytes) -> int:
    """Number of statements, without the parser (for the fast path)."""
    if b";" in raw or b"--" in raw or b"/*" in raw:
        try:
            return len(_pg.split(text, with_parser=False))
        except Exception:   # unterminated quote etc.: the server will say so
            return 1
    return 1 if raw.strip() else 0


# The SQLSTATE of the error `raise_sql` makes the server raise (invalid input for int4).
RAISE_SQLSTATE = "22P02"


def raise_sql(code: str, text: str, hint: str | None = None) -> str:
    """SQL that fails on the server, so that its transaction fails exactly as the statement the
    proxy refused would have made it fail (in an aborted transaction block it gets 25P02 like
    any other). The relay puts the proxy's own ErrorResponse, in PostgreSQL's words, in place
    of the server's 22P02 (see relay.Relay._fail). A cast, not a DO block: no PL/pgSQL loaded
    into the backend, no CONTEXT line, and the server log says plainly who refused what."""
    return f"SELECT {quote_literal(f'unpinned refused a statement: {code} {text}')}::pg_catalog.int4"


def param_sync_sql(have: dict[str, str], want: dict[str, str]) -> str:
    """The statements that take a server connection from `have` to `want` parameters.

    Values go through set_config(), which reads a value string exactly as a startup
    option or postgresql.conf would: `SET search_path TO 'a, b'` would make one schema
    named "a, b". Resets come first. Changing the session authorization resets the
    role, so the role is set again after it.
    """
    resets = [n for n in have if n not in want]
    sets = [n for n in want if have.get(n) != want[n]]
    identity = ("session_authorization", "role")
    if any(n not in identity for n in resets + sets) and any(n in have for n in identity):
        # Other settings may need the login user's rights (superuser-only ones): drop the
        # identity first and put it back last.
        resets += [n for n in identity if n in have and n not in resets]
        sets += [n for n in identity if n in want and n not in sets]
    if "session_authorization" in resets + sets and "role" in want and "role" not in sets:
        sets.append("role")     # changing the session authorization resets the role
    order = {"session_authorization": 0, "role": 1}
    resets.sort(key=lambda n: order.get(n, 2))
    sets.sort(key=lambda n: {"session_authorization": 1, "role": 2}.get(n, 0))
    parts = [f"RESET {quote_ident(n)}" for n in resets]
    if sets:
        parts.append("SELECT " + ", ".join(
            f"pg_catalog.set_config({quote_literal(n)}, {quote_literal(want[n])}, false)" for n in sets))
    return ";".join(parts)
