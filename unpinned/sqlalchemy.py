"""`unpinned.sqlalchemy`, the public name of the SQLAlchemy integration (unpinned/kit/sqla.py)."""
from unpinned.kit.sqla import *  # noqa: F401,F403
from unpinned.kit.sqla import __all__  # noqa: F401
