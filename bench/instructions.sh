#!/bin/bash
# CPU instructions the proxy executes per transaction, counted by valgrind's callgrind: the
# same count whatever else the machine is doing, so a small change to the hot path can be
# measured where TPS on a shared 2-core machine is noise. Not part of `make bench`.
#
#   PGPORT=5432 bench/instructions.sh [pgbench args]      (default: -S -n -c 50 -j 2)
#
# PGPORT: a PostgreSQL with a `pgbench -i` database and trust authentication for postgres
# (an embedded one started as bench/run.py does, or a system one).
# Needs valgrind (apt-get install valgrind). One worker; warm-up 2,000 transactions, then
# N x clients transactions are counted (N=100 by default).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PGPORT:?set PGPORT to a PostgreSQL with a pgbench database}"
PY=.venv/bin/python
PGBENCH=${PGBENCH:-$($PY -c "from unpinned.dev.embedded import install_dir; print(install_dir())")/bin/pgbench}
ARGS=${*:--S -n -c 50 -j 2}
# A free port each time: a previous run's proxy may still be writing its profile on the old one.
PORT=${PROXY_PORT:-$($PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
OUT=$(mktemp -d)
valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.%p" $PY -m unpinned.cli serve --listen 127.0.0.1:$PORT \
    --upstream "postgresql://postgres@127.0.0.1:$PGPORT/postgres" --auth trust --pool-size 20 2>"$OUT/serve.log" &
VG=$!
trap 'kill $VG 2>/dev/null || true; wait $VG 2>/dev/null || true; rm -rf "$OUT"' EXIT
# Under valgrind on a busy machine the start-up alone can take minutes.
for _ in $(seq 600); do sleep 1; grep -q " listening on " "$OUT/serve.log" && break; done
run() { PGPASSWORD=x "$PGBENCH" -h 127.0.0.1 -p "$PORT" -U postgres $ARGS -t "$1" postgres 2>&1; }
fail() { echo "pgbench $ARGS: failed: $1"; tail -5 "$OUT/serve.log"; exit 1; }
WARM=$(run 40) || fail "$WARM"
callgrind_control -d "$VG" >/dev/null
COUNTED=$(run "${N:-100}") || fail "$COUNTED"
TX=$(echo "$COUNTED" | awk '/actually processed/ {split($NF, a, "/"); print a[1]}')
callgrind_control -d "$VG" >/dev/null
sleep 1
IR=$(callgrind_annotate --auto=no "$(ls "$OUT"/cg.*.2)" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "pgbench $ARGS: $TX transactions, $((IR / TX)) instructions per transaction"
