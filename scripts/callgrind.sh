#!/usr/bin/env bash
# What the scripts cost the server, counted in instructions by callgrind: the
# same figure on every run of the same build, however busy the machine is
# (wall time on a shared 2-vCPU machine is not; see scripts/bench.sh for that).
#
#   scripts/callgrind.sh             # lua/ as it is in the work tree
#   scripts/callgrind.sh REV         # and lua/ at git revision REV first (built once in target/callgrind-rev)
#   CYCLES=2000 scripts/callgrind.sh # more cycles per figure (default 1000)
#
# For each version it starts redis-server under valgrind on a free 127.0.0.1
# port, loads the Functions library, sends with redis-cli:
#   * uncontended cycles: issue into an empty conversation, release (cleanup);
#   * hand-offs: issue behind the holder, poll (check-in), release (hand-off),
#     poll (pick-up);
# and prints the instructions spent inside FCALL per cycle and per hand-off.
# The server is stopped by its pid. Needs valgrind, redis-server, redis-cli,
# python3 (for a free port) and cargo (to build the library's text).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CYCLES=${CYCLES:-1000}
target=$(pwd)/${CARGO_TARGET_DIR:-target}
for tool in valgrind callgrind_annotate redis-server redis-cli python3; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "scripts/callgrind.sh: $tool is missing (Debian: apt-get install -y valgrind redis-server python3)" >&2
        exit 1
    }
done

work=$(mktemp -d)
# The server's pid goes in a file: count() runs in a subshell.
cleanup() {
    if [ -f "$work/server.pid" ]; then kill "$(cat "$work/server.pid")" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Ir inside FCALL for one command file, on a fresh server.
count() {
    local library=$1 commands=$2 out=$work/callgrind.out port
    port=$(free_port)
    rm -f "$out"
    valgrind --tool=callgrind --callgrind-out-file="$out" --toggle-collect=fcallCommand \
        redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >"$work/valgrind.log" 2>&1 &
    local server=$!
    echo "$server" >"$work/server.pid"
    for _ in $(seq 100); do
        redis-cli -p "$port" ping >/dev/null 2>&1 && break
        sleep 0.2
    done
    redis-cli -p "$port" -x FUNCTION LOAD REPLACE <"$library" >/dev/null
    # An error reply (redis-cli prints "ERR ..." or "WRONGTYPE ...") would make
    # the figure wrong. (No grep -m1: redis-cli would die of SIGPIPE.)
    if redis-cli -p "$port" <"$commands" | grep -E '^(ERR|WRONGTYPE|NOSCRIPT)' >&2; then
        echo "scripts/callgrind.sh: a script call failed (above)" >&2
        exit 1
    fi
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
    wait "$server" || true
    rm -f "$work/server.pid"
    callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done { gsub(",", "", $1); print $1; done = 1 }'
}

# The commands, with ticket numbers known in advance ("" epochs: any epoch).
uncontended=$work/uncontended.txt
handoffs=$work/handoffs.txt
{
    for i in $(seq "$CYCLES"); do
        echo "FCALL ticketlock_v2_issue 1 lock:{solo} 60000 5000 req-$i"
        echo "FCALL ticketlock_v2_release 1 lock:{solo} 0 cleanup \"\" owner"
    done
} >"$uncontended"
{
    echo "FCALL ticketlock_v2_issue 1 lock:{hot} 60000 5000 req-0"
    for i in $(seq "$CYCLES"); do
        echo "FCALL ticketlock_v2_issue 1 lock:{hot} 60000 5000 req-$i"
        echo "FCALL ticketlock_v2_poll 1 lock:{hot} $i \"\""
        echo "FCALL ticketlock_v2_release 1 lock:{hot} $((i - 1)) cleanup \"\" owner"
        echo "FCALL ticketlock_v2_poll 1 lock:{hot} $i \"\""
    done
} >"$handoffs"

# The library's text for the lua/ of the work tree or of a revision.
library_of() {
    local rev=$1 dir=$work/tree-$1
    if [ "$rev" = "work tree" ]; then
        cargo run --quiet --release --bin ticketlock -- scripts show --library >"$work/library.lua"
    else
        rm -rf "$dir"
        git worktree add --quiet --detach "$dir" "$rev"
        # A target dir of its own (sharing the work tree's would leave cargo
        # running the other tree's binary); kept, so a second run is quick.
        (cd "$dir" && CARGO_TARGET_DIR="$target/callgrind-rev" cargo run --quiet --release --bin ticketlock -- scripts show --library) >"$work/library.lua"
        git worktree remove --force "$dir"
    fi
    echo "$work/library.lua"
}

report() {
    local rev=$1 library a b
    library=$(library_of "$rev")
    a=$(count "$library" "$uncontended")
    b=$(count "$library" "$handoffs")
    printf '%-12s %8d Ir per uncontended issue+release   %8d Ir per hand-off (issue, poll, release, poll)\n' \
        "$rev:" "$((a / CYCLES))" "$((b / CYCLES))"
}

if [ $# -ge 1 ]; then report "$1"; fi
report "work tree"
