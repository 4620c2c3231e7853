# Shared by the scripts in benches/ (sourced, not run).

# Sets $bindir to the newest installed PostgreSQL server's binaries, or stops
# with one message saying what to install.
require_postgres() {
    bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    [ -x "$bindir/initdb" ] || { echo "PostgreSQL server not found: apt-get install postgresql postgresql-contrib" >&2; exit 1; }
    command -v pgbench >/dev/null || { echo "pgbench not found: apt-get install postgresql-contrib" >&2; exit 1; }
}

# Sets the variable named $1 to a loopback port below 32768 (outside Linux's
# ephemeral range) that nothing listens on and no earlier call handed out.
# Called directly, not as $(free_port): `taken` must change in this shell,
# or two calls could hand out the same port.
taken=" "
free_port() {
    local -n port_out=$1
    local p
    while :; do
        p=$((20000 + RANDOM % 12000))
        [[ $taken == *" $p "* ]] && continue
        (: </dev/tcp/127.0.0.1/$p) 2>/dev/null && continue
        taken+="$p "
        port_out=$p
        return
    done
}
