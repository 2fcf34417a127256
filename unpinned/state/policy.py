"""Pin policies: which reasons a classified statement pins for, in `rds` and `smart` mode.

Policies read `Effect`s (see effects.py); they never parse SQL. `rds_reasons` is
what RDS Proxy for PostgreSQL would pin on for a statement string (SPEC 2, rds
column). `static_smart_reasons` is the part of smart mode's decision that the
text alone settles; pins that depend on server state (advisory locks still
held, temp objects remaining, SQL-prepared statements left, channels listened)
are decided later by the session engine from the same effects.
"""
from __future__ import annotations

from dataclasses import dataclass

from unpinned.sql import kinds as K
from unpinned.sql.effects import REASON_SENTENCES, Classification, Kind, Reason, Scope

__all__ = ["STATEMENT_LIMIT", "PolicyOptions", "rds_reasons", "static_smart_reasons", "carried_reasons", "describe"]

# RDS Proxy pins any statement whose text is longer than 16 KB.
STATEMENT_LIMIT = 16384


@dataclass
class PolicyOptions:
    # RDS Proxy documents no SET LOCAL exception for PostgreSQL; default to not
    # pinning (what the MySQL docs say), configurable to be pessimistic.
    set_local_pins: bool = False
    # "carry": smart mode does not pin on sequence functions (currval/lastval are
    # guarded by the engine, SPEC 4.6); "pin": RDS behaviour.
    sequences: str = "carry"
    # "carry": relay/carried.py runs SQL PREPARE under the proxy's own names on any server
    # connection; "pin": smart mode pins while any SQL-prepared statement exists (as before).
    sql_prepare: str = "carry"

    def __post_init__(self) -> None:
        if self.sequences not in ("carry", "pin"):
            raise ValueError(f"sequences must be 'carry' or 'pin', not {self.sequences!r}")
        if self.sql_prepare not in ("carry", "pin"):
            raise ValueError(f"sql_prepare must be 'carry' or 'pin', not {self.sql_prepare!r}")


_DEFAULT = PolicyOptions()
_SQL_PREPARE_KINDS = (Kind.PREPARE, Kind.EXECUTE, Kind.DEALLOCATE)

# Effect kinds that pin in rds mode whatever their details.
_RDS_PLAIN = {
    Kind.RESET: Reason.SET,
    Kind.SET_CONFIG: Reason.SET_CONFIG,     # local or not: RDS pins on set_config in any form
    Kind.PREPARE: Reason.SQL_PREPARE,
    Kind.EXECUTE: Reason.SQL_PREPARE,
    Kind.DEALLOCATE: Reason.SQL_PREPARE,
    Kind.DISCARD: Reason.DISCARD,
    Kind.CREATE_TEMP: Reason.TEMP_OBJECT,
    Kind.DECLARE_CURSOR: Reason.CURSOR,     # WITH HOLD or not
    Kind.LISTEN: Reason.LISTEN,
    Kind.LOAD: Reason.LOAD,
    Kind.SEQUENCE: Reason.SEQUENCE,         # nextval/setval/currval/lastval
    Kind.UNPARSED: Reason.UNPARSED,
}


def rds_reasons(c: Classification, opts: PolicyOptions | None = None) -> list[Reason]:
    """Reasons RDS Proxy would pin the session for on this statement string, first seen first."""
    too_long = c.byte_length > STATEMENT_LIMIT
    if not c.effects and not too_long:
        return []
    opts = opts or _DEFAULT
    # The length check comes first: RDS Proxy cannot inspect such a statement at all.
    out: list[Reason] = [Reason.STATEMENT_TOO_LONG] if too_long else []
    for e in c.effects:
        k = e.kind
        r = _RDS_PLAIN.get(k)
        if r is not None and e.op == "explain":
            continue    # EXPLAIN EXECUTE only plans a statement the PREPARE pinned already
        if r is None:
            if k is K.SET or k is K.ROLE:
                # SET LOCAL / SET LOCAL ROLE end with the transaction: configurable.
                if e.scope is Scope.LOCAL and not opts.set_local_pins:
                    continue
                r = Reason.SET if k is K.SET else Reason.ROLE
            elif k is K.ADVISORY_LOCK:
                if e.flag is True:      # _xact_ variants: RDS documents no pin
                    continue
                r = Reason.ADVISORY_LOCK
            else:   # SET_TRANSACTION, TRANSACTION, DROP, CLOSE_CURSOR, UNLISTEN
                continue
        if r not in out:
            out.append(r)
    return out


def static_smart_reasons(c: Classification, opts: PolicyOptions | None = None) -> list[Reason]:
    """Smart-mode pins decided by the text alone, first seen first.

    SET/RESET/set_config/ROLE/DISCARD and long statements never pin in smart
    mode, and neither do SQL PREPARE/EXECUTE/DEALLOCATE (carried under the proxy's
    own names, relay/carried.py) nor LISTEN/UNLISTEN (the proxy listens on a
    connection of its own; a LISTEN among other statements is undone on the server
    connection in the same string), except a LISTEN in one string with SQL PREPARE.
    """
    if not c.effects:
        return []
    opts = opts or _DEFAULT
    out: list[Reason] = []
    for e in c.effects:
        k = e.kind
        if k is K.PREPARE and opts.sql_prepare == "pin":
            r = Reason.SQL_PREPARE      # EXECUTE/DEALLOCATE alone do not: the engine pins while any exists
        elif k is K.CREATE_TEMP:
            if e.flag is True:          # ON COMMIT DROP: gone at the end of the transaction
                continue
            r = Reason.TEMP_OBJECT
        elif k is K.DECLARE_CURSOR:
            if e.flag is not True:      # WITHOUT HOLD: closed at the end of the transaction
                continue
            r = Reason.CURSOR
        elif k is K.LISTEN:
            if only_listen(c) or opts.sql_prepare == "pin" or \
                    not any(e.kind in _SQL_PREPARE_KINDS for e in c.effects):
                continue
            r = Reason.LISTEN       # with SQL PREPARE in one string: the relay carries only one of them
        elif k is K.LOAD:
            r = Reason.LOAD
        elif k is K.ADVISORY_LOCK:
            # Session locks only; whether an unlock ends the pin is for the server to say.
            if e.flag is True or e.op not in ("lock", "try_lock"):
                continue
            r = Reason.ADVISORY_LOCK
        elif k is K.SEQUENCE:
            if opts.sequences != "pin":
                continue
            r = Reason.SEQUENCE
        elif k is K.UNPARSED:
            r = Reason.UNPARSED
        else:
            continue
        if r not in out:
            out.append(r)
    return out


def only_listen(c: Classification) -> bool:
    """A string of LISTEN/UNLISTEN statements only: smart mode answers it itself."""
    return c.parsed and bool(c.groups) and len(c.groups) == c.statements and \
        all(g and all(e.kind is K.LISTEN or e.kind is K.UNLISTEN for e in g) for g in c.groups)


def carried_reasons(c: Classification, opts: PolicyOptions | None = None) -> list[Reason]:
    """What RDS Proxy would pin for here that smart mode carries instead, first seen first:
    parameters, SQL-prepared statements, LISTEN, sequences, ... (SPEC 2)."""
    smart = static_smart_reasons(c, opts)
    pinned_by_engine = (Reason.SQL_PREPARE,) if (opts or _DEFAULT).sql_prepare == "pin" else ()
    return [r for r in rds_reasons(c, opts) if r not in smart and r not in pinned_by_engine]


def describe(reason: Reason) -> str:
    """The human sentence for a pin reason."""
    return REASON_SENTENCES[reason]
