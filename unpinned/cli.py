"""Command line: `unpinned serve`, `unpinned demo`."""
from __future__ import annotations

import asyncio
import logging
import sys

import click

from . import __version__
from .config import ConfigError, load


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="unpinned")
def main() -> None:
    """unpinned: a PostgreSQL transaction-pooling proxy that carries session state
    across server connections instead of pinning, and says why when it must pin.

    Start with `unpinned demo` (embedded PostgreSQL, nothing to install), then
    `unpinned serve --upstream postgresql://user:pw@host:5432/db`.
    """


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file (see unpinned.example.toml).")
@click.option("--listen", help="HOST:PORT to accept clients on [127.0.0.1:6432].")
@click.option("--upstream", help="postgresql://user:password@host:port/db of the server (host may be a unix-socket directory).")
@click.option("--mode", type=click.Choice(["smart", "rds"]), help="smart (carry state) or rds (behave like RDS Proxy) [smart].")
@click.option("--pool-size", type=int, help="Max server connections per (database, user) [20].")
@click.option("--auth", type=click.Choice(["scram", "md5", "trust"]), help="How clients authenticate [scram].")
@click.option("--users", "users_file", type=click.Path(dir_okay=False), help="TOML users file: [users.NAME] password=...")
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug.")
def serve(config_path, listen, upstream, mode, pool_size, auth, users_file, verbose) -> None:
    """Run the proxy until SIGINT/SIGTERM."""
    _setup_logging(max(verbose, 1))
    try:
        cfg = load(config_path, listen=listen, upstream=upstream, mode=mode, pool_size=pool_size,
                   auth=auth, users_file=users_file)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    from .proxy import run
    install_uvloop()
    try:
        asyncio.run(run(cfg))
    except OSError as e:
        raise click.ClickException(f"cannot serve on {cfg.listen}: {e}") from None


@main.command()
@click.option("--clients", default=200, show_default=True, help="Concurrent client connections.")
@click.option("--pool-size", default=10, show_default=True, help="Server connections they share.")
@click.option("--seconds", default=5.0, show_default=True, help="How long the workload runs.")
def demo(clients, pool_size, seconds) -> None:
    """Start an embedded PostgreSQL and the proxy, run a many-client workload, report, exit clean."""
    from .demo import run_demo
    install_uvloop()
    sys.exit(run_demo(clients=clients, pool_size=pool_size, seconds=seconds))


if __name__ == "__main__":  # pragma: no cover
    main()
