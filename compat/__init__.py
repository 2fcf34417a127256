"""make compat: PostgreSQL's regression scripts directly and through the proxy (see run.py)."""
