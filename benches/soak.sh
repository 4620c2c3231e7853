#!/usr/bin/env bash
# Soak: pgmux in front of a throwaway primary + streaming replica (read/write
# splitting on), under connect-per-transaction churn plus steady load, for
# DURATION seconds. Every INTERVAL seconds it prints pgmux's resident memory,
# open files and threads; at the end, what each pgbench did and every error.
# Flat memory and files and zero errors is a pass (the script exits 1
# otherwise). Not run in CI: it takes as long as you ask.
#
#   benches/soak.sh [DURATION=600] [INTERVAL=30] [CHURN=8] [STEADY=32] [POOL_SIZE=10]
#
# Starts its own Postgres (as the postgres OS user when root) and a release
# build of pgmux, and stops them and removes every temp file on exit.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."
DURATION=${DURATION:-600} INTERVAL=${INTERVAL:-30} CHURN=${CHURN:-8} STEADY=${STEADY:-32} POOL_SIZE=${POOL_SIZE:-10}
for arg in "$@"; do
    case $arg in
        DURATION=* | INTERVAL=* | CHURN=* | STEADY=* | POOL_SIZE=*) printf -v "${arg%%=*}" '%s' "${arg#*=}" ;;
        -h | --help) sed -n '2,/^set -euo/p' "$self" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

source benches/lib.sh
require_postgres
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release --quiet

work=$(mktemp -d /tmp/pgmux-soak.XXXXXX)
chmod 755 "$work"
as_pg=()
if [ "$(id -u)" = 0 ]; then
    chown postgres "$work"
    as_pg=(runuser -u postgres --)
fi
started=() mux_pid="" bench_pids=()
cleanup() {
    set +e
    for p in "${bench_pids[@]}" $mux_pid; do kill "$p" 2>/dev/null; done
    for d in "${started[@]}"; do "${as_pg[@]}" "$bindir/pg_ctl" -D "$d" stop -m immediate >/dev/null 2>&1; done
    wait 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port primary_port; free_port replica_port; free_port mux_port

"${as_pg[@]}" "$bindir/initdb" -D "$work/primary" -U postgres --auth=trust >/dev/null
cat >>"$work/primary/postgresql.conf" <<CONF
port = $primary_port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
max_connections = $((4 * POOL_SIZE + 40))
fsync = off
wal_level = replica
CONF
echo "host replication postgres 127.0.0.1/32 trust" >>"$work/primary/pg_hba.conf"
"${as_pg[@]}" "$bindir/pg_ctl" -D "$work/primary" -l "$work/primary.log" -w start >/dev/null
started+=("$work/primary")
"${as_pg[@]}" "$bindir/pg_basebackup" -h 127.0.0.1 -p "$primary_port" -U postgres -D "$work/replica" -R -X stream
sed -i "s/^port = .*/port = $replica_port/" "$work/replica/postgresql.conf"
"${as_pg[@]}" "$bindir/pg_ctl" -D "$work/replica" -l "$work/replica.log" -w start >/dev/null
started+=("$work/replica")
pgbench -i -s 10 -q -h 127.0.0.1 -p "$primary_port" -U postgres postgres >/dev/null 2>&1

cat >"$work/proxy.toml" <<CONF
[proxy]
listen = "127.0.0.1:$mux_port"
query_wait_timeout = "60s"
server_tls = "disable"

[[databases]]
name = "postgres"
primary = "127.0.0.1:$primary_port"
replicas = ["127.0.0.1:$replica_port"]
pool_size = $POOL_SIZE

[[users]]
name = "postgres"
auth = "trust"
CONF
"${CARGO_TARGET_DIR:-target}/release/pgmux" --config "$work/proxy.toml" --log-level warn 2>"$work/pgmux.log" &
mux_pid=$!
for _ in $(seq 200); do pg_isready -q -h 127.0.0.1 -p "$mux_port" && break; sleep 0.05; done

bench() { # name, pgbench arguments...
    local name=$1
    shift
    pgbench -h 127.0.0.1 -p "$mux_port" -U postgres -T "$DURATION" -P "$INTERVAL" "$@" postgres \
        >"$work/$name.out" 2>"$work/$name.err" &
    bench_pids+=($!)
}
# A new connection per transaction (TPC-B-like: writes, then read-your-writes reads).
bench churn -C -c "$CHURN" -j 2
# Long-lived clients, read-only and extended protocol: the replica's share.
bench steady -S -M extended -c "$STEADY" -j 2

sample() {
    local rss fds threads
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$mux_pid/status")
    fds=$(ls "/proc/$mux_pid/fd" | wc -l)
    threads=$(awk '/^Threads/ {print $2}' "/proc/$mux_pid/status")
    printf '%6ss  %8s KiB  %5s files  %3s threads\n' "$1" "$rss" "$fds" "$threads"
    echo "$rss $fds" >>"$work/samples"
}
echo "soak: ${DURATION}s, $CHURN connect-per-transaction clients + $STEADY steady clients, pool $POOL_SIZE, primary + replica"
start=$(date +%s)
sample 0
while kill -0 "${bench_pids[0]}" 2>/dev/null || kill -0 "${bench_pids[1]}" 2>/dev/null; do
    sleep "$INTERVAL"
    kill -0 "$mux_pid" 2>/dev/null || { echo "pgmux exited" >&2; break; }
    sample $(($(date +%s) - start))
done
status=0
for p in "${bench_pids[@]}"; do wait "$p" || status=1; done
bench_pids=()

for name in churn steady; do
    echo "--- $name: $(grep -E '^number of (transactions actually processed|failed transactions)' "$work/$name.out" | tr '\n' ' ')"
    grep -E '^tps' "$work/$name.out" || true
    if grep -qiE 'error|abort' "$work/$name.err"; then
        status=1
        grep -iE 'error|abort' "$work/$name.err" | sort | uniq -c | sort -rn | head -5
    fi
done
warnings=$(grep -cE ' (WARN|ERROR) ' "$work/pgmux.log" || true)
echo "--- pgmux log: $warnings warnings/errors"
grep -E ' (WARN|ERROR) ' "$work/pgmux.log" | sed 's/^[^ ]* *//' | sort | uniq -c | sort -rn | head -5 || true
# Flat: the last sample within 10 MiB and 16 files of the first one after warm-up.
read -r rss1 fds1 < <(sed -n 2p "$work/samples")
read -r rssN fdsN < <(tail -1 "$work/samples")
echo "--- after warm-up: RSS ${rss1} -> ${rssN} KiB, files ${fds1} -> ${fdsN}"
if [ $((rssN - rss1)) -gt 10240 ] || [ $((fdsN - fds1)) -gt 16 ]; then status=1; fi
[ "$status" = 0 ] && echo "PASS" || echo "FAIL"
exit "$status"
