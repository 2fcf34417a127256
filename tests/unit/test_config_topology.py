"""Configuration of several upstream hosts and endpoints (issue 11), without PostgreSQL."""
from __future__ import annotations

from pathlib import Path

import pytest

from unpinned.backend.topology import Host
from unpinned.config import ConfigError, Endpoint, load


def toml(tmp_path: Path, text: str) -> str:
    p = tmp_path / "unpinned.toml"
    p.write_text(text)
    return str(p)


def test_one_host_url_works_as_before() -> None:
    cfg = load(None, auth="trust", upstream="postgresql://app:pw@db.example.com:5433/appdb?sslmode=disable")
    up = cfg.upstream
    assert (up.host, up.port, up.user, up.password, up.database, up.sslmode) == \
        ("db.example.com", 5433, "app", "pw", "appdb", "disable")
    assert up.all_hosts == [Host("db.example.com", 5433)]
    assert load(None, auth="trust").upstream.all_hosts == [Host("127.0.0.1", 5432)]


def test_multi_host_url() -> None:
    cfg = load(None, auth="trust", upstream="postgresql://app:p%40w@h1:5432,h2:5433,[::1]/appdb")
    up = cfg.upstream
    assert up.all_hosts == [Host("h1", 5432), Host("h2", 5433), Host("::1", 5432)]
    # The first host stands for the upstream in the one-host code.
    assert (up.host, up.port, up.user, up.password, up.database) == ("h1", 5432, "app", "p@w", "appdb")


def test_bad_multi_host_url_is_a_config_error_without_the_password() -> None:
    with pytest.raises(ConfigError, match="listed twice") as e:
        load(None, auth="trust", upstream="postgresql://app:topsecret@h1,h1/db")
    assert "topsecret" not in str(e.value) and "app:***@h1,h1" in str(e.value)
    with pytest.raises(ConfigError, match="bad port"):
        load(None, auth="trust", upstream="postgresql://app:topsecret@h1:99999/db")
    with pytest.raises(ConfigError, match="postgresql:// URL"):
        load(None, auth="trust", upstream="h1:5432")


@pytest.mark.parametrize("url, shown", [
    ("postgresql://app:pw@h/db", "postgresql://app:***@h/db"),
    ("postgresql://app@h/db", "postgresql://app@h/db"),
    ("postgresql://app:pa/ss@h/db", "postgresql://app:***@h/db"),
    ("postgresql://app:pw@h1:5432,h2:5433/db?sslmode=require", "postgresql://app:***@h1:5432,h2:5433/db?sslmode=require"),
])
def test_redacted_url_keeps_user_and_hosts(url: str, shown: str) -> None:
    from unpinned.config import redact_url
    assert redact_url(url) == shown


def test_hosts_list_and_health_keys(tmp_path: Path) -> None:
    cfg = load(toml(tmp_path, """
[proxy]
auth = "trust"
reader_listen = "127.0.0.1:6433"
[upstream]
url = "postgresql://app@db/appdb"
hosts = ["w.internal:5432", "r1.internal:5433", {host = "r2.internal", port = 5434}]
health_check_interval = 0.5
max_replica_lag = 5
"""))
    assert cfg.upstream.all_hosts == [Host("w.internal", 5432), Host("r1.internal", 5433), Host("r2.internal", 5434)]
    assert (cfg.upstream.host, cfg.upstream.port, cfg.upstream.database) == ("w.internal", 5432, "appdb")
    assert cfg.health_check_interval == 0.5 and cfg.max_replica_lag == 5.0
    assert [(e.name, e.listen, e.role) for e in cfg.all_endpoints()] == [
        ("default", "127.0.0.1:6432", "read_write"), ("reader", "127.0.0.1:6433", "read_only")]


def test_defaults() -> None:
    cfg = load(None, auth="trust")
    assert cfg.health_check_interval == 1.0 and cfg.max_replica_lag == 30.0
    assert cfg.reader_listen == "" and cfg.endpoints == []
    assert cfg.all_endpoints() == [Endpoint("default", "127.0.0.1:6432", "read_write")]


def test_reader_listen_flag_overrides_the_file(tmp_path: Path) -> None:
    path = toml(tmp_path, '[proxy]\nauth = "trust"\nreader_listen = "127.0.0.1:7000"\n')
    assert load(path, reader_listen="127.0.0.1:7001").reader_listen == "127.0.0.1:7001"


def test_endpoints_tables(tmp_path: Path) -> None:
    cfg = load(toml(tmp_path, """
[proxy]
auth = "trust"
[[endpoints]]
name = "reporting"
listen = "127.0.0.1:6440"
role = "READ_ONLY"
[[endpoints]]
name = "batch"
listen = "127.0.0.1:6441"
"""))
    assert cfg.endpoints == [Endpoint("reporting", "127.0.0.1:6440", "read_only"),
                             Endpoint("batch", "127.0.0.1:6441", "read_write")]
    assert [e.name for e in cfg.all_endpoints()] == ["default", "reporting", "batch"]


@pytest.mark.parametrize("text, message", [
    ('[upstream]\nhosts = ["a", "a:5432"]', "listed twice"),
    ('[upstream]\nhosts = []', "no hosts"),
    ('[upstream]\nhosts = "a,b"', "must be a list"),
    ('[upstream]\nurl = "postgresql://u@a,b/db"\nhosts = ["c"]', "give only one"),
    ('[upstream]\nhost = "a"\nhosts = ["c"]', "give only one"),
    ('[upstream]\nhealth_check_interval = 0', "health_check_interval must be more than 0"),
    ('[upstream]\nhealth_check_interval = "often"', "health_check_interval must be a float"),
    ('[upstream]\nmax_replica_lag = -1', "max_replica_lag must not be negative"),
    ('[upstream]\nmax_lag = 1', r"unknown key \[upstream\] max_lag"),
    ('[proxy]\nreader_listen = "nowhere"', "endpoint 'reader' listen must be HOST:PORT, got 'nowhere'"),
    ('[proxy]\nreader_listen = "127.0.0.1:6432"', "both listen on 127.0.0.1:6432"),
    ('[[endpoints]]\nname = "x"\nlisten = "127.0.0.1:7"\nrole = "writer"', "role must be 'read_write' or 'read_only'"),
    ('[[endpoints]]\nname = "default"\nlisten = "127.0.0.1:7"', "name 'default' is used twice"),
    ('[[endpoints]]\nname = "x"', "needs name and listen"),
    ('[[endpoints]]\nname = "x"\nlisten = "127.0.0.1:7"\nport = 7', r"unknown key \[\[endpoints\]\] port"),
    ('[endpoints]\nname = "x"', "endpoints must be"),
])
def test_config_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(toml(tmp_path, '[proxy]\nauth = "trust"\n' + text if not text.startswith("[proxy]")
                  else text.replace("[proxy]\n", '[proxy]\nauth = "trust"\n', 1)))
