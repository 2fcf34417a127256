"""Command line: `unpinned serve`, `unpinned demo`."""
from __future__ import annotations

import asyncio
import json as _json
import logging
import sys

import click
from rich.console import Console
from rich.table import Table

from unpinned import __version__, build_description
from unpinned.config import ConfigError, effective_workers, load
from unpinned.dev.demo import run_demo
from unpinned.kit.audit import AuditError, exit_status, render_json, render_markdown, render_table, run_audit
from unpinned.ops.workers import supervise
from unpinned.proxy import install_uvloop, run, run_worker
from unpinned.sql.classifier import classify, digest, fingerprint
from unpinned.sql.effects import Kind
from unpinned.state.policy import PolicyOptions, carried_reasons, describe, rds_reasons, static_smart_reasons


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="unpinned",
                      message=f"%(prog)s, version %(version)s; {build_description()}")
def main() -> None:
    """unpinned: a PostgreSQL transaction-pooling proxy that carries session state
    across server connections instead of pinning, and says why when it must pin.

    Start with `unpinned demo` (embedded PostgreSQL, nothing to install), then
    `unpinned serve --upstream postgresql://user:pw@host:5432/db`.
    """


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file (see unpinned.example.toml).")
@click.option("--listen", help="HOST:PORT to accept clients on [127.0.0.1:6432].")
@click.option("--reader-listen", "reader_listen", help="HOST:PORT of a read-only endpoint served by the replicas.")
@click.option("--upstream", help="postgresql://user:password@host:port/db of the server (host may be a unix-socket "
              "directory); several hosts as libpq takes them: host1:port1,host2:port2.")
@click.option("--mode", type=click.Choice(["smart", "rds"]), help="smart (carry state) or rds (behave like RDS Proxy) [smart].")
@click.option("--pool-size", type=int, help="Max server connections per (database, user) [20].")
@click.option("--auth", type=click.Choice(["scram", "md5", "trust"]), help="How clients authenticate [scram].")
@click.option("--users", "users_file", type=click.Path(dir_okay=False), help="TOML users file: [users.NAME] password=...")
@click.option("--http", "http_listen", help="HOST:PORT for /metrics, /api/* and the live page.")
@click.option("--pin-log", "pin_log", help="JSON-lines pin log: '-' for stderr or a file path.")
@click.option("--workers", type=int, help="Processes sharing the port, each with its share of the pools; 0 = one per CPU [1].")
@click.option("--takeover", "takeover_socket", type=click.Path(dir_okay=True),
              help="Unix socket for takeover restarts: take the clients of the proxy listening there, if any, "
                   "then listen there for the next one (docs/production.md).")
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug.")
def serve(config_path, listen, reader_listen, upstream, mode, pool_size, auth, users_file, http_listen, pin_log, workers,
          takeover_socket, verbose) -> None:
    """Run the proxy until SIGINT/SIGTERM. SIGHUP (or RELOAD in the admin console) re-reads the config."""
    _setup_logging(max(verbose, 1))
    overrides = dict(listen=listen, reader_listen=reader_listen, upstream=upstream, mode=mode, pool_size=pool_size, auth=auth,
                     users_file=users_file, http_listen=http_listen, pin_log=pin_log, workers=workers,
                     takeover_socket=takeover_socket)
    try:
        cfg = load(config_path, **overrides)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    logging.getLogger("unpinned").info("unpinned %s: %s", __version__, build_description())   # once, before any fork
    if effective_workers(cfg) > 1:
        sys.exit(supervise(cfg, config_path, overrides,
                           lambda info: run_worker(cfg, config_path, overrides, info)))
    install_uvloop()
    try:
        asyncio.run(run(cfg, config_path, overrides))
    except OSError as e:
        raise click.ClickException(f"cannot serve on {cfg.listen}: {e}") from None


@main.command()
@click.argument("sql")
@click.option("--mode", type=click.Choice(["both", "smart", "rds"]), default="both", show_default=True,
              help="Which mode's verdict to show.")
@click.option("--set-local-pins", is_flag=True, help="rds mode: treat SET LOCAL as pinning.")
@click.option("--sequences", type=click.Choice(["carry", "pin"]), default="carry", show_default=True)
@click.option("--sql-prepare", type=click.Choice(["carry", "pin"]), default="carry", show_default=True,
              help="smart mode: carry SQL PREPARE, or pin on it.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check(sql, mode, set_local_pins, sequences, sql_prepare, as_json) -> None:
    """Would this statement pin, in which mode, and why.

    Exit status: 0 no pin in the chosen mode(s), 1 it pins, 2 usage error.
    """

    c = classify(sql)
    opts = PolicyOptions(set_local_pins=set_local_pins, sequences=sequences, sql_prepare=sql_prepare)
    verdict = {"rds": [str(r) for r in rds_reasons(c, opts)], "smart": [str(r) for r in static_smart_reasons(c, opts)]}
    shown = ["rds", "smart"] if mode == "both" else [mode]
    carries = [str(r) for r in carried_reasons(c, opts)]      # what smart mode carries instead of pinning
    if as_json:
        click.echo(_json.dumps({
            "sql": sql, "fingerprint": fingerprint(c), "digest": digest(c), "statements": c.statements,
            "bytes": c.byte_length, "parsed": c.parsed,
            "effects": [{"kind": str(e.kind), "name": e.name if isinstance(e.name, str) or e.name is None else repr(e.name),
                         "value": e.value if isinstance(e.value, str) or e.value is None else repr(e.value),
                         "scope": str(e.scope), "flag": e.flag if isinstance(e.flag, bool) else repr(e.flag), "op": e.op}
                        for e in c.effects],
            **{m: {"pins": bool(verdict[m]), "reasons": [{"code": r, "text": describe(r)} for r in verdict[m]],
                   **({"carries": [{"code": r, "text": describe(r)} for r in carries]} if m == "smart" else {})}
               for m in shown}}, indent=2))
    else:
        console = Console()
        console.print(f"[bold]digest[/bold] {digest(c)}   [bold]fingerprint[/bold] {fingerprint(c)}   "
                      f"{c.byte_length} bytes, {c.statements} statement(s)")
        if c.effects:
            t = Table(title="session effects")
            for col in ("kind", "name", "value", "scope"):
                t.add_column(col)
            for e in c.effects:
                t.add_row(str(e.kind), str(e.name or ""), "" if e.value is None else str(e.value), str(e.scope))
            console.print(t)
        for m in shown:
            reasons = verdict[m]
            if reasons:
                console.print(f"[bold red]{m}: pins[/bold red]")
                for r in reasons:
                    console.print(f"  {r}: {describe(r)}")
            else:
                console.print(f"[bold green]{m}: no pin[/bold green]")
        if "smart" in shown and carries:
            console.print("  smart mode carries this state instead of pinning: " + ", ".join(carries) +
                          (" (the proxy listens on a connection of its own and delivers notifications between "
                           "transactions)" if "listen" in carries else "") +
                          (" (prepared statements are re-prepared, under the proxy's own names, on whichever "
                           "server connection the client gets)" if "sql_prepare" in carries else ""))
        elif "smart" in shown and not verdict["smart"] and any(e.kind is not Kind.PREPARED_VIEW for e in c.effects):
            # (a read of pg_prepared_statements changes nothing: smart mode answers it with the client's own)
            console.print("  smart mode carries this state to whichever server connection the client gets.")
    sys.exit(1 if any(verdict[m] for m in shown) else 0)


@main.command()
@click.argument("logfiles", nargs=-1, required=True, metavar="LOGFILE...")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "markdown"]), default="table", show_default=True,
              help="table (terminal), json (complete, full samples) or markdown.")
@click.option("--mode", type=click.Choice(["both", "rds", "smart"]), default="both", show_default=True,
              help="Which mode's pin causes to report (and to set the exit status).")
@click.option("--input", "input_format", type=click.Choice(["auto", "stderr", "csvlog", "jsonlog", "pgss"]),
              default="auto", show_default=True, help="Input format; auto detects it per file.")
@click.option("--log-line-prefix", "prefix", help="The server's log_line_prefix, for stderr logs (e.g. '%m [%p] ').")
@click.option("--top", type=click.IntRange(min=1), help="Groups shown per mode [table/markdown: 20; json: all].")
@click.option("--set-local-pins", is_flag=True, help="rds rules: treat SET LOCAL as pinning.")
@click.option("--sequences", type=click.Choice(["carry", "pin"]), default="carry", show_default=True,
              help="smart rules: pin on sequence functions too.")
@click.option("--sql-prepare", type=click.Choice(["carry", "pin"]), default="carry", show_default=True,
              help="smart rules: carry SQL PREPARE, or pin on it.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [when stderr is a terminal].")
def audit(logfiles, fmt, mode, input_format, prefix, top, set_local_pins, sequences, sql_prepare, progress) -> None:
    """Find pin causes in PostgreSQL logs or a pg_stat_statements export.

    LOGFILE: stderr log (log_statement = 'all', any log_line_prefix), csvlog, jsonlog,
    or a pg_stat_statements CSV export with query and calls columns; .gz is fine, '-' is stdin.

    Exit status: 0 nothing pins in the chosen mode(s), 1 something pins, 2 usage error.
    """

    if progress is None:
        progress = sys.stderr.isatty()
    try:
        result = run_audit(list(logfiles), input_format=None if input_format == "auto" else input_format,
                           prefix=prefix, progress=progress,
                           opts=PolicyOptions(set_local_pins=set_local_pins, sequences=sequences,
                                                              sql_prepare=sql_prepare))
    except AuditError as e:
        click.echo(f"unpinned audit: {e}", err=True)
        sys.exit(2)
    modes = ["rds", "smart"] if mode == "both" else [mode]
    report = result.report(modes, top=top if fmt == "json" else None)
    if fmt == "json":
        click.echo(render_json(report))
    elif fmt == "markdown":
        click.echo(render_markdown(report, top=top or 20), nl=False)
    else:
        render_table(report, top=top or 20)
    for w in report["warnings"]:
        if fmt != "table":
            click.echo(f"unpinned audit: warning: {w}", err=True)
    sys.exit(exit_status(report))


@main.command()
@click.option("--clients", default=200, show_default=True, help="Concurrent client connections.")
@click.option("--pool-size", default=10, show_default=True, help="Server connections they share.")
@click.option("--seconds", default=5.0, show_default=True, help="How long the workload runs.")
@click.option("--keep", is_flag=True, help="Keep the proxies and the live page running until Ctrl-C.")
def demo(clients, pool_size, seconds, keep) -> None:
    """Embedded PostgreSQL, an rds-mode and a smart-mode proxy, the seeds' cases side by side,
    then many clients over few server connections. Exits clean."""
    install_uvloop()
    sys.exit(run_demo(clients=clients, pool_size=pool_size, seconds=seconds, keep=keep))


if __name__ == "__main__":  # pragma: no cover
    main()
