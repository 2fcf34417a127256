"""Fuzzing the pure code: every corpus case replayed, each atheris target run briefly, and
hypothesis property and stateful tests. No PostgreSQL: the targets are in fuzz/targets.py,
the long run is `make fuzz`.

The property throughout: whatever the bytes, the outcome is a refusal the proxy turns into a
clear error for the client, or a result whose framing is sound; never another exception, a
hang, or requests left without their answers."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import scramp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from unpinned.wire.auth import AuthFailed, ClientAuth, UserSecret
from unpinned.wire import messages as m

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
sys.path.insert(0, str(FUZZ))
import seeds  # noqa: E402
import targets  # noqa: E402

TARGETS = ("startup", "backend_fields", "auth", "relay")
CASES = sorted((t, p) for t in TARGETS for p in (FUZZ / "corpus" / t).iterdir())
# Short enough for every `make test`; `make fuzz` runs each target for minutes.
SECONDS_PER_TARGET = float(os.environ.get("UNPINNED_FUZZ_SECONDS", "2"))


# ---------------------------------------------------------------- (a) the corpus

@pytest.mark.parametrize("target,path", CASES, ids=[f"{t}/{p.name}" for t, p in CASES])
def test_corpus_case(target, path):
    """Seeds and every crash ever found: each must now end in a defined outcome."""
    getattr(targets, target)(path.read_bytes())


def test_every_target_has_seeds():
    for t in TARGETS:
        assert any(p.name.startswith("seed-") for p in (FUZZ / "corpus" / t).iterdir()), t


def test_seeds_are_all_in_the_corpus():
    """The corpus holds what seeds.py writes (rerun it after changing the seeds)."""
    for name, cases in (("startup", seeds.startup_seeds()), ("backend_fields", seeds.backend_seeds()),
                        ("auth", seeds.auth_seeds()), ("relay", seeds.relay_seeds())):
        have = {p.read_bytes() for p in (FUZZ / "corpus" / name).iterdir()}
        assert set(cases) <= have, f"run python fuzz/seeds.py: {name} lacks seeds"


# ---------------------------------------------------------------- (b) atheris, briefly

@pytest.fixture(scope="module")
def atheris_runs(tmp_path_factory):
    """Every target fuzzed at once, each in its own subprocess (atheris.Fuzz exits the
    process; side by side they share the machine's cores). New inputs go to a scratch
    directory, a crash to the target's artifact directory."""
    pytest.importorskip("atheris", reason="atheris (test extra) has no build for this Python")
    base = tmp_path_factory.mktemp("atheris")
    runs = {}
    for target in TARGETS:
        (base / target / "work").mkdir(parents=True)
        runs[target] = subprocess.Popen(
            [sys.executable, str(FUZZ / "run.py"), target, f"-max_total_time={SECONDS_PER_TARGET:g}",
             "-timeout=5", "-rss_limit_mb=1024", "-print_final_stats=1", f"-artifact_prefix={base / target}/",
             str(base / target / "work"), str(FUZZ / "corpus" / target)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for target, proc in runs.items():
        try:
            _, err = proc.communicate(timeout=SECONDS_PER_TARGET + 100)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            err += "\n(killed: the run did not end in time)"
        results[target] = (proc.returncode, err, [p for p in (base / target).iterdir() if p.is_file()])
    return results


@pytest.mark.timeout(240)
@pytest.mark.parametrize("target", TARGETS)
def test_atheris_target(target, atheris_runs):
    """Coverage-guided, briefly: a crash fails the test with its reproducer's path."""
    rc, err, crashes = atheris_runs[target]
    assert rc == 0 and not crashes, (
        f"{target}: crash; reproducer(s) {crashes} (copy into fuzz/corpus/{target}/):\n{err[-3000:]}")
    assert "Done" in err, err[-2000:]


# ---------------------------------------------------------------- (c) hypothesis: codec

_names = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=20)
_values = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_names, _values, max_size=6))
def test_startup_packet_round_trip(params):
    code, back = m.parse_startup(m.startup_message(params)[4:])
    assert code == m.PROTOCOL_3_0
    assert back == params


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_startup_any_bytes(data):
    targets.startup(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_backend_fields_any_bytes(data):
    targets.backend_fields(data)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from("SVCMDHPWFLR"), _values, max_size=8))
def test_error_fields_round_trip(fields):
    body = b"".join(k.encode() + v.encode() + b"\x00" for k, v in fields.items()) + b"\x00"
    assert m.parse_error_fields(body) == fields


# ---------------------------------------------------------------- (c) hypothesis: authentication

_printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters=","), min_size=1,
                     max_size=30)
_attr_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters=","), max_size=12)
_extensions = st.lists(st.tuples(st.sampled_from("abdefghijklmoqstuvwxyzEX"), _attr_value), max_size=3)


def _proof(password: str, client_first_bare: str, server_first: str,
           without_proof: str) -> str:
    """The client's proof, computed the RFC 5802 way (scramp's primitives)."""
    import base64
    import hashlib
    import hmac
    attrs = dict(a.split("=", 1) for a in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored = hashlib.sha256(client_key).digest()
    message = f"{client_first_bare},{server_first},{without_proof}".encode()
    sig = hmac.new(stored, message, hashlib.sha256).digest()
    return base64.b64encode(bytes(a ^ b for a, b in zip(client_key, sig))).decode()


_SECRET = UserSecret("app", password="pw")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flag=st.sampled_from("ny"), nonce=_printable, first_ext=_extensions, final_ext=_extensions,
       right=st.booleans(), known=st.booleans())
def test_scram_any_well_formed_exchange(flag, nonce, first_ext, final_ext, right, known):
    """Any client-first/-final the RFC allows (either flag, any printable nonce, extensions)
    logs in with the password and fails with 28P01 without it; an unknown user always fails
    with 28P01, after the same messages."""
    auth = ClientAuth("scram", "app", _SECRET) if known else ClientAuth.mock("scram", "app", {})
    auth.start()
    bare = "n=," + f"r={nonce}" + "".join(f",{k}={v}" for k, v in first_ext)
    first = f"{flag},," + bare
    reply = auth.step(b"SCRAM-SHA-256\x00" + struct.pack("!I", len(first)) + first.encode())
    server_first = reply[9:].decode()
    assert server_first.startswith(f"r={nonce}")
    snonce = server_first.split(",")[0][2:]
    without = f"c={'biws' if flag == 'n' else 'eSws'},r={snonce}" + "".join(f",{k}={v}" for k, v in final_ext)
    proof = _proof("pw" if right else "wrong", bare, server_first, without)
    final = f"{without},p={proof}".encode()
    if right and known:
        assert auth.step(final)[:9] == b"R" + struct.pack("!II", 4 + 4 + 46, 12)
        assert auth.done
    else:
        with pytest.raises(AuthFailed) as ei:
            auth.step(final)
        assert ei.value.sqlstate == "28P01" and not auth.done


@settings(max_examples=300, deadline=None)
@given(mode=st.integers(0, 255), first=st.binary(max_size=80), final=st.binary(max_size=120))
def test_auth_any_bytes(mode, first, final):
    targets.auth(bytes((mode,)) + b"SCRAM-SHA-256\x00" + struct.pack("!I", len(first)) + first
                 + targets.AUTH_SEP + final)
    targets.auth(bytes((mode,)) + first + targets.AUTH_SEP + final)


@settings(max_examples=200, deadline=None)
@given(attrs=st.lists(st.tuples(st.sampled_from("crpexyz1,= "), _attr_value), min_size=0, max_size=6))
def test_scram_final_attribute_soup(attrs):
    """A client-final made of arbitrary attributes around the right nonce: never logs in,
    always a defined refusal."""
    auth = ClientAuth("scram", "app", _SECRET)
    auth.start()
    reply = auth.step(b"SCRAM-SHA-256\x00" + struct.pack("!I", 11) + b"n,,n=,r=abc")
    snonce = reply[9:].decode().split(",")[0][2:]
    final = ",".join(f"{k}={snonce if k == 'r' else v}" for k, v in attrs)
    with pytest.raises(AuthFailed):
        auth.step(final.encode())
    assert not auth.done


def test_scramp_client_logs_in_and_mock_refuses():
    for auth, ok in ((ClientAuth("scram", "app", _SECRET), True), (ClientAuth.mock("scram", "app", {}), False)):
        auth.start()
        c = scramp.ScramClient(["SCRAM-SHA-256"], "x", "pw")
        first = c.get_client_first().encode()
        reply = auth.step(b"SCRAM-SHA-256\x00" + struct.pack("!I", len(first)) + first)
        c.set_server_first(reply[9:].decode())
        if ok:
            c.set_server_final(auth.step(c.get_client_final().encode())[9:].decode())
            assert auth.done
        else:
            with pytest.raises(AuthFailed):
                auth.step(c.get_client_final().encode())


# ---------------------------------------------------------------- (c) hypothesis: the relay

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_relay_any_bytes(data):
    targets.relay(data)


_SQL = st.sampled_from([
    b"SELECT 1", b"BEGIN", b"COMMIT", b"ROLLBACK", b"SET search_path TO x", b"SET LOCAL work_mem = '1MB'",
    b"RESET ALL", b"DISCARD ALL", b"SELECT set_config('search_path', NULL, false)", b"PREPARE p AS SELECT 1",
    b"DEALLOCATE p", b"LISTEN ch", b"CREATE TEMP TABLE t (x int)", b"SELECT pg_advisory_lock(1)",
    b"SELECT nextval('s')", b"SAVEPOINT a", b"SELECT 1; SELECT 2", b"", b"SELECT $1",
])
_NAME = st.sampled_from([b"", b"s1", b"s2", b"U_1"])


class RelayMachine(RuleBasedStateMachine):
    """A client sends well-formed messages in any order, the server answers them as
    PostgreSQL could (successes, errors, notices, chosen by hypothesis). After the client's
    last Sync is answered, nothing is left waiting, and when no error and no garbage came the
    client got one ReadyForQuery per Query and Sync it sent."""

    @initialize(mode=st.sampled_from(["smart", "rds"]))
    def start(self, mode):
        self.relay = targets.new_relay(mode)
        self.pg = targets.Server()
        self.pg.sent(self.relay.attach(targets.ServerState()))
        self.refused = False        # the relay refused the stream: the shell closes the client
        self.garbled = False        # the client sent bytes that are not messages
        self.errors = False
        self.expected_ready = 0
        self.ready = 0

    def open(self) -> bool:
        return not self.refused and not self.relay.terminated and self.relay.fatal is None

    @precondition(lambda self: not self.open())
    @rule(mode=st.sampled_from(["smart", "rds"]))
    def reconnect(self, mode):
        self.start(mode)

    def _send(self, data: bytes) -> None:
        try:
            out = self.relay.from_client(data)
        except targets.RELAY_CLIENT_REFUSALS:
            self.refused = True
            return
        self.pg.sent(out)
        self._to_client(b"".join(self.relay.to_client))
        self.relay.to_client.clear()

    def _to_client(self, data: bytes) -> None:
        self.ready += sum(1 for t, _ in targets.split_messages(data) if t == ord("Z"))
        self.errors = self.errors or any(t == ord("E") for t, _ in targets.split_messages(data))

    @precondition(lambda self: self.open())
    @rule(sql=_SQL)
    def query(self, sql):
        self.expected_ready += 1
        self._send(m.query(sql))

    @precondition(lambda self: self.open())
    @rule(name=_NAME, sql=_SQL, portal=_NAME, execute=st.booleans(), describe=st.booleans(), sync=st.booleans())
    def extended(self, name, sql, portal, execute, describe, sync):
        msgs = seeds.parse(name, sql) + seeds.bind(portal, name)
        if describe:
            msgs += seeds.describe(b"P", portal)
        if execute:
            msgs += seeds.execute(portal)
        if sync:
            msgs += m.SYNC_MSG
            self.expected_ready += 1
        self._send(msgs)

    @precondition(lambda self: self.open())
    @rule(kind=st.sampled_from([b"S", b"P"]), name=_NAME, close=st.booleans())
    def close_or_describe(self, kind, name, close):
        self._send((seeds.close if close else seeds.describe)(kind, name) + m.SYNC_MSG)
        self.expected_ready += 1

    @precondition(lambda self: self.open())
    @rule(data=st.binary(min_size=1, max_size=40))
    def garbage(self, data):
        self.garbled = True       # from here on the counts say nothing
        self._send(data)

    @precondition(lambda self: self.open() and self.relay.queue)
    @rule(choices=st.binary(max_size=12), cut=st.integers(0, 255))
    def server_answers(self, choices, cut):
        choose = targets._Choices(choices)
        answers = self.pg.answers(self.relay, choose)
        at = cut * len(answers) // 256
        for piece in (answers[:at], answers[at:]):
            out = self.relay.from_server(piece)
            self._to_client(out)
            self.pg.sent(b"".join(self.relay.to_server))
            self.relay.to_server.clear()
            if self.relay.fatal is not None:
                return

    def teardown(self):
        relay = getattr(self, "relay", None)
        if relay is None or not self.open() or self.garbled:
            return
        # Answer everything still outstanding (successes only), with a final Sync.
        self._send(m.SYNC_MSG)
        self.expected_ready += 1
        for _ in range(6):
            if not relay.queue:
                break
            out = relay.from_server(self.pg.answers(relay, targets._Choices(b"")))
            self._to_client(out)
            self.pg.sent(b"".join(relay.to_server))
            relay.to_server.clear()
        assert not relay.queue, f"requests left waiting: {list(relay.queue)!r}"
        if not self.errors:
            assert self.ready == self.expected_ready

    @invariant()
    def buffer_holds_less_than_a_message(self):
        held = self.relay.cin if hasattr(self, "relay") else None
        assert held is None or held.streaming or held.have < held.need


RelayMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=20, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_relay_state_machine = RelayMachine.TestCase
