"""Upstream hosts as the user writes them: libpq's multi-host URL (`h1:5432,h2,[::1]:5433`,
`?host=a,b&port=x,y`) or a list. Pure parsing, below the configuration."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import parse_qsl, quote, unquote, urlencode

DEFAULT_PORT = 5432


@dataclass(frozen=True, order=True)
class Host:
    host: str                # a name, an IP address (IPv6 without brackets) or a unix socket directory
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_unix(self) -> bool:
        return self.host.startswith("/")


# -- LSNs ---------------------------------------------------------------------

def _port(text: str, where: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port {text!r} in {where}")
    return int(text)


def _host_name(text: str, where: str) -> str:
    if text.startswith("["):
        if not text.endswith("]"):
            raise ValueError(f"unclosed '[' in {where}")
        inner = text[1:-1]
        try:
            ipaddress.IPv6Address(inner.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"bad IPv6 address {inner!r} in {where}") from None
        return inner.lower()
    if not text:
        raise ValueError(f"empty host in {where}")
    if any(c in text for c in "[]@/ ") and not text.startswith("/"):
        raise ValueError(f"bad host {text!r} in {where}")
    # Unix socket directories are case-sensitive paths; DNS names are not.
    return text if text.startswith("/") else text.lower()


def parse_host(text: str, default_port: int = DEFAULT_PORT, where: str = "host") -> Host:
    """One `host`, `host:port`, `[v6]`, `[v6]:port`, bare IPv6 (`::1`, default port) or
    unix socket directory. Use brackets to give an IPv6 address a port."""
    text = text.strip()
    if text.startswith("/"):
        return Host(text, default_port)
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"unclosed '[' in {where}")
        rest = text[close + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after ']' in {where}")
        return Host(_host_name(text[:close + 1], where), _port(rest[1:], where) if rest else default_port)
    if text.count(":") > 1:   # a bare IPv6 address: its colons are not a port separator
        return Host(_host_name(f"[{text}]", where), default_port)
    name, sep, port = text.partition(":")
    return Host(_host_name(name, where), _port(port, where) if sep else default_port)


def parse_host_list(entries: Iterable[object], where: str = "[upstream] hosts") -> list[Host]:
    """`[upstream] hosts = ["h1:5432", "[::1]:5433", {host = "h3", port = 5434}]`."""
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Iterable):
        raise ValueError(f"{where} must be a list of \"host:port\" strings")
    hosts: list[Host] = []
    for e in entries:
        if isinstance(e, str):
            hosts.append(parse_host(e, where=where))
        elif isinstance(e, dict) and set(e) <= {"host", "port"} and isinstance(e.get("host"), str):
            port = e.get("port", DEFAULT_PORT)
            if isinstance(port, bool) or not isinstance(port, int):
                raise ValueError(f"bad port {port!r} in {where}")
            hosts.append(Host(_host_name(e["host"], where), _port(str(port), where)))
        else:
            raise ValueError(f"{where}: each entry is \"host:port\" or {{host = ..., port = ...}}, not {e!r}")
    return unique_hosts(hosts, where)


def unique_hosts(hosts: list[Host], where: str) -> list[Host]:
    if not hosts:
        raise ValueError(f"no hosts in {where}")
    seen: set[Host] = set()
    for h in hosts:
        if h in seen:
            raise ValueError(f"host {h} is listed twice in {where}")
        seen.add(h)
    return hosts


def split_hosts_url(url: str) -> tuple[list[Host], str]:
    """libpq's multi-host URL: `postgresql://u:p@h1:5432,h2:5433,[::1]/db?...`, or the hosts
    in the query (`?host=h1,h2&port=5432,5433`, one port for all or one per host).

    Returns every host in order and the same URL with only the first host, for the code
    that reads user, password, database and TLS settings from a one-host URL. A host
    without a port gets the query's single `port` or 5432. Error texts never carry the
    password (only the host part is quoted).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("not a postgresql:// URL")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hostlist = netloc.rpartition("@")
    path, qmark, query = tail.partition("?")
    query, hash_, fragment = query.partition("#")
    params = parse_qsl(query, keep_blank_values=True)
    q = dict(params)
    where = "the upstream URL's hosts"
    qports = [p.strip() for p in q["port"].split(",")] if q.get("port") else []
    default_port = _port(qports[0], "the upstream URL's port") if len(qports) == 1 else DEFAULT_PORT
    if hostlist:
        hosts = [_url_host(h, default_port, where) for h in hostlist.split(",")]
        if len(qports) > 1:
            raise ValueError("give ports in the URL's host list or in ?port=, not a list in both")
    elif q.get("host"):
        names = [h.strip() for h in q["host"].split(",")]
        if len(qports) > 1 and len(qports) != len(names):
            raise ValueError(f"?port= has {len(qports)} ports for {len(names)} hosts")
        ports = [_port(p, "the upstream URL's port") for p in qports] if len(qports) > 1 else [default_port] * len(names)
        hosts = [parse_host(n, p, where) for n, p in zip(names, ports)]
    else:
        hosts = [Host("127.0.0.1", default_port)]
    hosts = unique_hosts(hosts, where)
    first = hosts[0]
    shown = quote(first.host, safe="") if first.is_unix else (f"[{first.host.replace('%', '%25')}]" if ":" in first.host else first.host)
    kept = [(k, v) for k, v in params if k not in ("host", "port")]
    one = f"{scheme}://{userinfo}{at}{shown}:{first.port}{path}"
    if kept:
        one += "?" + urlencode(kept)
    if hash_:
        one += "#" + fragment
    return hosts, one


def _url_host(text: str, default_port: int, where: str) -> Host:
    if not text:
        raise ValueError(f"empty host in {where}")
    if text.startswith("["):
        return parse_host(unquote(text), default_port, where)
    name, sep, port = text.partition(":")
    if not name:           # libpq's ":5433" means the default host on that port
        return Host("127.0.0.1", _port(port, where) if sep else default_port)
    return Host(_host_name(unquote(name), where), _port(port, where) if sep else default_port)


# -- what a check found, and each host's state ------------------------------------------
