#!/usr/bin/env bash
# The benchmark: one table, every figure beside a baseline measured in the
# same run, as a ratio (benches/compare.rs). Targets are reported, never
# asserted; the script exits non-zero only when an invariant broke during the
# runs (two holders at once, grants out of ticket order, lock errors, keys
# left behind).
#
#   scripts/bench.sh            # the comparison table (about 1-2 minutes after the build)
#   scripts/bench.sh --micro    # also the criterion micro-benchmarks (benches/micro.rs)
#
# The bench starts its own redis-server on a free 127.0.0.1 port and stops it
# by its pid at the end (tests/support); it also runs redis-benchmark against
# it and target/release/ticketlock simulate with 2 processes. The table is
# printed on stdout and written to target/bench/compare.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

MICRO=0
for arg in "$@"; do
    case "$arg" in
        --micro) MICRO=1 ;;
        -h | --help)
            sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "scripts/bench.sh: unknown argument $arg (try --micro)" >&2
            exit 2
            ;;
    esac
done

started=$(date +%s)

for tool in redis-server redis-benchmark; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "==> installing redis-server and redis-tools (apt-get)" >&2
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq
            apt-get install -y -qq redis-server redis-tools </dev/null
        else
            echo "$tool is missing: install it (Debian: sudo apt-get install -y redis-server redis-tools)" >&2
            exit 1
        fi
    fi
done

target_dir=${CARGO_TARGET_DIR:-target}
mkdir -p "$target_dir/bench"

echo "==> cargo build --release --bin ticketlock (for the 2-process row)" >&2
cargo build --release --quiet --bin ticketlock

echo "==> cargo bench --bench compare" >&2
TICKETLOCK_BIN="$target_dir/release/ticketlock" \
    BENCH_REPORT="$target_dir/bench/compare.md" \
    cargo bench --quiet --bench compare

if [ "$MICRO" -eq 1 ]; then
    echo "==> cargo bench --bench micro" >&2
    cargo bench --quiet --bench micro -- --warm-up-time 1 --measurement-time 3
fi

echo "scripts/bench.sh: done in $(($(date +%s) - started)) s (table also in $target_dir/bench/compare.md)" >&2
