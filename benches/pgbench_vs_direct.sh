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
pg_port=$(( 20000 + RANDOM % 10000 )) mux_port=$(( 20000 + RANDOM % 10000 )) bouncer_port=$(( 20000 + RANDOM % 10000 ))
cleanup() {
    [ -n "${mux_pid:-}" ] && kill "$mux_pid" 2>/dev/null || true
    [ -n "${bouncer_pid:-}" ] && kill "$bouncer_pid" 2>/dev/null || true
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

# PgBouncer, when installed (Debian: apt-get install pgbouncer), in transaction
# mode with the same pool size. It refuses to run as root.
targets="direct pgmux"
if command -v pgbouncer >/dev/null; then
    cat > "$work/pgbouncer.ini" <<CONF
[databases]
postgres = host=127.0.0.1 port=$pg_port dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
unix_socket_dir =
auth_type = trust
auth_file = $work/userlist.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = 2000
logfile = $work/pgbouncer.log
CONF
    echo '"postgres" ""' > "$work/userlist.txt"
    chmod 644 "$work/pgbouncer.ini" "$work/userlist.txt"
    "${as_pg[@]}" pgbouncer "$work/pgbouncer.ini" >/dev/null 2>&1 &
    bouncer_pid=$!
    for _ in $(seq 100); do pg_isready -q -h 127.0.0.1 -p "$bouncer_port" && break; sleep 0.05; done
    # With runuser the pid above is runuser's; find pgbouncer's own for CPU accounting.
    bouncer_pid=$(pgrep -n -f "pgbouncer $work/pgbouncer.ini" || echo "$bouncer_pid")
    targets="direct pgmux pgbouncer"
fi

run() { # port mode -> tps
    pgbench -h 127.0.0.1 -p "$1" -U postgres -c "$clients" -j 2 -T "$seconds" -M "$2" $script postgres 2>/dev/null \
        | awk '/^tps = / {print $3; exit}'
}
cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
port_of() { case $1 in direct) echo "$pg_port";; pgmux) echo "$mux_port";; pgbouncer) echo "$bouncer_port";; esac; }
pid_of() { case $1 in pgmux) echo "$mux_pid";; pgbouncer) echo "$bouncer_pid";; *) echo "";; esac; }
hz=$(getconf CLK_TCK)
declare -A results cpu xacts
echo "pgbench -c $clients -j 2 -T $seconds $script, modes: $modes, targets: $targets, $rounds alternated rounds, $(nproc) cores, $(date -u +%F)"
for r in $(seq "$rounds"); do
    for mode in $modes; do
        line="round $r $mode:"
        for t in $targets; do
            # PgBouncer 1.18 does not support named prepared statements in transaction mode.
            if [ "$t" = pgbouncer ] && [ "$mode" = prepared ]; then continue; fi
            pid=$(pid_of "$t"); c0=0; [ -n "$pid" ] && c0=$(cpu_of "$pid")
            tps=$(run "$(port_of "$t")" "$mode")
            if [ -n "$pid" ]; then
                c1=$(cpu_of "$pid")
                cpu[$t,$mode]=$(( ${cpu[$t,$mode]:-0} + c1 - c0 ))
                xacts[$t,$mode]=$(awk -v a="${xacts[$t,$mode]:-0}" -v x="$tps" -v s="$seconds" 'BEGIN{print a + x*s}')
            fi
            results[$t,$mode]+="$tps "
            line+=$(printf '  %s %.0f' "$t" "$tps")
        done
        echo "$line tps"
    done
done
echo
printf '| mode | target | tps (median) | vs direct | vs pgbouncer | proxy CPU s / 1000 xacts |\n|---|---|---|---|---|---|\n'
for mode in $modes; do
    # shellcheck disable=SC2086
    md=$(median ${results[direct,$mode]})
    mb=""
    # shellcheck disable=SC2086
    [ -n "${results[pgbouncer,$mode]:-}" ] && mb=$(median ${results[pgbouncer,$mode]})
    for t in $targets; do
        [ -n "${results[$t,$mode]:-}" ] || continue
        # shellcheck disable=SC2086
        m=$(median ${results[$t,$mode]})
        vb="-"; [ -n "$mb" ] && vb=$(awk -v a="$m" -v b="$mb" 'BEGIN{printf "%.2f", a/b}')
        c="-"; [ -n "${cpu[$t,$mode]:-}" ] && c=$(awk -v t="${cpu[$t,$mode]}" -v hz="$hz" -v x="${xacts[$t,$mode]}" 'BEGIN{printf "%.4f", t/hz/x*1000}')
        printf '| %s | %s | %.0f | %.2f | %s | %s |\n' "$mode" "$t" "$m" "$(awk -v a="$m" -v b="$md" 'BEGIN{print a/b}')" "$vb" "$c"
    done
done
