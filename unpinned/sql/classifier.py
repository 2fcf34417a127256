"""Statement text in, session effects out.

`classify()` turns the text of a simple Query (or of a Parse message) into a
`Classification`: the session effects of each statement, in order. It uses
PostgreSQL's own parser (pglast / libpg_query), but only when a cheap keyword
check says the text could have an effect at all, and it caches the result, so a
statement seen before costs one dict lookup.

The walk (sql/ast_effects.py) works on libpg_query's JSON output (`parse_sql_json`)
rather than on pglast's Python node objects: it is about five times faster to build,
and the classifier only reads a handful of fields.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from typing import Any, Final

from pglast import parser as _pg

from unpinned.sql.ast_effects import Ctx, reads_relation, statement_effects
from unpinned.sql.text import _count_statements, count_statements  # noqa: F401  (count_statements: public here too)
from unpinned.sql.effects import EMPTY, Classification, Effect, Kind

__all__ = ["classify", "keep_exact_texts", "fingerprint", "digest", "cache_clear", "CACHE_SIZE", "CACHE_BYTES", "EffectScan", "unheld", "redact_sql", "note_shape_flags"]

# --------------------------------------------------------------------------- cache

CACHE_SIZE = 10_000            # entries
CACHE_BYTES = 64 * 1024 * 1024  # total key text; keeps a flood of huge statements bounded

# OrderedDict: FIFO eviction with popitem is O(1); a plain dict's next(iter()) slows
# down after many deletions at its front.
_cache: "Final[OrderedDict[bytes | str, Classification]]" = OrderedDict()   # (Final: compiled, a C static, no lookup by name)
_cache_bytes = 0


def cache_clear() -> None:
    global _cache_bytes
    _cache.clear()
    _plain_shapes.clear()
    _cache_bytes = 0


def classify(query: Any) -> Classification:      # bytes or str; a bytearray or memoryview is copied
    """Session effects of a statement string. Cached by the exact text."""
    global _cache_bytes
    try:
        c = _cache.get(query)
    except TypeError:           # bytearray / memoryview: unhashable, copy once
        query = bytes(query)
        c = _cache.get(query)
    if c is not None:
        return c
    if query.__class__ is bytes:
        # Same text as one the pre-check passed but for its digits (pgbench's `WHERE aid =
        # 4711`, an ORM's literals): no effects either, and nothing else in the Classification
        # depends on the digits, so the shape's own one is the answer: no object per statement.
        # Texts with parameters ($1) come back verbatim: those are cached by their exact text
        # too, while the cache has room (so a stream of new texts evicts nothing); texts with
        # literals seldom do.
        c = _plain_shapes.get(query.translate(_DIGITS_AS_ZERO))
        if c is not None:
            if _exact_texts:
                c = _with_text(c, query)
            if b"$" in query and len(_cache) < CACHE_SIZE and _cache_bytes + len(query) <= CACHE_BYTES:
                _cache[query] = c
                _cache_bytes += len(query)
            return c
    return _classify_new(query)


def _classify_new(query: Any) -> Classification:
    global _cache_bytes
    if isinstance(query, str):
        text = query
        raw = query.encode("utf-8", "surrogatepass")
        c = _classify_text(text, raw)
    else:
        # A memoryview key would keep the caller's receive buffer alive: store bytes.
        query = raw = bytes(query)
        shape = raw.translate(_DIGITS_AS_ZERO)    # (classify() looked it up already)
        # PostgreSQL would reject invalid UTF-8; we still classify what we can.
        text = raw.decode("utf-8", "replace")
        if _may_have_effects(raw):
            c = _parse_effects(text, raw)
            if not c.effects and c.parsed and shape != raw and len(raw) <= SHAPE_MAX_BYTES \
                    and _digits_are_literals(raw):
                # Parsed, no effects (an UPDATE ... SET, TPC-B's statements): the same text
                # with other digits parses the same way (see _digits_are_literals).
                _add_shape(shape, c._statements)
        else:
            c = Classification(text, EMPTY, None, (), len(raw), True)
            if shape != raw and len(raw) <= SHAPE_MAX_BYTES:
                # The text itself is cached below too, for statements that come back
                # verbatim ($1 texts).
                _add_shape(shape, None)
    size = len(query)   # same measure as the eviction below (chars for str keys)
    # Bounded: FIFO eviction is enough; hot statements come back in one parse.
    while _cache and (len(_cache) >= CACHE_SIZE or _cache_bytes + size > CACHE_BYTES):
        old, _ = _cache.popitem(last=False)
        _cache_bytes -= len(old)
    if size <= CACHE_BYTES:
        _cache[query] = c
        _cache_bytes += size
    return c


# Statements the pre-check passed, with every digit made 0: the pre-check gives the same
# answer whatever the digits are (none of its words has one, and it treats every digit
# alike), so a statement of the same shape needs no check at all.
_DIGITS_AS_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")
SHAPE_CACHE_SIZE = 5_000
SHAPE_MAX_BYTES = 2048          # so the shapes stay under 10 MB
# The value: the Classification every text of that shape gets (its text is the shape's; its
# _seq, sql/sequences.handoff_flags, filled once asked).
_plain_shapes: "Final[OrderedDict[bytes, Classification]]" = OrderedDict()
# Verify mode names the statements that ran since a check by their texts: each text then gets
# its own Classification, digits included (see keep_exact_texts).
_exact_texts = False


def keep_exact_texts() -> None:
    """Give every statement a Classification with its own text, for this process's life."""
    global _exact_texts
    _exact_texts = True


def _add_shape(shape: bytes, statements: int | None) -> None:
    if len(_plain_shapes) >= SHAPE_CACHE_SIZE:
        _plain_shapes.popitem(last=False)
    _plain_shapes[shape] = Classification(shape.decode("utf-8", "replace"), EMPTY, statements, (),
                                          len(shape), True)


def _with_text(shared: Classification, query: bytes) -> Classification:
    c = Classification(query.decode("utf-8", "replace"), EMPTY, shared._statements, (), len(query), True)
    c._seq = shared._seq
    return c


def note_shape_flags(shape: bytes, flags: int) -> None:
    """Keep sql/sequences.handoff_flags of a plain statement shape (digits made 0), so that the
    next texts of that shape are classified with it (pgbench's statements: one ask per shape)."""
    c = _plain_shapes.get(shape)
    if c is not None:
        c._seq = flags


def _digits_are_literals(raw: bytes) -> bool:
    """Whether other digits in this text could not change its effects, for a text the parser
    found none in: every digit is then part of a number, a string or an identifier, and
    changing it keeps each token's kind (a leading 0 of 0x/0o/0b only turns a valid number
    into a syntax error, which runs nothing). Three things break that and are left out:
    dollar-quote tags ($a1$ ... $a2$ decides where a string ends), U& escapes
    (U&"\\0073et_config" spells a name in digits), and the functions the classifier knows,
    whose literal arguments decide the effect (set_config(..., 1 = 1) is local)."""
    return b"$" not in raw and b"u&" not in raw and b"U&" not in raw and _FUNC_HINT.search(raw.lower()) is None


# --------------------------------------------------------------------------- pre-check

# libpg_query's JSON parse tree: ~5x faster to build than pglast's node objects.
# (A module attribute so tests can count parses.)
_parse_json = _pg.parse_sql_json

# Every effect needs one of these words in the text (SQL keywords and the
# function names are whole words to PostgreSQL's lexer). Why the list is enough,
# so the pre-check never misses an effect:
#  set/reset   SET, RESET: also SET ROLE / SESSION AUTHORIZATION / SESSION
#              CHARACTERISTICS / TIME ZONE / NAMES / SCHEMA / TRANSACTION
#  temp, temporary, and the substring pg_temp (pg_temp.x, pg_temp_3.x): temp
#              objects, SELECT ... INTO TEMP (SELECT INTO without TEMP makes an
#              ordinary table, so "into" is not needed)
#  prepare, execute, deallocate, discard, declare, close, listen, unlisten,
#  load, drop
#  begin, start, commit, end, rollback, abort, savepoint, release: transaction
#              control (PREPARE TRANSACTION, COMMIT/ROLLBACK PREPARED included)
#  set_config, setval, nextval, currval, lastval, and the substring advisory
#              (pg_advisory_*, pg_try_advisory_*): functions
#  u&          U&"..." identifiers can spell any function or schema name with
#              escapes (U&"\0073et_config"), so they always go to the parser.
#  the substring prepared_statements: a read of pg_prepared_statements, which smart mode
#              answers with the client's own statements (no session effect, Kind.PREPARED_VIEW)
# Text without any of them cannot change session state, whether it parses or
# not, so it skips the parser (most SELECT/INSERT/UPDATE do).
#
# The rule: one of those words, as a whole word. A letter/underscore before, or an
# identifier character after, makes it part of a longer identifier ("offset", "settings",
# "temp1"). Digits and $ before are allowed on purpose: conservative, a false hit only
# costs one parse.
_PRECHECK_WORDS = re.compile(
    rb"pg_temp|advisory|u&|(?<![a-z_\x80-\xff])(?:set|reset|temp|temporary|prepare|execute"
    rb"|deallocate|discard|declare|close|listen|unlisten|load|drop|begin|start|commit|end"
    rb"|rollback|abort|savepoint|release|set_config|setval|nextval|currval|lastval)"
    rb"(?![a-z0-9_$\x80-\xff])")
_KEYWORDS = frozenset(
    b"set reset temp temporary prepare execute deallocate discard declare close listen unlisten load drop "
    b"begin start commit end rollback abort savepoint release set_config setval nextval currval lastval".split())
# For the fast first stage: A-Z lower-cased; letters, '_' and bytes >= 0x80 kept; every other
# byte (digits and $ included) a space. Every whole word the rule finds is then one of the
# split() tokens, so "no token is a keyword" is exact; a token that is one may still be a
# longer identifier ("set1"), which the regular expression decides.
_WORD_BYTES = bytes(c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 or c == 95 or c >= 128 else 32
                    for c in range(256))


def _may_have_effects(raw: bytes) -> bool:
    """The pre-check on the statement bytes (any case). ~0.5 µs for a typical SELECT."""
    words = raw.translate(_WORD_BYTES)
    if b"pg_temp" in words or b"advisory" in words or b"u&" in raw or b"U&" in raw or b"prepared_statements" in words:
        return True
    if _KEYWORDS.isdisjoint(words.split()):
        return False
    return _PRECHECK_WORDS.search(raw.lower()) is not None


# Function names the expression walk looks for; a statement with none of these
# substrings (or u&) has no function effect, so its AST is not walked for calls.
_FUNC_HINT = re.compile(rb"set_config|advisory|nextval|setval|currval|lastval|u&")


def _classify_text(text: str, raw: bytes) -> Classification:
    if not _may_have_effects(raw):
        return Classification(text, EMPTY, None, (), len(raw), True)
    return _parse_effects(text, raw)


def _parse_effects(text: str, raw: bytes) -> Classification:
    """The effects of text the pre-check could not clear, from PostgreSQL's parser."""
    low = raw.lower()
    try:
        tree = json.loads(_parse_json(text))
        stmts = tree.get("stmts", ())
        ctx = Ctx(text, _FUNC_HINT.search(low) is not None)
        view = b"prepared_statements" in low
        effects: list[Effect] = []
        groups: list[tuple[Effect, ...]] = []
        ends: list[int] = []
        for raw_stmt in stmts:
            stmt = raw_stmt.get("stmt")
            before = len(effects)
            if stmt:
                statement_effects(stmt, ctx, effects)
                if view and reads_relation(stmt, "pg_prepared_statements"):
                    effects.append(Effect(Kind.PREPARED_VIEW))
            groups.append(tuple(effects[before:]))
            ln = raw_stmt.get("stmt_len", 0)
            ends.append(raw_stmt.get("stmt_location", 0) + ln if ln else -1)
    except Exception:   # ParseError; also RecursionError on absurdly deep expressions
        return Classification(text=text, effects=(Effect(Kind.UNPARSED),),
                              _statements=max(1, _count_statements(text, raw)),
                              byte_length=len(raw), parsed=False)
    return Classification(text=text, effects=tuple(effects) if effects else EMPTY,
                          _statements=len(stmts), byte_length=len(raw), parsed=True,
                          groups=tuple(groups) if effects else (), ends=tuple(ends) if effects else (),
                          control_only=len(groups) == 1 and len(effects) == 1 and effects[0].kind is Kind.TRANSACTION)


# --------------------------------------------------------------------------- fingerprint / digest

_WS = re.compile(r"\s+")


def _text_hash(text: str) -> str:
    norm = _WS.sub(" ", text).strip().lower()
    return hashlib.blake2b(norm.encode("utf-8", "replace"), digest_size=8).hexdigest()


def fingerprint(c: Classification) -> str:
    """pglast (pg_query) fingerprint: same for statements that differ only in literals/whitespace."""
    fp = c._fingerprint
    if fp is None:
        try:
            fp = _pg.fingerprint(c.text) if c.parsed else _text_hash(c.text)
        except Exception:   # the fast path does not parse: the text may still be invalid
            fp = _text_hash(c.text)
        c._fingerprint = fp
    return fp


def digest(c: Classification) -> str:
    """RDS Proxy style digest: literals as $1..$n, lower case, whitespace collapsed."""
    d = c._digest
    if d is None:
        try:
            d = _pg.normalize(c.text)
        except Exception:
            d = c.text
        d = _WS.sub(" ", d).strip().lower()
        c._digest = d
    return d


def redact_sql(text: str) -> str:
    """The statement with its literals replaced by $n (PostgreSQL's normalization, as in the
    digest), for showing where literals may be secrets. Text the parser cannot read is not
    shown at all: it could hold anything."""
    try:
        return _WS.sub(" ", _pg.normalize(text)).strip()
    except Exception:
        return f"(not shown: {len(text.encode())} bytes that PostgreSQL's parser could not read)"


# --------------------------------------------------------------------------- text in pieces

class EffectScan:
    """The pre-check over a statement that arrives in pieces too large to hold whole (see
    relay/large.py): `hit` ends up True whenever `_may_have_effects` of the whole text would be.

    Each piece is checked together with the last `OVERLAP` bytes of the text before it, so a word
    cut in two is seen whole (the longest word and its context bytes fit). A word found at the
    very end of a piece waits for the next one: it may begin a longer identifier. A word right at
    the start of the overlap was already judged, with the byte before it, in the piece before
    (OVERLAP is more than twice the longest word), so it is skipped there."""

    __slots__ = ("tail", "hit", "inside")
    OVERLAP = 32

    def __init__(self) -> None:
        self.tail = b""
        self.hit = False
        self.inside = False     # the overlap starts after the text's first byte

    def feed(self, piece: bytes, final: bool = False) -> None:
        if self.hit:
            return
        buf = self.tail + piece
        words = buf.translate(_WORD_BYTES)
        # _may_have_effects, cheapest test first (a long text costs its bytes several times).
        if b"&" in buf and (b"u&" in buf or b"U&" in buf) or b"pg_temp" in words or b"advisory" in words \
                or not _KEYWORDS.isdisjoint(words.split()):
            size = len(buf)
            for found in _PRECHECK_WORDS.finditer(buf.lower()):
                if (found.end() < size or final) and (found.start() > 0 or not self.inside):
                    self.hit = True
                    return
        if len(buf) > self.OVERLAP:
            self.tail = buf[-self.OVERLAP:]
            self.inside = True
        else:
            self.tail = buf


def unheld(prefix: bytes, byte_length: int, scan: EffectScan) -> Classification:
    """The classification of a statement of `byte_length` bytes that was forwarded as it arrived
    without being held whole, from the pre-check over all of it: no effects when the pre-check
    clears it (it never misses one); otherwise it cannot be judged, and counts as unparsed
    (pinned, conservatively). `prefix`: its first bytes, for the pin log."""
    text = prefix.decode("utf-8", "replace") + f"... ({byte_length} bytes, not held by the proxy)"
    if not scan.hit:
        return Classification(text, EMPTY, 1, (), byte_length, True)
    return Classification(text=text, effects=(Effect(Kind.UNPARSED),), _statements=1,
                          byte_length=byte_length, parsed=False)
