"""unpinned: a PostgreSQL transaction-pooling proxy that carries session state instead of pinning."""
__version__ = "0.1.0"
