#!/usr/bin/env bash
# The soak run (examples/soak.rs), release build: 4 worker processes over
# 1,000 conversations with random hold times (0-5 ms), a random worker
# SIGKILLed and replaced every ~N/6 s, the lock server killed and restarted
# once in the middle. At the end it prints sections run, exclusion and order
# violations, keys left with the prefix and Redis used_memory against the
# baseline, and exits non-zero if an invariant broke.
#
#   scripts/soak.sh                 # 300 s
#   scripts/soak.sh --seconds 60    # shorter
#   scripts/soak.sh --seconds 60 --seed 42 --workers 4 --tasks 4   # other flags go to the example
#
# The run starts its own redis-servers on free 127.0.0.1 ports and stops
# them by pid; it is bounded (workers stop at the end of the run, stragglers
# are killed 30 s later), and `timeout` kills it if it is still running
# 5 minutes after the planned end.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SECONDS_ARG=300
PASS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds)
            [ $# -ge 2 ] || { echo "scripts/soak.sh: --seconds needs a value" >&2; exit 2; }
            SECONDS_ARG=$2
            shift 2
            ;;
        --seconds=*)
            SECONDS_ARG=${1#--seconds=}
            shift
            ;;
        -h | --help)
            sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            PASS+=("$1")
            shift
            ;;
    esac
done
case "$SECONDS_ARG" in
    '' | *[!0-9]*)
        echo "scripts/soak.sh: --seconds must be a whole number, got '$SECONDS_ARG'" >&2
        exit 2
        ;;
esac

if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing redis-server (apt-get)" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq redis-server </dev/null
    else
        echo "redis-server is missing: install it (Debian: sudo apt-get install -y redis-server)" >&2
        exit 1
    fi
fi

target_dir=${CARGO_TARGET_DIR:-target}
echo "==> cargo build --release --example soak" >&2
cargo build --release --quiet --example soak

limit=$((SECONDS_ARG + 300))
status=0
timeout --signal=KILL "$limit" \
    "$target_dir/release/examples/soak" --seconds "$SECONDS_ARG" ${PASS[@]+"${PASS[@]}"} ||
    status=$?
if [ "$status" -eq 137 ]; then
    echo "scripts/soak.sh: the soak was still running after ${limit} s and was killed" >&2
fi
exit "$status"
