"""Configuration: one TOML file (see unpinned.example.toml), command-line flags on top,
secrets from the environment. Every key has a default."""
from __future__ import annotations

import os
import re
import ssl
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit, parse_qs

from unpinned.hosts import Host, parse_host_list, split_hosts_url
from unpinned.wire.auth import UserSecret, parse_scram_verifier


class ConfigError(Exception):
    pass


SSLMODES = ("disable", "prefer", "require", "verify-ca", "verify-full")


@dataclass
class Upstream:
    host: str = "127.0.0.1"      # a directory means a unix socket
    port: int = 5432
    user: str = "postgres"
    password: str | None = None
    database: str = "postgres"
    # TLS to PostgreSQL, as libpq's sslmode: disable, prefer (TLS if the server offers it),
    # require (TLS, certificate not checked), verify-ca, verify-full (checked against sslrootcert).
    sslmode: str = "prefer"
    sslrootcert: str = ""            # CA file for verify-ca/verify-full; "" = the system's CAs
    # Every host (backend.topology.Host), in order: from a multi-host URL or [upstream] hosts.
    # host/port above stay the first one's, so one-host code reads them as before.
    hosts: list = field(default_factory=list)

    @classmethod
    def from_url(cls, url: str) -> "Upstream":
        shown = redact_url(url)   # error messages must never carry the password
        try:
            # libpq's multi-host form (h1:p1,h2:p2 or ?host=h1,h2): the rest is read from the first.
            hosts, url = split_hosts_url(url) if "://" in url else (None, url)
        except ValueError as e:
            raise ConfigError(f"{e}: {shown!r}") from None
        try:
            u = urlsplit(url)
            if u.scheme not in ("postgresql", "postgres"):
                raise ConfigError(f"upstream must be a postgresql:// URL, got {shown!r}")
            q = parse_qs(u.query)
            if "password" in q:
                raise ConfigError(f"put the upstream password in the URL's user part or in "
                                  f"UNPINNED_UPSTREAM_PASSWORD, not in the query: {shown!r}")
            host = unquote(u.hostname or "") or q.get("host", ["127.0.0.1"])[0]
            port = u.port or int(q.get("port", ["5432"])[0])
        except ValueError:
            raise ConfigError(f"bad host or port in upstream URL {shown!r}") from None
        if not 0 < port < 65536:
            raise ConfigError(f"bad port in upstream URL {shown!r}")
        up = cls(host=host, port=port,
                 user=unquote(u.username or "") or "postgres",
                 password=unquote(u.password) if u.password is not None else None,
                 database=unquote(u.path.lstrip("/")) or "postgres",
                 sslmode=q.get("sslmode", ["prefer"])[0], sslrootcert=q.get("sslrootcert", [""])[0])
        up.check()
        up.hosts = hosts or []
        return up

    def set_hosts(self, hosts: list) -> None:
        self.hosts = list(hosts)
        self.host, self.port = hosts[0].host, hosts[0].port

    @property
    def all_hosts(self) -> list:
        return self.hosts or [Host(self.host, self.port)]

    def check(self) -> None:
        if self.sslmode not in SSLMODES:
            raise ConfigError(f"upstream sslmode must be one of {', '.join(SSLMODES)}, not {self.sslmode!r}")
        if self.sslrootcert and not os.path.exists(self.sslrootcert):
            raise ConfigError(f"upstream sslrootcert not found: {self.sslrootcert}")

    def tls_context(self):
        """The client-side TLS context for server connections (after the server said 'S')."""
        if self.sslmode in ("verify-ca", "verify-full"):
            ctx = ssl.create_default_context(cafile=self.sslrootcert or None)
            ctx.check_hostname = self.sslmode == "verify-full"
        else:   # prefer / require: encrypted, certificate not checked (as libpq without a root cert)
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    @property
    def is_unix(self) -> bool:
        return self.host.startswith("/")

    def __repr__(self) -> str:  # never print the password
        return f"Upstream(host={self.host!r}, port={self.port}, user={self.user!r}, database={self.database!r})"


ENDPOINT_ROLES = ("read_write", "read_only")   # RDS Proxy's READ_WRITE and READ_ONLY


@dataclass
class Endpoint:
    """One address clients connect to, with its own pools: writer or readers."""
    name: str
    listen: str
    role: str = "read_write"


@dataclass
class Config:
    # [proxy]
    listen: str = "127.0.0.1:6432"
    reader_listen: str = ""              # HOST:PORT of a read-only endpoint (replicas); "" = none
    mode: str = "smart"                  # "smart" | "rds"
    auth: str = "scram"                  # "scram" | "md5" | "trust"
    users_file: str = ""
    max_client_connections: int = 10000
    client_idle_timeout: float = 1800.0  # seconds; 0 = never
    login_timeout: float = 60.0          # seconds a client may take to log in
    admin_database: str = "unpinned"
    http_listen: str = ""                # HOST:PORT for /metrics, /api/* and the live page; "" = off
    http_token: str = ""                 # required by /api/* and the live page (env UNPINNED_HTTP_TOKEN); "" = open
    http_metrics_auth: bool = False      # /metrics needs the token too
    http_sql_literals: bool = False      # /api/* show statements with their literals (else as $n)
    workers: int = 1                     # processes sharing the port (SO_REUSEPORT); 0 = one per CPU
    tls_cert_file: str = ""              # PEM certificate (chain) the proxy shows clients; "" = no TLS
    tls_key_file: str = ""               # its private key
    require_tls: bool = False            # refuse clients that do not use TLS
    fleet_size: int = 1                  # proxies sharing the server's connection budget (pool_size)
    shutdown_timeout: float = 30.0       # seconds SIGTERM waits for transactions in flight
    takeover_socket: str = ""            # unix socket a restarted proxy takes the clients over through
    # Bytes of one client message the proxy holds whole (1 MiB); a longer Query, Parse, Bind,
    # CopyData or FunctionCall is streamed to the server as it arrives, and a statement text
    # longer than this that the keyword pre-check cannot clear is pinned as unparsed.
    max_client_message_buffer: int = 1048576
    # [pins]
    pin_log: str = ""                    # JSON-lines pin log: "" none, "-" stderr, or a file path
    pin_log_max_sql: int = 0             # truncate logged SQL to this many characters; 0 = full text
    pin_log_redact: bool = False         # log statements with literals replaced by $n
    set_local_pins: bool = False         # rds mode: whether SET LOCAL pins (AWS does not document it)
    sequences: str = "carry"             # smart mode: "carry" (currval/lastval never on another client's values) or "pin" (as RDS)
    sql_prepare: str = "carry"           # smart mode: "carry" SQL PREPARE (relay/carried.py), or "pin" it
    verify: bool = False                 # check each server connection's state after every transaction
    # [pool]
    pool_size: int = 20                  # max server connections per (database, user)
    max_idle: int = 20                   # idle server connections kept per pool
    server_idle_timeout: float = 300.0   # close idle server connections after this long
    borrow_timeout: float = 120.0        # seconds a client waits for a server connection
    init_query: str = ""                 # run on every new server connection
    health_check_after: float = 30.0     # check an idle server connection idle this long before reuse
    max_prepared_statements: int = 1000  # per server connection (LRU beyond it)
    connect_timeout: float = 10.0
    # [upstream]
    upstream: Upstream = field(default_factory=Upstream)
    health_check_interval: float = 1.0   # seconds between checks of each host's health and role
    max_replica_lag: float = 30.0        # seconds; a replica further behind leaves the readers; 0 = no limit
    # [[endpoints]]
    endpoints: list[Endpoint] = field(default_factory=list)
    # [users] (inline) or users_file
    users: dict[str, UserSecret] = field(default_factory=dict)

    def validate(self) -> "Config":
        if self.mode not in ("smart", "rds"):
            raise ConfigError(f"mode must be 'smart' or 'rds', not {self.mode!r}")
        if self.sequences not in ("carry", "pin"):
            raise ConfigError(f"sequences must be 'carry' or 'pin', not {self.sequences!r}")
        if self.sql_prepare not in ("carry", "pin"):
            raise ConfigError(f"sql_prepare must be 'carry' or 'pin', not {self.sql_prepare!r}")
        if self.auth not in ("scram", "md5", "trust"):
            raise ConfigError(f"auth must be 'scram', 'md5' or 'trust', not {self.auth!r}")
        for name in ("pool_size", "max_client_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.workers < 0:
            raise ConfigError("workers must be 0 (one per CPU) or more")
        workers = self.workers or os.cpu_count() or 1
        if workers > self.pool_size:
            raise ConfigError(f"workers ({workers}) must not exceed pool_size ({self.pool_size}): "
                              "each worker holds a share of every pool")
        if self.fleet_size < 1:
            raise ConfigError("fleet_size must be at least 1")
        if workers * self.fleet_size > self.pool_size:
            raise ConfigError(f"pool_size ({self.pool_size}) is the fleet's budget: it must be at least "
                              f"fleet_size ({self.fleet_size}) x workers ({workers}), one connection each")
        if self.shutdown_timeout < 0:
            raise ConfigError("shutdown_timeout must not be negative")
        if self.takeover_socket and workers > 1:
            raise ConfigError("takeover_socket (serve --takeover) works with one process: set workers = 1")
        self.upstream.check()
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("tls_cert_file and tls_key_file go together: give both or neither")
        if self.require_tls and not self.tls_cert_file:
            raise ConfigError("require_tls needs tls_cert_file and tls_key_file")
        if self.tls_cert_file:
            self.tls_context()      # a missing or bad file fails here, at start, not at a client's login
        if self.login_timeout <= 0:
            raise ConfigError("login_timeout must be more than 0")
        if self.max_client_message_buffer < 16389:
            raise ConfigError("max_client_message_buffer must be at least 16389 (a 16 KB statement is always held whole)")
        for name in ("max_idle", "server_idle_timeout", "borrow_timeout", "client_idle_timeout",
                     "health_check_after", "connect_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        self.listen_address()
        if self.health_check_interval <= 0:
            raise ConfigError("health_check_interval must be more than 0")
        if self.max_replica_lag < 0:
            raise ConfigError("max_replica_lag must not be negative (0 = no limit)")
        self.all_endpoints()
        if self.http_listen:
            parse_hostport(self.http_listen, "http_listen")
        if self.http_metrics_auth and not self.http_token:
            raise ConfigError("http_metrics_auth needs http_token (or UNPINNED_HTTP_TOKEN)")
        if self.auth != "trust" and not self.users:
            raise ConfigError("auth is not 'trust' but no users are configured: give --users FILE or [users] entries")
        return self

    def tls_context(self):
        """The server-side TLS context for clients, or None without a certificate."""
        if not self.tls_cert_file:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        except FileNotFoundError as e:
            raise ConfigError(f"TLS certificate or key file not found: {e.filename}") from None
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"cannot use TLS certificate {self.tls_cert_file} with key {self.tls_key_file}: {e}") from None
        return ctx

    def listen_address(self) -> tuple[str, int]:
        return parse_hostport(self.listen, "listen")

    def all_endpoints(self) -> list[Endpoint]:
        """`listen` (read/write, named "default"), `reader_listen` (read-only, "reader"), then [[endpoints]]."""
        eps = [Endpoint("default", self.listen, "read_write")]
        if self.reader_listen:
            eps.append(Endpoint("reader", self.reader_listen, "read_only"))
        eps += self.endpoints
        names: set[str] = set()
        addresses: dict[tuple[str, int], str] = {}
        for ep in eps:
            if ep.role not in ENDPOINT_ROLES:
                raise ConfigError(f"endpoint {ep.name!r}: role must be 'read_write' or 'read_only', not {ep.role!r}")
            if ep.name in names:
                raise ConfigError(f"endpoint name {ep.name!r} is used twice")
            names.add(ep.name)
            addr = parse_hostport(ep.listen, f"endpoint {ep.name!r} listen")
            if addr in addresses:
                raise ConfigError(f"endpoints {addresses[addr]!r} and {ep.name!r} both listen on {ep.listen}")
            addresses[addr] = ep.name
        return eps

    def secret_for(self, user: str) -> UserSecret | None:
        s = self.users.get(user)
        if s is None and self.auth == "trust" and user == self.upstream.user:
            s = UserSecret(name=user, password=self.upstream.password)
        return s

    def server_credentials(self, user: str) -> tuple[str, str | None]:
        s = self.secret_for(user)
        if s is None:
            return user, None
        password = s.server_password if s.server_password is not None else s.password
        server_user = s.server_user or user
        if password is None and server_user == self.upstream.user:
            password = self.upstream.password
        return server_user, password


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    try:
        u = urlsplit(url)
        netloc = u.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{hostport}" if ":" in userinfo else f"{user}@{hostport}"
        query = "&".join("password=***" if part.startswith("password=") else part for part in u.query.split("&"))
        url = u._replace(netloc=netloc, query=query).geturl()
    except ValueError:
        pass
    # Whatever the parser made of it (no scheme, say): no "user:secret@" survives.
    # (?!//): the scheme's "postgresql://" is not a "user:password@".
    return re.sub(r"(^|[/@])([^:/@]*):(?!//)[^@]*@", r"\1\2:***@", url)


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{what} must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


_SECTIONS = {
    "proxy": ("listen", "reader_listen", "mode", "auth", "users_file", "max_client_connections", "client_idle_timeout", "login_timeout",
              "admin_database", "http_listen", "http_token", "http_metrics_auth", "http_sql_literals", "workers",
              "tls_cert_file", "tls_key_file", "require_tls", "fleet_size", "shutdown_timeout", "takeover_socket",
              "max_client_message_buffer"),
    "pins": ("pin_log", "pin_log_max_sql", "pin_log_redact", "set_local_pins", "sequences", "sql_prepare", "verify"),
    "pool": ("pool_size", "max_idle", "server_idle_timeout", "borrow_timeout", "init_query",
             "health_check_after", "max_prepared_statements", "connect_timeout"),
}


def load(path: str | None = None, **overrides) -> Config:
    """Read the TOML file (if any), apply non-None overrides (command-line flags), read users."""
    cfg = Config()
    raw: dict = {}
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
    known = {f.name: f for f in fields(Config)}
    for section, keys in _SECTIONS.items():
        values = raw.get(section, {})
        for key, value in values.items():
            if key not in keys:
                raise ConfigError(f"unknown key [{section}] {key}")
            _set(cfg, known[key].type, key, value)
    for section in raw:
        if section not in (*_SECTIONS, "upstream", "users", "endpoints"):
            raise ConfigError(f"unknown section [{section}]")
    up = raw.get("upstream", {})
    unknown = set(up) - {"url", "host", "port", "user", "password", "database", "sslmode", "sslrootcert",
                         "hosts", *_UPSTREAM_KEYS}
    if unknown:
        raise ConfigError(f"unknown key [upstream] {', '.join(sorted(unknown))}")
    if "url" in up:
        cfg.upstream = Upstream.from_url(up["url"])
    for key in _UPSTREAM_KEYS:
        if key in up:
            _set(cfg, known[key].type, key, up[key])
    if "hosts" in up:
        if len(cfg.upstream.hosts) > 1 or "host" in up or "port" in up:
            raise ConfigError("[upstream] hosts replaces host, port and the hosts of url: give only one of them")
        try:
            cfg.upstream.set_hosts(parse_host_list(up["hosts"]))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    cfg.endpoints = _endpoints(raw.get("endpoints", []))
    for key in ("host", "user", "password", "database", "sslmode", "sslrootcert"):
        if key in up:
            if not isinstance(up[key], str):
                shown = "" if key == "password" else f", got {up[key]!r}"
                raise ConfigError(f"[upstream] {key} must be a string{shown}")
            setattr(cfg.upstream, key, up[key])
    if "port" in up:
        port = up["port"]
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"[upstream] port must be a number from 1 to 65535, got {port!r}")
        cfg.upstream.port = port
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "upstream":
            cfg.upstream = Upstream.from_url(value)
        elif key in known:
            _set(cfg, known[key].type, key, value)
        else:
            raise ConfigError(f"unknown option {key}")
    if os.environ.get("UNPINNED_HTTP_TOKEN"):
        cfg.http_token = os.environ["UNPINNED_HTTP_TOKEN"]
    if os.environ.get("UNPINNED_UPSTREAM_PASSWORD"):
        cfg.upstream.password = os.environ["UNPINNED_UPSTREAM_PASSWORD"]
    cfg.users = {}
    if cfg.users_file:
        try:
            users_raw = tomllib.loads(Path(cfg.users_file).read_text())
        except FileNotFoundError:
            raise ConfigError(f"users file not found: {cfg.users_file}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{cfg.users_file}: {e}") from None
        cfg.users.update(_users(users_raw.get("users", users_raw)))
    cfg.users.update(_users(raw.get("users", {})))
    return cfg.validate()


_UPSTREAM_KEYS = ("health_check_interval", "max_replica_lag")   # Config fields read from [upstream]


def _endpoints(raw) -> list[Endpoint]:
    if not isinstance(raw, list):
        raise ConfigError("endpoints must be [[endpoints]] tables")
    out = []
    for i, e in enumerate(raw):
        if not isinstance(e, dict):
            raise ConfigError("endpoints must be [[endpoints]] tables")
        unknown = set(e) - {"name", "listen", "role"}
        if unknown:
            raise ConfigError(f"unknown key [[endpoints]] {', '.join(sorted(unknown))}")
        if not all(isinstance(e.get(k), str) for k in ("name", "listen")):
            raise ConfigError(f"[[endpoints]] number {i + 1} needs name and listen (strings)")
        role = e.get("role", "read_write")
        out.append(Endpoint(e["name"], e["listen"], role.lower() if isinstance(role, str) else role))
    return out


def _set(cfg: Config, typ, key: str, value) -> None:
    typ = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if typ in ("int", "float") and isinstance(value, bool):
            raise TypeError(value)   # TOML true is not a count
        if typ == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            value = int(value)
        elif typ == "float":
            value = float(value)
        elif typ == "str":
            value = str(value)
        elif typ == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "on", "off", "yes", "no"):
                    raise ValueError(value)
                value = value.lower() in ("true", "1", "on", "yes")
            elif not isinstance(value, bool):
                raise TypeError(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a {typ}, got {value!r}") from None
    setattr(cfg, key, value)


def _users(raw: dict) -> dict[str, UserSecret]:
    out = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"users.{name} must be a table")
        unknown = set(entry) - {"password", "scram_verifier", "md5", "server_user", "server_password", "admin"}
        if unknown:
            raise ConfigError(f"unknown keys for users.{name}: {', '.join(sorted(unknown))}")
        env = os.environ.get("UNPINNED_PASSWORD_" + name.upper().replace("-", "_"))
        secret = UserSecret(name=name, password=env or entry.get("password"),
                            scram_verifier=entry.get("scram_verifier"), md5_hash=entry.get("md5"),
                            server_user=entry.get("server_user"), server_password=entry.get("server_password"),
                            admin=bool(entry.get("admin", False)))
        if secret.scram_verifier:
            try:
                parse_scram_verifier(secret.scram_verifier)
            except ValueError as e:
                raise ConfigError(f"users.{name}.scram_verifier: {e}") from None
        if secret.password is None and not secret.scram_verifier and not secret.md5_hash:
            raise ConfigError(f"users.{name} needs a password, scram_verifier or md5")
        out[name] = secret
    return out


# ------------------------------------------------------------------ several processes (ops/workers.py)

@dataclass(frozen=True)
class WorkerInfo:
    index: int
    count: int
    supervisor: int          # pid of the supervisor: names the peer sockets of this run
    # Connected clients per worker, in memory shared by all of them (each writes its own
    # slot), so max_client_connections holds for the whole proxy however the kernel spreads
    # clients over the workers.
    clients: object = field(default=None, compare=False)

    def address(self, index: int) -> str:
        return f"\0unpinned-{self.supervisor}-worker-{index}"

    def total_clients(self) -> int:
        return sum(self.clients) if self.clients is not None else 0


def effective_workers(cfg: Config) -> int:
    return cfg.workers or os.cpu_count() or 1


def share(cfg: Config, info: WorkerInfo) -> Config:
    """This worker's part of the pool limits (totals across workers). max_client_connections
    is checked against the count of all workers' clients (WorkerInfo.clients) instead."""
    def part(total: int) -> int:
        return total // info.count + (1 if info.index < total % info.count else 0)
    return replace(cfg, pool_size=max(1, part(cfg.pool_size)), max_idle=part(cfg.max_idle))


def fleet_share(cfg: Config) -> Config:
    """One proxy's part of the fleet's budget: `pool_size` (and `max_idle`) are what all
    `fleet_size` proxies open together, as RDS Proxy's MaxConnectionsPercent is a share of
    max_connections; rounded down, so the fleet never opens more than the budget."""
    if cfg.fleet_size <= 1:
        return cfg
    return replace(cfg, pool_size=max(1, cfg.pool_size // cfg.fleet_size), max_idle=cfg.max_idle // cfg.fleet_size)


def per_process(cfg: Config, info: WorkerInfo | None) -> Config:
    """What one serving process may open: its proxy's part of the fleet, then its worker's part."""
    cfg = fleet_share(cfg)
    return share(cfg, info) if info is not None else cfg
