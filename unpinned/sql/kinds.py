"""Kind's members as module attributes, for code that compares effects on every statement
(`from unpinned.sql import kinds as K`, then `e.kind is K.SET`): on Python 3.11 each `Kind.SET`
goes through the slow attribute hook EnumType.__getattr__ puts on every enum class (~0.8k
instructions; 3.12 dropped it), and a transaction of statements with effects (BEGIN, SET,
nextval) read dozens; a module attribute is a dictionary read."""
from __future__ import annotations

from unpinned.sql.effects import Kind

SET = Kind.SET
RESET = Kind.RESET
SET_CONFIG = Kind.SET_CONFIG
SET_TRANSACTION = Kind.SET_TRANSACTION
ROLE = Kind.ROLE
PREPARE = Kind.PREPARE
EXECUTE = Kind.EXECUTE
DEALLOCATE = Kind.DEALLOCATE
DISCARD = Kind.DISCARD
CREATE_TEMP = Kind.CREATE_TEMP
DROP = Kind.DROP
DECLARE_CURSOR = Kind.DECLARE_CURSOR
CLOSE_CURSOR = Kind.CLOSE_CURSOR
LISTEN = Kind.LISTEN
UNLISTEN = Kind.UNLISTEN
LOAD = Kind.LOAD
ADVISORY_LOCK = Kind.ADVISORY_LOCK
SEQUENCE = Kind.SEQUENCE
TRANSACTION = Kind.TRANSACTION
UNPARSED = Kind.UNPARSED
PREPARED_VIEW = Kind.PREPARED_VIEW
