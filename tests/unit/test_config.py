"""Pure tests of unpinned.config: TOML loading, validation, upstream URLs, secrets."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from unpinned.wire.auth import UserSecret
from unpinned.config import Config, ConfigError, Upstream, load

REPO = Path(__file__).resolve().parents[2]

FULL = """
[proxy]
listen = "0.0.0.0:7432"
mode = "rds"
auth = "md5"
max_client_connections = 500
client_idle_timeout = 60
admin_database = "pgadmin"

[pool]
pool_size = 7
max_idle = 3
server_idle_timeout = 12.5
borrow_timeout = 4
init_query = "SET application_name = 'pool'"
health_check_after = 0
max_prepared_statements = 50
connect_timeout = 2

[upstream]
url = "postgresql://owner:from-url@db.example.com:5433/appdb"
password = "from-upstream-table"

[users.app]
password = "app-pw"
admin = true

[users.reporter]
scram_verifier = "SCRAM-SHA-256$4096:c2FsdHNhbHQ=$c3RvcmVkc3RvcmVkc3RvcmVkc3RvcmVkc3RvcmVkMTI=:c2VydmVyc2VydmVyc2VydmVyc2VydmVyc2VydmVyMTI="
server_user = "report_ro"
server_password = "ro-pw"

[users.old]
md5 = "md5aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
server_password = "old-pw"
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ("UNPINNED_UPSTREAM_PASSWORD", "UNPINNED_PASSWORD_APP", "UNPINNED_PASSWORD_READ_ONLY",
              "UNPINNED_PASSWORD_REPORTER"):
        monkeypatch.delenv(k, raising=False)


def write(tmp_path: Path, text: str, name: str = "unpinned.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


USERS = '[users.app]\npassword = "app-pw"\n'


# ---------------------------------------------------------------- loading

def test_load_full_file(tmp_path):
    cfg = load(write(tmp_path, FULL))
    assert cfg.listen == "0.0.0.0:7432" and cfg.listen_address() == ("0.0.0.0", 7432)
    assert (cfg.mode, cfg.auth, cfg.max_client_connections, cfg.client_idle_timeout, cfg.admin_database) == \
        ("rds", "md5", 500, 60.0, "pgadmin")
    assert (cfg.pool_size, cfg.max_idle, cfg.server_idle_timeout, cfg.borrow_timeout, cfg.init_query,
            cfg.health_check_after, cfg.max_prepared_statements, cfg.connect_timeout) == \
        (7, 3, 12.5, 4.0, "SET application_name = 'pool'", 0.0, 50, 2.0)
    assert isinstance(cfg.pool_size, int) and isinstance(cfg.borrow_timeout, float)
    up = cfg.upstream
    assert (up.host, up.port, up.user, up.database) == ("db.example.com", 5433, "owner", "appdb")
    assert up.password == "from-upstream-table"          # explicit key beats the URL's
    assert set(cfg.users) == {"app", "reporter", "old"}
    assert cfg.users["app"].password == "app-pw" and cfg.users["app"].admin
    assert cfg.server_credentials("app") == ("app", "app-pw")
    assert cfg.server_credentials("reporter") == ("report_ro", "ro-pw")
    assert cfg.server_credentials("old") == ("old", "old-pw")
    assert cfg.secret_for("nobody") is None


def test_defaults_without_file_need_users_unless_trust():
    cfg = load(None, auth="trust")
    assert cfg == dataclasses.replace(Config(), auth="trust")
    with pytest.raises(ConfigError, match="no users are configured"):
        load(None)
    with pytest.raises(ConfigError, match="no users are configured"):
        load(None, auth="md5")


def test_users_file_and_inline_users(tmp_path):
    users = write(tmp_path, '[users.fileuser]\npassword = "f"\n', "users.toml")
    cfg = load(write(tmp_path, f'[proxy]\nusers_file = "{users}"\n\n[users.inline]\npassword = "i"\n'))
    assert set(cfg.users) == {"fileuser", "inline"}
    # A users file may also list users at top level.
    bare = write(tmp_path, '[bob]\npassword = "b"\n', "bare.toml")
    assert set(load(None, users_file=bare).users) == {"bob"}


def test_overrides_beat_file_and_none_is_ignored(tmp_path):
    cfg = load(write(tmp_path, FULL), pool_size=3, mode=None, listen="127.0.0.1:0",
               upstream="postgresql://x@h:1/d")
    assert cfg.pool_size == 3 and cfg.mode == "rds" and cfg.listen_address() == ("127.0.0.1", 0)
    assert (cfg.upstream.host, cfg.upstream.port, cfg.upstream.user, cfg.upstream.password) == ("h", 1, "x", None)
    # Command-line flags arrive as strings.
    assert load(None, auth="trust", pool_size="12", borrow_timeout="1.5").pool_size == 12


def test_trust_mode_knows_the_upstream_user():
    cfg = load(None, auth="trust", upstream="postgresql://boss:bosspw@h/d")
    s = cfg.secret_for("boss")
    assert s is not None and cfg.server_credentials("boss") == ("boss", "bosspw")
    assert cfg.secret_for("stranger") is None
    assert cfg.server_credentials("stranger") == ("stranger", None)


def test_example_file_documents_every_key_with_its_default(tmp_path):
    example = REPO / "unpinned.example.toml"
    if not example.exists():
        pytest.skip("no example file yet")
    text = example.read_text()
    cfg = load(str(example), users_file=write(tmp_path, USERS, "users.toml"))
    defaults = Config()
    for f in dataclasses.fields(Config):
        if f.name in ("upstream", "users", "users_file"):
            continue
        assert f"{f.name} =" in text, f"{f.name} missing from the example file"
        assert getattr(cfg, f.name) == getattr(defaults, f.name), f"example value of {f.name} is not the default"


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("text, message", [
    ('[proxy]\nmode = "turbo"\n' + USERS, "mode must be 'smart' or 'rds', not 'turbo'"),
    ('[proxy]\nauth = "password"\n' + USERS, "auth must be 'scram', 'md5' or 'trust'"),
    ('[proxy]\nlisten = "6432"\n' + USERS, "listen must be HOST:PORT"),
    ('[proxy]\nmax_conections = 5\n' + USERS, "unknown key [proxy] max_conections"),
    ('[pool]\npool_size = 5\nbogus = 1\n' + USERS, "unknown key [pool] bogus"),
    ('[pool]\nlisten = "127.0.0.1:1"\n' + USERS, "unknown key [pool] listen"),   # right key, wrong section
    ('[pooling]\npool_size = 5\n' + USERS, "unknown section [pooling]"),
    ('[pool]\npool_size = "many"\n' + USERS, "pool_size must be"),
    ('[pool]\nborrow_timeout = "soon"\n' + USERS, "borrow_timeout must be a float"),
    ('[pool]\npool_size = [1, 2]\n' + USERS, "pool_size must be a"),
    ('[pool]\npool_size = 0\n' + USERS, "pool_size must be at least 1"),
    ('[pool]\nborrow_timeout = -1\n' + USERS, "borrow_timeout must not be negative"),
    ('[proxy]\nauth = "scram"\n', "no users are configured"),
    ('[users]\napp = "pw"\n', "users.app must be a table"),
    ('[users.app]\npasword = "pw"\n', "unknown keys for users.app: pasword"),
    ('[users.app]\nadmin = true\n', "users.app needs a password, scram_verifier or md5"),
    ('[users.app]\nscram_verifier = "md5abc"\n', "users.app.scram_verifier"),
    ('[proxy\nmode = "rds"\n', "unpinned.toml"),                                # TOML syntax error names the file
])
def test_config_errors(tmp_path, text, message):
    with pytest.raises(ConfigError) as ei:
        load(write(tmp_path, text))
    assert message in str(ei.value)


def test_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load(str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="users file not found"):
        load(None, users_file=str(tmp_path / "nope-users.toml"))


def test_unknown_override():
    with pytest.raises(ConfigError, match="unknown option pool_sise"):
        load(None, auth="trust", pool_sise=3)


@pytest.mark.parametrize("text, key", [
    ('[upstream]\nhots = "db"\n', "hots"),
    ('[upstream]\nurl = "postgresql://h/d"\npasword = "x"\n', "pasword"),
])
def test_unknown_upstream_key_is_an_error(tmp_path, text, key):
    # A typo in [upstream] must not be silently ignored (the proxy would connect elsewhere).
    with pytest.raises(ConfigError, match=key):
        load(write(tmp_path, text + USERS))


@pytest.mark.parametrize("text", [
    '[upstream]\nport = "fivefourthreetwo"\n',
    '[upstream]\nport = [5432]\n',
    '[upstream]\nhost = 5\n',
])
def test_bad_upstream_type_is_an_error(tmp_path, text):
    with pytest.raises(ConfigError):
        load(write(tmp_path, text + USERS))


def test_bad_upstream_password_type_error_does_not_show_it(tmp_path):
    # A numeric password in TOML is a type error, but its message must not print the value.
    with pytest.raises(ConfigError) as ei:
        load(write(tmp_path, '[upstream]\npassword = 98765432\n' + USERS))
    assert "98765432" not in str(ei.value)


@pytest.mark.parametrize("text", [
    '[pool]\npool_size = true\n',        # a boolean is not a count
    '[pool]\npool_size = 2.5\n',         # silently truncated to 2 otherwise
])
def test_bad_number_types_are_errors(tmp_path, text):
    with pytest.raises(ConfigError, match="pool_size"):
        load(write(tmp_path, text + USERS))


# ---------------------------------------------------------------- upstream URLs

@pytest.mark.parametrize("url, expected", [
    ("postgresql://u:p@db.example.com:5433/mydb", ("db.example.com", 5433, "u", "p", "mydb")),
    ("postgres://u@db/mydb", ("db", 5432, "u", None, "mydb")),
    ("postgresql://db", ("db", 5432, "postgres", None, "postgres")),
    ("postgresql://u:p%40ss%3Aw%2Frd@h/d", ("h", 5432, "u", "p@ss:w/rd", "d")),
    ("postgresql://u:@h/d", ("h", 5432, "u", "", "d")),
    ("postgresql://u%2Bx@h/my%20db", ("h", 5432, "u+x", None, "my db")),
    ("postgresql://u:p@%2Ftmp%2Fsock:5432/db", ("/tmp/sock", 5432, "u", "p", "db")),
    ("postgresql://u:p@%2Fvar%2Frun%2FPostgreSQL:5433/db", ("/var/run/PostgreSQL", 5433, "u", "p", "db")),
    ("postgresql://u:p@/db?host=/tmp/sock", ("/tmp/sock", 5432, "u", "p", "db")),
    ("postgresql://u@/db?host=/tmp/Sock&port=6543", ("/tmp/Sock", 6543, "u", None, "db")),
    ("postgresql://u@[::1]:5433/db", ("::1", 5433, "u", None, "db")),
    ("postgresql://u@DB.Example.com/db", ("db.example.com", 5432, "u", None, "db")),
])
def test_upstream_url(url, expected):
    up = Upstream.from_url(url)
    assert (up.host, up.port, up.user, up.password, up.database) == expected


def test_unix_socket_upstream():
    assert Upstream.from_url("postgresql://u@%2Ftmp%2Fsock/db").is_unix
    assert Upstream.from_url("postgresql://u@/db?host=/tmp/sock").is_unix
    assert not Upstream.from_url("postgresql://u@localhost/db").is_unix


@pytest.mark.parametrize("url", ["mysql://u:s3cr3t-pw@h/d", "postgresql://u:s3cr3t-pw@h:notaport/d",
                                 "postgresql://u:s3cr3t-pw@/d?port=x", "postgresql://u:s3cr3t-pw@h:99999/d",
                                 "postgresql://u:s3cr3t-pw@[::1/d", "u:s3cr3t-pw@h/d",
                                 "postgresql://u@h:x/d?password=s3cr3t-pw"])
def test_bad_upstream_url_errors_do_not_show_the_password(url):
    # A ConfigError is printed on the terminal and in service logs: no secret in it.
    with pytest.raises(ConfigError) as ei:
        Upstream.from_url(url)
    assert "s3cr3t-pw" not in str(ei.value)
    assert "s3cr3t-pw" not in repr(ei.value)


# ---------------------------------------------------------------- environment

def test_env_overrides_user_password(tmp_path, monkeypatch):
    users = write(tmp_path, '[users.app]\npassword = "file-pw"\n\n[users.read-only]\npassword = "x"\n'
                            '\n[users.reporter]\nscram_verifier = "SCRAM-SHA-256$4096:c2FsdA==$c3Q=:c2U="\n',
                  "users.toml")
    monkeypatch.setenv("UNPINNED_PASSWORD_APP", "env-pw")
    monkeypatch.setenv("UNPINNED_PASSWORD_READ_ONLY", "ro-env-pw")
    monkeypatch.setenv("UNPINNED_PASSWORD_REPORTER", "rep-env-pw")
    cfg = load(None, users_file=users)
    assert cfg.users["app"].password == "env-pw"
    assert cfg.users["read-only"].password == "ro-env-pw"
    assert cfg.server_credentials("app") == ("app", "env-pw")
    assert cfg.server_credentials("reporter") == ("reporter", "rep-env-pw")


def test_env_password_alone_is_enough(tmp_path, monkeypatch):
    # The file holds no secret at all; the environment gives it.
    monkeypatch.setenv("UNPINNED_PASSWORD_APP", "env-only")
    cfg = load(write(tmp_path, "[users.app]\nadmin = true\n"))
    assert cfg.users["app"].password == "env-only"


def test_env_overrides_upstream_password(tmp_path, monkeypatch):
    monkeypatch.setenv("UNPINNED_UPSTREAM_PASSWORD", "up-env")
    cfg = load(write(tmp_path, '[upstream]\nurl = "postgresql://u:in-url@h/d"\n'), auth="trust")
    assert cfg.upstream.password == "up-env"


# ---------------------------------------------------------------- secrets stay hidden

def test_repr_never_shows_passwords(tmp_path, monkeypatch):
    monkeypatch.setenv("UNPINNED_UPSTREAM_PASSWORD", "upstream-env-secret")
    cfg = load(write(tmp_path, FULL))
    secrets = ["from-url", "from-upstream-table", "upstream-env-secret", "app-pw", "ro-pw", "old-pw",
               "md5aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "c3RvcmVkc3RvcmVk", "c2VydmVyc2VydmVy", "c2FsdHNhbHQ="]
    texts = [repr(cfg), str(cfg), f"{cfg}", repr(cfg.upstream), str(cfg.upstream), repr(cfg.users),
             *(repr(u) for u in cfg.users.values()), *(str(u) for u in cfg.users.values())]
    for text in texts:
        for s in secrets:
            assert s not in text, f"{s!r} shown in {text!r}"
    assert "db.example.com" in repr(cfg) and "reporter" in repr(cfg)


def test_user_secret_repr():
    s = UserSecret(name="u", password="pw-123", server_password="spw-456", md5_hash="md5" + "b" * 32)
    assert "pw-123" not in repr(s) and "spw-456" not in repr(s) and "bbbb" not in repr(s)
