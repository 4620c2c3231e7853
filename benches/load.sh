#!/usr/bin/env bash
# Load benchmark: pgbench directly against Postgres, through pgmux and through
# PgBouncer (when installed), alternating targets within every round (this
# machine is noisy: compare medians and ratios, never one absolute number).
#
#   benches/load.sh [VAR=value ...]        (or the same variables in the environment)
#
#   SCRIPTS="select tpcb"                 pgbench -S (select-only) and the default TPC-B-like script
#   MODES="simple extended prepared"      pgbench -M query modes
#   CLIENTS="1 64 512"                    pgbench -c; -j is min(2, clients)
#   DURATION=8                            seconds per pgbench run (SECONDS=8 works too)
#   ROUNDS=3                              rounds; each round runs every cell on every target
#   TARGETS="direct pgmux pgbouncer floor"  pgbouncer is skipped when not installed; floor: see below;
#                                         pgmux2: pgmux with `workers = 2` (a multi-thread runtime);
#                                         pgmux-uring: pgmux with `io = "uring"` (one worker);
#                                         pgmux-poll: pgmux with `io = "$POLL_IO"` and
#                                         `idle_poll = "$IDLE_POLL"` (one worker);
#                                         uring, uring-ms: the floor relay on io_uring (see below);
#                                         pgmux-base: the pgmux binary at $BASE (another build, for
#                                         before/after runs), `io = "$BASE_IO"`, one worker
#   BASE=path                             that binary, e.g. after `git worktree add ../base REV` and
#                                         `cargo build --release` there: ../base/target/release/pgmux
#   BASE_IO=epoll                         pgmux-base's `io` ("uring": before/after of the io_uring path)
#   POLL_IO=uring IDLE_POLL=100us         pgmux-poll's `io` and `idle_poll`
#   LATENCY_MODES="simple extended"       1-client `SELECT 1` added-latency runs ("" skips them)
#   LATENCY_ROUNDS=$ROUNDS                rounds of the latency runs (1-client cells are cheap and noisy)
#   POOL_SIZE=20                          server connections per pool, pgmux and PgBouncer alike
#   SCALE=10                              pgbench -i scale factor
#   DOC=docs/benchmarks.md                where the results block is written ("" to skip)
#   SOCKETS=tcp                           "tcp unix" adds cells (script named select/unix, ...) where
#                                         pgbench -> proxy -> Postgres are both Unix-domain sockets
#                                         (direct: pgbench -> Postgres's socket; floor is TCP-only)
#
# Quick check that everything works end to end:
#   benches/load.sh SCRIPTS=select MODES=simple CLIENTS=8 DURATION=2 ROUNDS=1
#
# The default matrix (2 scripts x 3 modes x 3 client counts, 3 rounds, 8 s
# runs, plus the latency runs) takes about 25 minutes.
#
# Starts its own throwaway Postgres (as the postgres OS user when root), a
# release build of pgmux and PgBouncer (as postgres when root: it refuses to
# run as root), and stops them and removes every temp file on exit. The
# results replace the block between `<!-- results:begin -->` and
# `<!-- results:end -->` in $DOC; the rest of the file is left alone.
#
# PgBouncer 1.18 cannot serve `-M prepared` in transaction mode: prepared
# cells compare pgmux with direct only.
#
# `floor` is a yardstick, not a pooler: examples/floor_relay.rs, one epoll
# thread relaying each client's bytes to a server connection of its own with
# one recv and one send per readiness and nothing else. Its CPU per
# transaction is what the kernel charges any proxy for the round trips
# (socket calls, loopback TCP, waking the peer); a proxy's excess over it is
# its own code. Its TPS at many clients is not comparable: Postgres runs one
# backend per client behind it.
#
# `uring` is the same relay on io_uring (examples/floor_relay_uring.rs): the
# receives and sends of every ready connection batched into one
# io_uring_enter; `uring-ms` with a standing multishot receive per socket
# drawing from provided buffers. They ask whether io_uring makes the
# kernel's part cheaper here; skipped, with a note, where io_uring is refused.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."
command_line="benches/load.sh${*:+ $*}"

# SECONDS is bash's seconds-since-start counter: take the value the caller put
# in the environment, not the counter's current value.
env_seconds=$(tr '\0' '\n' </proc/$$/environ | sed -n 's/^SECONDS=//p')
SCRIPTS=${SCRIPTS:-select tpcb}
MODES=${MODES:-simple extended prepared}
CLIENTS=${CLIENTS:-1 64 512}
DURATION=${DURATION:-${env_seconds:-8}}
ROUNDS=${ROUNDS:-3}
TARGETS=${TARGETS:-direct pgmux pgbouncer floor}
LATENCY_MODES=${LATENCY_MODES-simple extended}
POOL_SIZE=${POOL_SIZE:-20}
SCALE=${SCALE:-10}
DOC=${DOC-docs/benchmarks.md}
SOCKETS=${SOCKETS:-tcp}
BASE=${BASE:-}
BASE_IO=${BASE_IO:-epoll}
POLL_IO=${POLL_IO:-uring}
IDLE_POLL=${IDLE_POLL:-100us}
LATENCY_ROUNDS=${LATENCY_ROUNDS:-}
for arg in "$@"; do
    case $arg in
        SCRIPTS=* | MODES=* | CLIENTS=* | DURATION=* | ROUNDS=* | TARGETS=* | LATENCY_MODES=* | POOL_SIZE=* | SCALE=* | DOC=* | SOCKETS=* | BASE=* | BASE_IO=* | POLL_IO=* | IDLE_POLL=* | LATENCY_ROUNDS=*)
            printf -v "${arg%%=*}" '%s' "${arg#*=}" ;;
        SECONDS=*) DURATION=${arg#*=} ;;
        -h | --help) sed -n '2,/^set -euo/p' "$self" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done
LATENCY_ROUNDS=${LATENCY_ROUNDS:-$ROUNDS}
for s in $SCRIPTS; do case $s in select | tpcb) ;; *) echo "SCRIPTS: select or tpcb, not $s" >&2; exit 2 ;; esac; done
for m in $MODES $LATENCY_MODES; do case $m in simple | extended | prepared) ;; *) echo "MODES: simple, extended or prepared, not $m" >&2; exit 2 ;; esac; done
for k in $SOCKETS; do case $k in tcp | unix) ;; *) echo "SOCKETS: tcp or unix, not $k" >&2; exit 2 ;; esac; done
# What the report calls each script of each socket kind: select, select/unix, ...
script_labels=""
for k in $SOCKETS; do for s in $SCRIPTS; do script_labels+=" $s$(if [ "$k" = unix ]; then echo /unix; fi)"; done; done

source benches/lib.sh
require_postgres
bouncer_bin=$(command -v pgbouncer || ls /usr/sbin/pgbouncer 2>/dev/null || true)
targets=""
for t in $TARGETS; do
    case $t in
        direct | pgmux | pgmux2 | pgmux-uring | pgmux-poll | floor | uring | uring-ms) targets+=" $t" ;;
        pgmux-base) [ -x "$BASE" ] || { echo "pgmux-base needs BASE=path to a pgmux binary" >&2; exit 2; }; targets+=" $t" ;;
        pgbouncer) if [ -n "$bouncer_bin" ]; then targets+=" $t"; else echo "PgBouncer not installed (apt-get install pgbouncer): skipped" >&2; fi ;;
        *) echo "TARGETS: direct, pgmux, pgmux2, pgmux-uring, pgmux-poll, pgmux-base, pgbouncer, floor, uring or uring-ms, not $t" >&2; exit 2 ;;
    esac
done
read -r -a targets <<<"$targets"
has_target() { [[ " ${targets[*]} " == *" $1 "* ]]; }
has_target direct || { echo "TARGETS must include direct (the baseline)" >&2; exit 2; }

# 512 clients need 512 sockets in pgbench, pgmux and PgBouncer alike.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release --quiet
has_target floor && cargo build --release --quiet --example floor_relay
{ has_target uring || has_target uring-ms; } && cargo build --release --quiet --example floor_relay_uring
work=$(mktemp -d /tmp/pgmux-load.XXXXXX)
chmod 755 "$work"
as_pg=()
if [ "$(id -u)" = 0 ]; then
    chown postgres "$work"
    as_pg=(runuser -u postgres --)
fi
pg_started="" mux_pid="" mux2_pid="" muxu_pid="" muxp_pid="" muxb_pid="" bouncer_pid="" floor_pid="" uring_pid="" uring_ms_pid="" bench_pid=""
cleanup() {
    set +e
    [ -n "$bench_pid" ] && kill "$bench_pid" 2>/dev/null
    [ -n "$mux_pid" ] && kill "$mux_pid" 2>/dev/null
    [ -n "$mux2_pid" ] && kill "$mux2_pid" 2>/dev/null
    [ -n "$muxu_pid" ] && kill "$muxu_pid" 2>/dev/null
    [ -n "$muxp_pid" ] && kill "$muxp_pid" 2>/dev/null
    [ -n "$muxb_pid" ] && kill "$muxb_pid" 2>/dev/null
    [ -n "$bouncer_pid" ] && kill "$bouncer_pid" 2>/dev/null
    [ -n "$floor_pid" ] && kill "$floor_pid" 2>/dev/null
    [ -n "$uring_pid" ] && kill "$uring_pid" 2>/dev/null
    [ -n "$uring_ms_pid" ] && kill "$uring_ms_pid" 2>/dev/null
    [ -n "$pg_started" ] && "${as_pg[@]}" "$bindir/pg_ctl" -D "$work/data" stop -m immediate >/dev/null 2>&1
    wait 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port pg_port; free_port mux_port; free_port mux2_port; free_port muxu_port; free_port muxp_port; free_port muxb_port; free_port bouncer_port; free_port floor_port; free_port uring_port; free_port uring_ms_port
max_clients=$(printf '%s\n' $CLIENTS 1 | sort -n | tail -1)

wait_port() { # port name
    for _ in $(seq 200); do
        pg_isready -q -h 127.0.0.1 -p "$1" && return 0
        sleep 0.05
    done
    echo "$2 did not start on port $1" >&2
    return 1
}

# ---------------------------------------------------------------- Postgres
# Room for the direct (or floor) run's clients beside every pool a proxy
# keeps open: pgmux, pgmux2, pgmux-uring, pgmux-poll, pgmux-base and PgBouncer, each with a TCP and a unix pool.
max_connections=$((max_clients + 12 * POOL_SIZE + 20))
"${as_pg[@]}" "$bindir/initdb" -D "$work/data" -U postgres --auth=trust >/dev/null
cat >>"$work/data/postgresql.conf" <<CONF
port = $pg_port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
max_connections = $max_connections
fsync = off
CONF
"${as_pg[@]}" "$bindir/pg_ctl" -D "$work/data" -l "$work/pg.log" -w start >/dev/null
pg_started=1
psql_direct() { psql -X -q -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres "$@"; }
echo "initialising pgbench tables (scale $SCALE)..." >&2
pgbench -i -s "$SCALE" -q -h 127.0.0.1 -p "$pg_port" -U postgres postgres >/dev/null 2>&1
pg_version=$(psql_direct -At -c 'SHOW server_version')

# ---------------------------------------------------------------- pgmux
start_pgmux() { # port workers name [io [binary [idle_poll]]]
    cat >"$work/$3.toml" <<CONF
[proxy]
listen = "127.0.0.1:$1"
unix_socket_dir = "$work"
workers = $2
io = "${4:-epoll}"
$([ -n "${6:-}" ] && echo "idle_poll = \"$6\"")
max_client_conn = $((max_clients + 100))
query_wait_timeout = "120s"
server_tls = "disable"

[[databases]]
name = "postgres"
primary = "127.0.0.1:$pg_port"
pool_size = $POOL_SIZE

# The unix cells: Postgres's own socket.
[[databases]]
name = "postgres_unix"
dbname = "postgres"
primary = "$work:$pg_port"
pool_size = $POOL_SIZE

[[users]]
name = "postgres"
auth = "trust"
CONF
    RUST_LOG="warn,pgmux::server=info" "${5:-${CARGO_TARGET_DIR:-target}/release/pgmux}" --config "$work/$3.toml" 2>"$work/$3.log" &
}
if has_target pgmux; then
    start_pgmux "$mux_port" 1 pgmux
    mux_pid=$!
    wait_port "$mux_port" pgmux
fi
if has_target pgmux2; then
    start_pgmux "$mux2_port" 2 pgmux2
    mux2_pid=$!
    wait_port "$mux2_port" "pgmux (workers = 2)"
fi
if has_target pgmux-uring; then
    start_pgmux "$muxu_port" 1 pgmux-uring uring
    muxu_pid=$!
    wait_port "$muxu_port" "pgmux (io = uring)"
    grep -h "data path" "$work/pgmux-uring.log" >&2 || true
fi
if has_target pgmux-poll; then
    start_pgmux "$muxp_port" 1 pgmux-poll "$POLL_IO" "" "$IDLE_POLL"
    muxp_pid=$!
    wait_port "$muxp_port" "pgmux (io = $POLL_IO, idle_poll = $IDLE_POLL)"
    grep -h "data path" "$work/pgmux-poll.log" >&2 || true
fi
if has_target pgmux-base; then
    start_pgmux "$muxb_port" 1 pgmux-base "$BASE_IO" "$BASE"
    muxb_pid=$!
    wait_port "$muxb_port" "pgmux ($BASE)"
    grep -h "data path" "$work/pgmux-base.log" >&2 || true
fi

# ---------------------------------------------------------------- PgBouncer
if has_target pgbouncer; then
    cat >"$work/pgbouncer.ini" <<CONF
[databases]
postgres = host=127.0.0.1 port=$pg_port dbname=postgres
postgres_unix = host=$work port=$pg_port dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
unix_socket_dir = $work
auth_type = trust
auth_file = $work/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = $((max_clients + 100))
query_wait_timeout = 120
server_tls_sslmode = disable
logfile = $work/pgbouncer.log
CONF
    echo '"postgres" ""' >"$work/userlist.txt"
    chmod 644 "$work/pgbouncer.ini" "$work/userlist.txt"
    # PgBouncer refuses to run as root. setpriv execs it as postgres in place:
    # $! is PgBouncer itself (for CPU accounting) and it keeps the raised
    # open-file limit (runuser's PAM session would reset it to 1024).
    as_bouncer=()
    [ "$(id -u)" = 0 ] && as_bouncer=(setpriv --reuid=postgres --regid=postgres --init-groups --)
    "${as_bouncer[@]}" "$bouncer_bin" "$work/pgbouncer.ini" >/dev/null 2>&1 &
    bouncer_pid=$!
    wait_port "$bouncer_port" pgbouncer
    [ "$(cat "/proc/$bouncer_pid/comm" 2>/dev/null)" = pgbouncer ] || { echo "PgBouncer exited: $(tail -3 "$work/pgbouncer.log")" >&2; exit 1; }
fi

# ---------------------------------------------------------------- floor relay
if has_target floor; then
    "${CARGO_TARGET_DIR:-target}/release/examples/floor_relay" "127.0.0.1:$floor_port" "127.0.0.1:$pg_port" 2>"$work/floor.log" &
    floor_pid=$!
    wait_port "$floor_port" floor_relay
fi

# ---------------------------------------------------------------- io_uring floor relays
# Started like the floor; one that exits at once (status 3: io_uring refused
# here) is dropped from the targets with its reason.
start_uring() { # target port pid_variable [--multishot]
    local t=$1 port=$2
    local -n pid_out=$3
    shift 3
    "${CARGO_TARGET_DIR:-target}/release/examples/floor_relay_uring" "127.0.0.1:$port" "127.0.0.1:$pg_port" "$@" 2>"$work/$t.log" &
    pid_out=$!
    if ! wait_port "$port" "$t" 2>/dev/null; then
        echo "$t skipped: $(cat "$work/$t.log")" >&2
        pid_out=""
        local kept=() x
        for x in "${targets[@]}"; do [ "$x" = "$t" ] || kept+=("$x"); done
        targets=("${kept[@]}")
    fi
}
if has_target uring; then start_uring uring "$uring_port" uring_pid; fi
if has_target uring-ms; then start_uring uring-ms "$uring_ms_port" uring_ms_pid --multishot; fi

# ---------------------------------------------------------------- runs
port_of() { case $1 in direct) echo "$pg_port" ;; pgmux) echo "$mux_port" ;; pgmux2) echo "$mux2_port" ;; pgmux-uring) echo "$muxu_port" ;; pgmux-poll) echo "$muxp_port" ;; pgmux-base) echo "$muxb_port" ;; pgbouncer) echo "$bouncer_port" ;; floor) echo "$floor_port" ;; uring) echo "$uring_port" ;; uring-ms) echo "$uring_ms_port" ;; esac; }
pid_of() { case $1 in pgmux) echo "$mux_pid" ;; pgmux2) echo "$mux2_pid" ;; pgmux-uring) echo "$muxu_pid" ;; pgmux-poll) echo "$muxp_pid" ;; pgmux-base) echo "$muxb_pid" ;; pgbouncer) echo "$bouncer_pid" ;; floor) echo "$floor_pid" ;; uring) echo "$uring_pid" ;; uring-ms) echo "$uring_ms_pid" ;; *) echo "" ;; esac; }
# The sum of fields of /proc/PID/stat, numbered after "pid (comm) " (12 utime,
# 13 stime, 14 cutime, 15 cstime: clock ticks); prints nothing, and does not
# fail, when the process is gone.
stat_ticks() { # pid field...
    local pid=$1
    shift
    sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk -v f="$*" '{n = split(f, i, " "); s = 0; for (j = 1; j <= n; j++) s += $(i[j]); print s}' || true
}
# utime + stime of the whole process (all its threads); 0 without a process.
cpu_ticks() {
    local t=""
    [ -n "$1" ] && t=$(stat_ticks "$1" 12 13)
    echo "${t:-0}"
}
# Postgres as a whole: the postmaster, its live children (backends, walwriter,
# ...) and the children it has already reaped (a direct run's backends). A
# child that exits between pgrep and the read counts nothing.
postmaster=$(head -1 "$work/data/postmaster.pid")
pg_ticks() {
    {
        stat_ticks "$postmaster" 12 13 14 15
        for c in $(pgrep -P "$postmaster"); do stat_ticks "$c" 12 13; done
    } | awk '{s += $1} END {print s + 0}'
}
# pgbench (and the `timeout` around it): the CPU of this shell's reaped children.
# Takes the shell's own PID: inside $(...) $BASHPID is the subshell's.
children_ticks() { stat_ticks "$1" 14 15; }
hz=$(getconf CLK_TCK)
echo 'SELECT 1;' >"$work/select1.sql"

results="$work/results.tsv" # kind script mode clients round target tps xacts failed avg_us p99_us cpu_ticks pg_ticks bench_ticks
: >"$results"

# Runs pgbench once and appends one line to $results.
run() { # kind script mode clients round target [socket]
    local kind=$1 script=$2 mode=$3 clients=$4 round=$5 target=$6 socket=${7:-tcp}
    local pid logs out c0 c1 g0 g1 b0 b1 n0 rc=0 script_args=() shell=$BASHPID host=127.0.0.1 db=postgres label=$2
    if [ "$socket" = unix ]; then
        host=$work label="$script/unix"
        [ "$target" = direct ] || db=postgres_unix
    fi
    case $script in
        select) script_args=(-S) ;;
        tpcb) script_args=() ;;
        select1) script_args=(-f "$work/select1.sql") ;;
    esac
    if [ "$script" = tpcb ]; then
        # What pgbench's own vacuum step does, done directly so that every
        # target starts from the same table state and no proxy carries VACUUM.
        psql_direct -c 'VACUUM pgbench_branches' -c 'VACUUM pgbench_tellers' -c 'TRUNCATE pgbench_history' >/dev/null
    fi
    logs="$work/logs" out="$work/pgbench.out"
    rm -rf "$logs" && mkdir "$logs"
    pid=$(pid_of "$target")
    n0=$(pgrep -c -P "$postmaster" || true)
    c0=$(cpu_ticks "$pid") g0=$(pg_ticks) b0=$(children_ticks "$shell")
    # A proxy that stalls fails its run instead of hanging the benchmark.
    timeout -k 5 $((2 * DURATION + 90)) pgbench -n -h "$host" -p "$(port_of "$target")" -U postgres -c "$clients" -j $((clients < 2 ? clients : 2)) \
        -T "$DURATION" -M "$mode" -l --log-prefix="$logs/tx" "${script_args[@]}" "$db" >"$out" 2>&1 &
    # In the background, so that INT/TERM interrupt `wait` and clean up at once.
    bench_pid=$!
    wait "$bench_pid" || rc=$?
    bench_pid=""
    c1=$(cpu_ticks "$pid") b1=$(children_ticks "$shell")
    # Backends of clients that connected straight to Postgres (direct, floor)
    # exit with pgbench: their CPU counts once the postmaster has reaped them
    # (and must not spill into the next run). 512 of them can take seconds.
    if [ "$target" = direct ] || [ "$target" = floor ] || [ "$target" = uring ] || [ "$target" = uring-ms ]; then
        for _ in $(seq 300); do
            [ "$(pgrep -c -P "$postmaster" || true)" -le "$n0" ] && break
            sleep 0.05
        done
    fi
    g1=$(pg_ticks)
    local tps xacts failed
    tps=$(awk '/^tps = / {print $3; exit}' "$out")
    xacts=$(awk -F': ' '/^number of transactions actually processed/ {print $2 + 0; exit}' "$out")
    failed=$(awk -F': ' '/^number of failed transactions/ {print $2 + 0; exit}' "$out")
    if [ "$rc" != 0 ] || [ -z "$tps" ] || [ -z "$xacts" ]; then
        if [ "$rc" = 0 ]; then
            echo "  pgbench against $target completed no transaction in ${DURATION}s (counted as a failed run)" >&2
        else
            echo "  pgbench against $target failed (exit $rc):" >&2
            { grep -m 5 -E 'error|abort|FATAL' "$out" || tail -5 "$out"; } | sed 's/^/    /' >&2
        fi
        tps=nan xacts=0
    fi
    # Per-transaction log lines: client_id xact_no latency_us script_no epoch epoch_us.
    # Nearest-rank p99 over every successful transaction of the run.
    local lat
    lat=$({ cat "$logs"/tx.* 2>/dev/null || true; } | awk '$3 ~ /^[0-9]+$/ {print $3}' | sort -n |
        awk '{v[NR] = $1; s += $1} END {if (NR) {i = int(NR * 0.99); if (i < NR * 0.99) i++; printf "%.1f %d", s / NR, v[i]} else print "nan nan"}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$label" "$mode" "$clients" "$round" "$target" \
        "$tps" "$xacts" "${failed:-0}" "${lat% *}" "${lat#* }" $((c1 - c0)) $((g1 - g0)) $((b1 - b0)) >>"$results"
    printf '  %-9s %9.0f tps  avg %7.3f ms  p99 %7.3f ms%s\n' "$target" "$tps" \
        "$(awk -v a="${lat% *}" 'BEGIN {print a / 1000}')" "$(awk -v a="${lat#* }" 'BEGIN {print a / 1000}')" \
        "$([ "${failed:-0}" != 0 ] && echo "  ($failed failed)")" >&2
}

# Targets of one cell, in an order rotated each round so no target always
# runs first (or right after the same neighbour).
cell_targets() { # mode round [socket]
    local list=() t i n
    for t in "${targets[@]}"; do
        case $t in floor | uring | uring-ms) [ "${3:-tcp}" = unix ] && continue ;; esac
        # PgBouncer 1.18 does not support named prepared statements in transaction mode.
        [ "$t" = pgbouncer ] && [ "$1" = prepared ] && continue
        list+=("$t")
    done
    n=${#list[@]}
    for ((i = 0; i < n; i++)); do echo "${list[$(((i + $2 - 1) % n))]}"; done
}

cells=0
for k in $SOCKETS; do for s in $SCRIPTS; do for m in $MODES; do for c in $CLIENTS; do cells=$((cells + $(cell_targets "$m" 1 "$k" | wc -l))); done; done; done; done
lcells=0
for m in $LATENCY_MODES; do lcells=$((lcells + $(cell_targets "$m" 1 | wc -l))); done
echo "$((cells * ROUNDS + lcells * LATENCY_ROUNDS)) pgbench runs of ${DURATION}s: about $(((cells * ROUNDS + lcells * LATENCY_ROUNDS) * (DURATION + 1) / 60 + 1)) minutes" >&2

started=$(date -u '+%F %H:%M UTC')
all_rounds=$((ROUNDS > LATENCY_ROUNDS ? ROUNDS : LATENCY_ROUNDS))
for round in $(seq "$all_rounds"); do
    if [ "$round" -le "$ROUNDS" ]; then
        for k in $SOCKETS; do
            for s in $SCRIPTS; do
                for m in $MODES; do
                    for c in $CLIENTS; do
                        echo "round $round/$ROUNDS: $s, $m, $c clients, $k" >&2
                        for t in $(cell_targets "$m" "$round" "$k"); do run load "$s" "$m" "$c" "$round" "$t" "$k"; done
                    done
                done
            done
        done
    fi
    [ "$round" -le "$LATENCY_ROUNDS" ] || continue
    for m in $LATENCY_MODES; do
        echo "round $round/$LATENCY_ROUNDS: SELECT 1 latency, $m, 1 client" >&2
        for t in $(cell_targets "$m" "$round"); do run latency select1 "$m" 1 "$round" "$t"; done
    done
done

# ---------------------------------------------------------------- report
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
bouncer_version="not installed"
[ -n "$bouncer_bin" ] && bouncer_version=$("$bouncer_bin" --version 2>/dev/null | head -1)
pgmux_rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || pgmux_rev+=" + uncommitted changes"

report="$work/report.md"
{
    echo "Generated by \`$command_line\` on $started."
    echo
    if [ "$ROUNDS" -lt 3 ] || [ "$DURATION" -lt 5 ]; then
        echo "> **Short run** (DURATION=$DURATION, ROUNDS=$ROUNDS): it shows the benchmark works, it measures little."
        echo
    fi
    echo "- Settings: SCRIPTS=\"$SCRIPTS\" SOCKETS=\"$SOCKETS\" MODES=\"$MODES\" CLIENTS=\"$CLIENTS\" DURATION=$DURATION ROUNDS=$ROUNDS LATENCY_MODES=\"$LATENCY_MODES\" LATENCY_ROUNDS=$LATENCY_ROUNDS POOL_SIZE=$POOL_SIZE SCALE=$SCALE"
    echo "- Machine: $(nproc) cores, ${cpu_model:-unknown CPU}, $(uname -sr)"
    echo "- PostgreSQL $pg_version (fsync off, max_connections $max_connections); $(pgbench --version)"
    echo "- pgmux $pgmux_rev (release build); ${bouncer_version}"
    if has_target pgmux-poll; then echo "- pgmux-poll: \`io = \"$POLL_IO\"\`, \`idle_poll = \"$IDLE_POLL\"\`"; fi
    if has_target pgmux-base; then echo "- pgmux-base: $BASE, \`io = \"$BASE_IO\"\`"; fi
    echo "- pgbench -n -j min(2, clients) -T $DURATION, per-transaction logs (-l) for latencies; the proxy and Postgres share the machine with pgbench."
    echo
    echo "#### Throughput and latency"
    echo
    echo "| script | mode | clients | target | TPS median | TPS min–max | avg ms | p99 ms | × direct | × PgBouncer | proxy CPU s / 1000 xacts | CPU × PgBouncer |"
    echo "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    # Medians of per-round values; CPU is total proxy ticks over all rounds
    # divided by total transactions.
    awk -F'\t' -v hz="$hz" -v order="$script_labels|$MODES|$CLIENTS|${targets[*]}" '
        function median(list,    n, a, i, j, x) {
            n = split(list, a, " ")
            for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > x + 0; j--) a[j + 1] = a[j]; a[j + 1] = x }
            return n == 0 ? "nan" : (n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2)
        }
        function minmax(list,    n, a, i, lo, hi) {
            n = split(list, a, " "); lo = hi = a[1]
            for (i = 2; i <= n; i++) { if (a[i] + 0 < lo + 0) lo = a[i]; if (a[i] + 0 > hi + 0) hi = a[i] }
            return sprintf("%.0f–%.0f", lo, hi)
        }
        $1 == "load" {
            k = $2 SUBSEP $3 SUBSEP $4 SUBSEP $6
            if ($7 != "nan") { tps[k] = tps[k] " " $7; avg[k] = avg[k] " " $10; p99[k] = p99[k] " " $11 }
            else fails[k]++
            xacts[k] += $8; ticks[k] += $12; failed[k] += $9; seen[k] = 1
        }
        END {
            split(order, o, "|")
            ns = split(o[1], S, " "); nm = split(o[2], M, " "); nc = split(o[3], C, " "); nt = split(o[4], T, " ")
            for (a = 1; a <= ns; a++) for (b = 1; b <= nm; b++) for (c = 1; c <= nc; c++) {
                base = S[a] SUBSEP M[b] SUBSEP C[c]
                d = median(tps[base SUBSEP "direct"]); pb = median(tps[base SUBSEP "pgbouncer"])
                kb = base SUBSEP "pgbouncer"
                pbcpu = (xacts[kb] > 0) ? ticks[kb] / xacts[kb] : 0
                for (t = 1; t <= nt; t++) {
                    k = base SUBSEP T[t]
                    if (!(k in seen)) continue
                    m = median(tps[k])
                    note = ""
                    if (fails[k]) note = note " (failed runs: " fails[k] ")"
                    if (failed[k]) note = note " (failed xacts: " failed[k] ")"
                    vd = (T[t] == "direct" || d == "nan" || m == "nan") ? "–" : sprintf("%.2f", m / d)
                    vb = (T[t] == "pgbouncer" || pb == "nan" || m == "nan") ? "–" : sprintf("%.2f", m / pb)
                    cpu = (T[t] == "direct" || xacts[k] == 0) ? "–" : sprintf("%.4f", ticks[k] / hz / xacts[k] * 1000)
                    vcpu = (T[t] == "direct" || T[t] == "pgbouncer" || xacts[k] == 0 || pbcpu == 0) ? "–" : sprintf("%.2f", ticks[k] / xacts[k] / pbcpu)
                    ok = m != "nan"
                    printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", S[a], M[b], C[c], T[t] note,
                        ok ? sprintf("%.0f", m) : "–", ok ? minmax(tps[k]) : "–",
                        ok ? sprintf("%.3f", median(avg[k]) / 1000) : "–", ok ? sprintf("%.3f", median(p99[k]) / 1000) : "–", vd, vb, cpu, vcpu
                }
            }
        }' "$results"
    if printf '%s\n' $CLIENTS | grep -qvx 1; then
        echo
        echo "#### Where the CPU goes"
        echo
        echo "CPU µs per transaction (user + system ticks summed over rounds, divided by the transactions): the proxy process; Postgres (postmaster, every backend and background process, backends that exited included); pgbench. With more clients than cores the three saturate the machine, so a target's TPS follows their sum. The second table asks what that allows: with PgBouncer's Postgres and pgbench cost held fixed, the TPS × PgBouncer of a proxy that cost nothing, and the proxy CPU a proxy could spend to reach 1.15× (0 when not even that is enough), next to what the floor relay and pgmux spent."
        echo
        echo "| script | mode | clients | target | proxy | Postgres | pgbench | sum |"
        echo "|---|---|---:|---|---:|---:|---:|---:|"
        awk -F'\t' -v hz="$hz" -v order="$script_labels|$MODES|$CLIENTS|${targets[*]}" -v ceiling="$work/ceiling.md" '
            $1 == "load" && $4 > 1 && $8 > 0 {
                k = $2 SUBSEP $3 SUBSEP $4 SUBSEP $6
                xacts[k] += $8; px[k] += $12; pg[k] += $13; bn[k] += $14; seen[k] = 1
            }
            function us(t, k) { return t / hz * 1e6 / xacts[k] }
            END {
                split(order, o, "|")
                ns = split(o[1], S, " "); nm = split(o[2], M, " "); nc = split(o[3], C, " "); nt = split(o[4], T, " ")
                for (a = 1; a <= ns; a++) for (b = 1; b <= nm; b++) for (c = 1; c <= nc; c++) {
                    base = S[a] SUBSEP M[b] SUBSEP C[c]
                    for (t = 1; t <= nt; t++) {
                        k = base SUBSEP T[t]
                        if (!(k in seen)) continue
                        proxy = T[t] == "direct" ? 0 : us(px[k], k)
                        printf "| %s | %s | %s | %s | %s | %.1f | %.1f | %.1f |\n", S[a], M[b], C[c], T[t],
                            T[t] == "direct" ? "–" : sprintf("%.1f", proxy), us(pg[k], k), us(bn[k], k), proxy + us(pg[k], k) + us(bn[k], k)
                    }
                    kb = base SUBSEP "pgbouncer"
                    if (!(kb in seen)) continue
                    bp = us(px[kb], kb); rest = us(pg[kb], kb) + us(bn[kb], kb)
                    need = (bp + rest) / 1.15 - rest
                    kf = base SUBSEP "floor"; km = base SUBSEP "pgmux"; ku = base SUBSEP "uring"; kv = base SUBSEP "uring-ms"
                    if (need < 0) need = 0
                    printf("| %s | %s | %s | %.0f%% | %.2f | %.1f | %s | %s | %s | %s |\n", S[a], M[b], C[c], 100 * bp / (bp + rest),
                        (bp + rest) / rest, need, (kf in seen) ? sprintf("%.1f", us(px[kf], kf)) : "–",
                        (ku in seen) ? sprintf("%.1f", us(px[ku], ku)) : "–", (kv in seen) ? sprintf("%.1f", us(px[kv], kv)) : "–",
                        (km in seen) ? sprintf("%.1f", us(px[km], km)) : "–") >> ceiling
                }
            }' "$results"
        if [ -s "$work/ceiling.md" ]; then
            echo
            echo "| script | mode | clients | PgBouncer's share of the CPU | TPS × PgBouncer of a proxy costing nothing | proxy µs per xact for 1.15× | floor relay µs per xact | io_uring floor µs per xact | io_uring multishot floor µs per xact | pgmux µs per xact |"
            echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
            cat "$work/ceiling.md"
        fi
    fi
    if [ -n "$LATENCY_MODES" ]; then
        echo
        echo "#### Added latency per \`SELECT 1\` round trip (1 client)"
        echo
        echo "| mode | target | avg µs (median) | added µs vs direct (median of per-round differences) | µs vs PgBouncer (median of per-round differences) | p99 µs |"
        echo "|---|---|---:|---:|---:|---:|"
        awk -F'\t' -v order="$LATENCY_MODES|${targets[*]}" '
            function median(list,    n, a, i, j, x) {
                n = split(list, a, " ")
                for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > x + 0; j--) a[j + 1] = a[j]; a[j + 1] = x }
                return n == 0 ? "nan" : (n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2)
            }
            $1 == "latency" && $7 != "nan" { avg[$3, $5, $6] = $10; p99[$3, $6] = p99[$3, $6] " " $11; rounds[$5] = 1; seen[$3, $6] = 1 }
            END {
                split(order, o, "|"); nm = split(o[1], M, " "); nt = split(o[2], T, " ")
                for (b = 1; b <= nm; b++) for (t = 1; t <= nt; t++) {
                    if (!((M[b], T[t]) in seen)) continue
                    all = ""; diff = ""; vsb = ""
                    for (r in rounds) {
                        if ((M[b], r, T[t]) in avg) all = all " " avg[M[b], r, T[t]]
                        if (((M[b], r, T[t]) in avg) && ((M[b], r, "direct") in avg)) diff = diff " " (avg[M[b], r, T[t]] - avg[M[b], r, "direct"])
                        if (((M[b], r, T[t]) in avg) && ((M[b], r, "pgbouncer") in avg)) vsb = vsb " " (avg[M[b], r, T[t]] - avg[M[b], r, "pgbouncer"])
                    }
                    printf "| %s | %s | %.1f | %s | %s | %.0f |\n", M[b], T[t], median(all),
                        T[t] == "direct" ? "–" : (diff == "" ? "–" : sprintf("%+.1f", median(diff))),
                        T[t] == "pgbouncer" || T[t] == "direct" || vsb == "" ? "–" : sprintf("%+.1f", median(vsb)), median(p99[M[b], T[t]])
                }
            }' "$results"
    fi
} >"$report"

echo >&2
cat "$report"

# Replace the marked block in $DOC (appended when the markers are missing).
if [ -n "$DOC" ]; then
    mkdir -p "$(dirname "$DOC")"
    touch "$DOC"
    if grep -q '^<!-- results:begin -->' "$DOC" && grep -q '^<!-- results:end -->' "$DOC"; then
        awk -v report="$report" '
            /^<!-- results:begin -->/ { print; while ((getline line < report) > 0) print line; skip = 1; next }
            /^<!-- results:end -->/ { skip = 0 }
            !skip' "$DOC" >"$work/doc.new"
    else
        { cat "$DOC"; echo; echo '<!-- results:begin -->'; cat "$report"; echo '<!-- results:end -->'; } >"$work/doc.new"
    fi
    cat "$work/doc.new" >"$DOC"
    echo "results written to $DOC" >&2
fi
