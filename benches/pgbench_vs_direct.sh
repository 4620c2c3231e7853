#!/usr/bin/env bash
# Load comparison: pgbench through pgmux and directly against Postgres,
# alternating targets round by round in one run (this machine is noisy:
# compare medians and the ratio, never one absolute number).
#
#   benches/pgbench_vs_direct.sh [clients=64] [seconds=10] [rounds=3] [modes="extended"] [script=-S]
#
# `modes` may list several pgbench query modes ("simple extended prepared");
# every round runs each mode against each target in turn.
#
# Starts its own throwaway Postgres (as the postgres OS user when root) and a
# release build of pgmux, and removes both on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-64} seconds=${2:-10} rounds=${3:-3} modes=${4:-extended} script=${5:--S}
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$bindir/initdb" ] || { echo "PostgreSQL server not found: apt-get install postgresql postgresql-contrib" >&2; exit 1; }
command -v pgbench >/dev/null || { echo "pgbench not found: apt-get install postgresql-contrib" >&2; exit 1; }

cargo build --release --quiet
work=$(mktemp -d /tmp/pgmux-bench.XXXXXX)
chmod 755 "$work"
as_pg=()
if [ "$(id -u)" = 0 ]; then chown postgres "$work"; as_pg=(runuser -u postgres --); fi
pg_port=$(( 20000 + RANDOM % 10000 )) mux_port=$(( 20000 + RANDOM % 10000 ))
cleanup() {
    [ -n "${mux_pid:-}" ] && kill "$mux_pid" 2>/dev/null || true
    "${as_pg[@]}" "$bindir/pg_ctl" -D "$work/data" stop -m immediate >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

"${as_pg[@]}" "$bindir/initdb" -D "$work/data" -U postgres --auth=trust >/dev/null
cat >> "$work/data/postgresql.conf" <<CONF
port = $pg_port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
max_connections = 300
fsync = off
CONF
"${as_pg[@]}" "$bindir/pg_ctl" -D "$work/data" -l "$work/pg.log" -w start >/dev/null
pgbench -i -s 10 -q -h 127.0.0.1 -p "$pg_port" -U postgres postgres >/dev/null 2>&1

cat > "$work/proxy.toml" <<CONF
[proxy]
listen = "127.0.0.1:$mux_port"
max_client_conn = 2000
query_wait_timeout = "60s"

[[databases]]
name = "postgres"
primary = "127.0.0.1:$pg_port"
pool_size = 20

[[users]]
name = "postgres"
auth = "trust"
CONF
./target/release/pgmux --config "$work/proxy.toml" --log-level warn &
mux_pid=$!
for _ in $(seq 100); do pg_isready -q -h 127.0.0.1 -p "$mux_port" && break; sleep 0.05; done

run() { # port mode -> tps
    pgbench -h 127.0.0.1 -p "$1" -U postgres -c "$clients" -j 2 -T "$seconds" -M "$2" $script postgres 2>/dev/null \
        | awk '/^tps = / {print $3; exit}'
}
cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
hz=$(getconf CLK_TCK)
declare -A results cpu xacts
echo "pgbench -c $clients -j 2 -T $seconds $script, modes: $modes, $rounds alternated rounds, $(nproc) cores, $(date -u +%F)"
for r in $(seq "$rounds"); do
    for mode in $modes; do
        d=$(run "$pg_port" "$mode")
        c0=$(cpu_of "$mux_pid"); p=$(run "$mux_port" "$mode"); c1=$(cpu_of "$mux_pid")
        results[direct,$mode]+="$d " results[pgmux,$mode]+="$p "
        cpu[$mode]=$(( ${cpu[$mode]:-0} + c1 - c0 ))
        xacts[$mode]=$(awk -v a="${xacts[$mode]:-0}" -v t="$p" -v s="$seconds" 'BEGIN{print a + t*s}')
        printf 'round %d %-9s direct %8.0f tps   pgmux %8.0f tps\n' "$r" "$mode" "$d" "$p"
    done
done
echo
printf '| mode | direct tps (median) | pgmux tps (median) | pgmux/direct | pgmux CPU s per 1000 xacts |\n|---|---|---|---|---|\n'
for mode in $modes; do
    # shellcheck disable=SC2086
    md=$(median ${results[direct,$mode]}) mp=$(median ${results[pgmux,$mode]})
    printf '| %s | %.0f | %.0f | %.2f | %.4f |\n' "$mode" "$md" "$mp" \
        "$(awk -v a="$mp" -v b="$md" 'BEGIN{print a/b}')" \
        "$(awk -v t="${cpu[$mode]}" -v hz="$hz" -v x="${xacts[$mode]}" 'BEGIN{print t/hz/x*1000}')"
done
