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


def raise_sql(code: str, text: str, hint: str | None = None) -> str:
    """SQL that makes the server raise this error (so its transaction fails too)."""
    using = f"ERRCODE = {quote_literal(code)}, MESSAGE = {quote_literal(text)}"
    if hint:
        using += f", HINT = {quote_literal(hint)}"
    return f"DO $unpinned$BEGIN RAISE EXCEPTION USING {using}; END$unpinned$"


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
