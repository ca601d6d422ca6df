#!/usr/bin/env bash
# Mutation testing: breaks the queue's rules on purpose, one at a time, and
# reports which breaks the tests notice. Not part of CI (it is slow).
#
#   scripts/mutants.sh            # the Lua mutants, then cargo-mutants over the Rust twin
#   scripts/mutants.sh --quick    # the Lua mutants only
#   scripts/mutants.sh --only fence   # the Lua mutants whose name contains "fence"
#   scripts/mutants.sh --rust-shard 3/8   # Lua, then another eighth of the Rust mutants
#
# Lua: each mutant in scripts/mutants.py is one rule of lua/ changed by one
# exact text replacement; the file is restored after each (also on Ctrl-C).
# For each the crate is rebuilt (about 15 s) and the conformance cases on one
# Redis fixture, the differential test and the Redis-edge tests run (about
# 30 s): 60 mutants, 45-60 minutes on 2 cores. Rust: cargo-mutants
# (installed if missing) over src/backend/memory.rs, src/ticket.rs and the
# acquire and release paths of src/store.rs and src/guard.rs, tested through
# cargo-nextest with the in-memory conformance cases, the differential test
# (results and wake-ups), the unit tests, the in-memory fault scenarios and
# the runtime-shutdown guards. Those filters leave some 550 mutants, six hours
# of work, so one fixed eighth runs by default (`--rust-shard 0/8`: every
# eighth mutant of each file, 69 of them), about 15 more minutes on 2 cores;
# `--rust-shard 5/8` runs another eighth, `--rust-shard 0/1` all of them.
#
# Prints one table (also target/mutants.md): mutant, caught / survived /
# equivalent (a mutant that cannot change behaviour, with the reason), and by
# which test. Exits 1 if a mutant marked "must" survived, 2 if the clean tree
# is not green, a mutant no longer applies or the Rust round did not run.
# Needs what scripts/test.sh installs (redis-server, python3) and
# cargo-nextest (installed if missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -f "${HOME:-/root}/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "${HOME:-/root}/.cargo/env"
fi
command -v redis-server >/dev/null 2>&1 || {
    echo "scripts/mutants.sh: redis-server is missing: run scripts/test.sh once, or apt-get install -y redis-server" >&2
    exit 2
}
command -v python3 >/dev/null 2>&1 || {
    echo "scripts/mutants.sh: python3 is missing" >&2
    exit 2
}
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "==> installing cargo-nextest (cargo install cargo-nextest --locked)" >&2
    cargo install cargo-nextest --locked
fi
exec python3 scripts/mutants.py "$@"
