"""The HAProxy test support (tests/support/haproxy.py) does what fleet tests rely on: it spreads
connections over its backends, keeps new ones away from a backend whose /ready fails or that
is gone, and takes it back once ready; and it carries PostgreSQL clients to real proxies."""
from __future__ import annotations

import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import psycopg
import pytest

from support.haproxy import HAProxy


class Backend:
    """A TCP server that greets each connection with its name and echoes what it gets, plus an
    HTTP /ready whose answer the test sets: a stand-in for a proxy and its HTTP listener."""

    def __init__(self, name: str):
        self.name = name
        self.ready = True
        backend = self

        class Echo(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.sendall(backend.name.encode() + b"\n")
                while data := self.request.recv(4096):
                    self.request.sendall(data)

        class Ready(BaseHTTPRequestHandler):
            def do_GET(self):
                ok = self.path == "/ready" and backend.ready
                self.send_response(200 if ok else 503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.tcp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
        self.tcp.daemon_threads = True
        self.http = HTTPServer(("127.0.0.1", 0), Ready)
        self.port = self.tcp.server_address[1]
        self.http_port = self.http.server_address[1]
        for server in (self.tcp, self.http):
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        for server in (self.tcp, self.http):
            server.shutdown()
            server.server_close()


@pytest.fixture
def backends():
    started = [Backend("a"), Backend("b")]
    yield started
    for b in started:
        b.stop()


def who_answers(lb: HAProxy, n: int) -> list[str]:
    """Open n connections through the balancer, one after the other; which backend got each."""
    names = []
    for i in range(n):
        with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as s:
            f = s.makefile("rb")
            names.append(f.readline().decode().strip())
            s.sendall(f"ping {i}\n".encode())
            assert f.readline() == f"ping {i}\n".encode(), "bytes pass through both ways"
    return names


def test_connections_are_spread_over_all_backends(backends):
    with HAProxy([b.port for b in backends]) as lb:      # plain TCP checks
        names = who_answers(lb, 10)
        assert names.count("a") == 5 and names.count("b") == 5, names
        assert lb.sessions() == {"p0": 5, "p1": 5}


def test_a_backend_that_is_not_ready_gets_no_new_connections_until_it_is(backends):
    a, b = backends
    with HAProxy([a.port, b.port], ready_ports=[a.http_port, b.http_port]) as lb:
        assert set(who_answers(lb, 4)) == {"a", "b"}
        b.ready = False                                  # b drains: /ready answers 503
        lb.wait_states({"p0": "UP", "p1": "DOWN"})
        assert who_answers(lb, 6) == ["a"] * 6
        b.ready = True
        lb.wait_states({"p0": "UP", "p1": "UP"})
        assert set(who_answers(lb, 4)) == {"a", "b"}


def test_a_backend_that_is_gone_is_skipped(backends):
    a, b = backends
    with HAProxy([a.port, b.port]) as lb:
        a.stop()
        backends.remove(a)
        lb.wait_states({"p0": "DOWN", "p1": "UP"})
        assert who_answers(lb, 4) == ["b"] * 4


def test_postgresql_clients_reach_two_unpinned_proxies_through_haproxy(make_proxy):
    proxies = [make_proxy(pool_size=4), make_proxy(pool_size=4)]
    with HAProxy([p.port for p in proxies]) as lb:
        dsn = proxies[0].dsn().replace(f":{proxies[0].port}/", f":{lb.port}/")
        conns = [psycopg.connect(dsn, autocommit=True) for _ in range(6)]
        try:
            for i, conn in enumerate(conns):
                assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
            # Each proxy has exactly its half of the clients (round robin), logged in and served.
            assert [p.call(lambda p=p: len(p.proxy.clients)) for p in proxies] == [3, 3]
        finally:
            for conn in conns:
                conn.close()
